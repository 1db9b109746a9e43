"""`modelapp promote` and `modelapp abort`: a person overrides the release gate's candidate (plan/gate.py).

The action names the candidate it is meant for, so an action typed for one candidate never promotes a
newer one that replaced it meanwhile, and who takes it: the API server's own answer to "who am I"
(SelfSubjectReview), which the admission policy modelapp-field-rights checks against the request's user,
so the name recorded in status.gate.decidedBy cannot be made up.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from modelapp_operator.cli.commands import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNREACHABLE,
    CliError,
    connect,
    emit,
    patch_modelapp,
    read_modelapp,
)
from modelapp_operator.cli.kube import KubeApiError
from modelapp_operator.names import ANNOTATION_GATE_ACTION, ANNOTATION_GATE_ACTION_BY, ANNOTATION_RECONCILE_REQUEST

DECIDING_PHASES = ("Testing", "AwaitingPromotion")


class GateActionError(Exception):
    """The ModelApp has no candidate to act on."""


def candidate_label(body: Mapping[str, Any]) -> str:
    """The candidate being decided, as the operator names it ("<digest>/<version>"); GateActionError if none."""
    gate = (body.get("status") or {}).get("gate") or {}
    phase = gate.get("phase")
    candidate = gate.get("candidate") or {}
    if phase not in DECIDING_PHASES or not candidate.get("imageDigest") or not candidate.get("modelVersion"):
        raise GateActionError(f"no candidate is being decided (gate phase {phase or 'none'})")
    return f"{candidate['imageDigest']}/{str(candidate['modelVersion']).strip(chr(34))}"


def build_gate_action_patch(action: str, candidate: str, user: str, now: datetime) -> dict[str, Any]:
    """Merge patch: the action, who takes it, and a reconcile request so the operator acts at once."""
    return {
        "metadata": {
            "annotations": {
                ANNOTATION_GATE_ACTION: f"{action} {candidate}",
                ANNOTATION_GATE_ACTION_BY: user,
                ANNOTATION_RECONCILE_REQUEST: now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            }
        }
    }


def cmd_gate_action(args: argparse.Namespace) -> int:
    """modelapp promote|abort NAME: override the gate's candidate."""
    client, namespace = connect(args)
    body = read_modelapp(client, namespace, args.name)
    try:
        candidate = candidate_label(body)
        user = client.username()
    except GateActionError as error:
        raise CliError(EXIT_ERROR, f"modelapp {namespace}/{args.name}: {error}") from None
    except KubeApiError as error:
        raise CliError(EXIT_UNREACHABLE, f"modelapp {namespace}/{args.name}: {error}") from None
    patch_modelapp(
        client, namespace, args.name, build_gate_action_patch(args.command, candidate, user, datetime.now(UTC))
    )
    verb = "promoting" if args.command == "promote" else "aborting"
    text = f"modelapp {namespace}/{args.name}: {verb} candidate {candidate} as {user}"
    emit(args, {"name": args.name, "namespace": namespace, "action": args.command, "candidate": candidate,
                         "by": user}, text)  # fmt: skip
    return EXIT_OK
