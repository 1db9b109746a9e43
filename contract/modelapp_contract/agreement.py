"""When two answers to the same request agree: one rule for the app's shadow comparison and the gate's test set.

The app (modelapp_serving/shadow.py) compares the candidate's answer with the stable pair's on every shadowed
request; the operator (plan/release_gate.py) compares a test set's expected outputs with the candidate's. Both
must call the same thing "the same answer", so the rule lives here, in the package both install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Prediction = str | int | float | bool | None | Sequence["Prediction"]


def answers_agree(stable: Prediction, candidate: Prediction, tolerance: float = 0.0) -> bool:
    """Same label, or numbers within `tolerance` (absolute), element by element for lists.

    Labels compare exactly (a permuted label order must disagree); a bool is a label, not a number.
    """
    if isinstance(stable, bool) or isinstance(candidate, bool):
        return type(stable) is type(candidate) and stable == candidate
    if isinstance(stable, int | float) and isinstance(candidate, int | float):
        if math.isnan(stable) or math.isnan(candidate):
            return False
        return abs(float(stable) - float(candidate)) <= tolerance
    if isinstance(stable, Sequence) and not isinstance(stable, str):
        if not isinstance(candidate, Sequence) or isinstance(candidate, str) or len(stable) != len(candidate):
            return False
        return all(answers_agree(s, c, tolerance) for s, c in zip(stable, candidate, strict=True))
    return stable == candidate
