"""Pure functions behind the `modelapp` CLI: patches, the wait verdict, rollback targets, tables.

No I/O here (imports: the names module, plan.release and the model-blob contract only): each takes ModelApp
bodies (dicts as the API returns them) and returns data or text.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from modelapp_contract.blob import PinnedVersion, normalize_etag
from modelapp_operator.names import ConditionType, Outcome, Reason
from modelapp_operator.plan.release import pin_from

DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
SHA256_HEX = re.compile(r"^[a-f0-9]{64}$")
# A blob ETag as the service returns it, with or without the surrounding quotes.
ETAG = re.compile(r'^"?[!#-~]+"?$')
# History outcomes of a pair that served traffic: safe rollback targets. ("Superseded" is a pair
# replaced while still progressing: it never became Ready.)
ROLLBACK_OUTCOMES = frozenset({Outcome.READY})
# Degraded reasons that end a wait: the rollout of the wanted pair has failed.
FAILED_ROLLOUT_REASONS = frozenset({Reason.ROLLED_BACK, Reason.PROGRESS_DEADLINE_EXCEEDED})


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def check_digest(digest: str) -> str:
    if not DIGEST.fullmatch(digest):
        raise ValueError(f"{digest!r} is not a digest: expected sha256: followed by 64 lowercase hex characters")
    return digest


def build_set_image_patch(digest: str, repository: str | None = None) -> dict[str, Any]:
    """Merge patch pinning spec.image to a digest (tag and followTag removed: a digest never moves)."""
    image: dict[str, Any] = {"digest": check_digest(digest), "tag": None, "followTag": None}
    if repository is not None:
        image["repository"] = repository
    return {"spec": {"image": image}}


def build_set_model_patch(version: str | None, sha256: str | None) -> dict[str, Any]:
    """Pin spec.model.version (and sha256), or with version None follow the blob again."""
    if version is not None and not ETAG.fullmatch(version):
        raise ValueError(f"{version!r} is not a blob ETag (e.g. '\"0x8DC2B6F0D1A2B3C\"')")
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"{sha256!r} is not a sha256: expected 64 lowercase hex characters")
    return {"spec": {"model": {"version": version, "sha256": sha256}}}


def conditions_by_type(body: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    status = body.get("status") or {}
    return {str(c.get("type")): c for c in status.get("conditions") or [] if isinstance(c, Mapping)}


def _generation(body: Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 0)


def _observed(body: Mapping[str, Any], condition: Mapping[str, Any] | None = None) -> int:
    status = body.get("status") or {}
    if condition is not None and condition.get("observedGeneration") is not None:
        return int(condition["observedGeneration"])
    return int(status.get("observedGeneration") or 0)


@dataclass(frozen=True)
class Wanted:
    digest: str | None
    model_version: str | None

    @classmethod
    def from_spec(cls, body: Mapping[str, Any], digest: str | None, model_version: str | None) -> Wanted:
        """Explicit wishes first; else what the spec pins (a digest, a model version)."""
        spec = body.get("spec") or {}
        pinned_digest = (spec.get("image") or {}).get("digest")
        pinned_model = (spec.get("model") or {}).get("version")
        return cls(digest or pinned_digest, model_version or pinned_model)

    def matches(self, digest: str | None, model_version: str | None) -> bool:
        if self.digest is not None and digest != self.digest:
            return False
        return self.model_version is None or (
            model_version is not None and normalize_etag(model_version) == normalize_etag(self.model_version)
        )

    @property
    def given(self) -> bool:
        return self.digest is not None or self.model_version is not None

    def describe(self) -> str:
        parts = []
        if self.digest:
            parts.append(f"image {short(self.digest)}")
        if self.model_version:
            parts.append(f"model {self.model_version}")
        return " and ".join(parts) or "the current spec"

    def mentioned_in(self, text: str) -> bool:
        needles = [n for n in (self.digest, self.model_version) if n]
        if self.digest:
            needles.append(short(self.digest))
        if self.model_version:
            needles.append(normalize_etag(self.model_version))
        return any(n in text for n in needles)


WaitState = Literal["ready", "failed", "waiting"]


@dataclass(frozen=True)
class Verdict:
    state: WaitState
    reason: str
    message: str


def wait_verdict(body: Mapping[str, Any], wanted: Wanted) -> Verdict:
    """Is the ModelApp Ready with the wanted pair (done), failed for good (stop), or still rolling?"""
    status = body.get("status") or {}
    generation = _generation(body)
    conditions = conditions_by_type(body)
    ready = conditions.get(ConditionType.READY) or {}
    degraded = conditions.get(ConditionType.DEGRADED) or {}
    image = status.get("image") or {}
    model = status.get("model") or {}
    running = wanted.matches(image.get("digest"), model.get("version"))

    if ready.get("status") == "False" and ready.get("reason") == Reason.INVALID_SPEC:
        return Verdict("failed", Reason.INVALID_SPEC, str(ready.get("message") or "the spec is invalid"))
    if wanted.given:
        for pair in status.get("failedPairs") or []:
            if wanted.matches(pair.get("imageDigest"), pair.get("modelVersion")):
                message = str(degraded.get("message") or f"{wanted.describe()} failed and was rolled back")
                return Verdict("failed", str(degraded.get("reason") or Reason.ROLLED_BACK), message)
        for entry in status.get("history") or []:
            if wanted.matches(entry.get("imageDigest"), entry.get("modelVersion")):
                if entry.get("outcome") == Outcome.FAILED:
                    # The part that failed (ModelRefused, ImageCrashed, ...) and what its pods showed.
                    why = ": ".join(str(entry[key]) for key in ("reason", "failure") if entry.get(key))
                    message = f"revision {entry.get('revision')} ({wanted.describe()}) failed: {why}"
                    return Verdict("failed", str(degraded.get("reason") or "RolloutFailed"), message.strip(": "))
                break  # newest entry for this pair decides
    degraded_current = degraded.get("status") == "True" and _observed(body, degraded) >= generation
    if degraded_current and degraded.get("reason") in FAILED_ROLLOUT_REASONS:
        message = str(degraded.get("message") or "")
        if not wanted.given:
            ours = True
        elif degraded.get("reason") == Reason.ROLLED_BACK:
            # Only a rollback of the wanted pair ends this wait. history and failedPairs (checked above)
            # name that pair exactly; without them (an older operator) the message's part before
            # "rolled back to" does. The restored pair itself is not a failure.
            exact = bool(status.get("history") or status.get("failedPairs"))
            ours = not exact and wanted.mentioned_in(message.split("rolled back to", 1)[0])
        else:
            ours = running  # a missed deadline counts while the wanted pair is the one rolling out
        if ours:
            return Verdict("failed", str(degraded.get("reason")), message)

    current = _observed(body) >= generation and _observed(body, ready) >= generation
    if ready.get("status") == "True" and current and running:
        return Verdict("ready", str(ready.get("reason") or Reason.AVAILABLE), str(ready.get("message") or ""))
    if not current:
        return Verdict("waiting", "NotObserved", f"generation {generation} not observed yet (at {_observed(body)})")
    if not running:
        what = f"running image {short(str(image.get('digest') or '-'))} model {model.get('version') or '-'}"
        blocker = _blocking_condition(conditions)
        if blocker is not None:
            # Why the wanted pair is not rolled out (e.g. ModelResolved False ModelVersionGone), not Ready's reason.
            why = f"{blocker.get('type')}: {blocker.get('message') or ''}".strip(": ")
            return Verdict("waiting", str(blocker.get("reason")), f"{what}, want {wanted.describe()}; {why}")
        return Verdict("waiting", str(ready.get("reason") or Reason.PENDING), f"{what}, want {wanted.describe()}")
    reason = str(ready.get("reason") or Reason.PENDING)
    return Verdict("waiting", reason, str(ready.get("message") or status.get("replicaSummary") or ""))


def _blocking_condition(conditions: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first resolution or verification condition that is False: why nothing new rolls out."""
    for type_ in (ConditionType.MODEL_RESOLVED, ConditionType.IMAGE_RESOLVED, ConditionType.MODEL_VERIFIED):
        found = conditions.get(type_) or {}
        if found.get("status") == "False":
            return found
    return None


class RollbackError(ValueError):
    """No history entry can be rolled back to; the message says why."""


def choose_rollback_target(body: Mapping[str, Any], to_revision: int | None) -> Mapping[str, Any]:
    """The history entry to pin: revision `to_revision`, else the newest pair that served traffic
    and differs from the one running now."""
    status = body.get("status") or {}
    history: Sequence[Mapping[str, Any]] = status.get("history") or []
    if not history:
        raise RollbackError(
            "status.history is empty: nothing has been rolled out yet, so there is nothing to go back to"
        )
    if to_revision is not None:
        for entry in history:
            if entry.get("revision") == to_revision:
                if entry.get("outcome") not in ROLLBACK_OUTCOMES:
                    raise RollbackError(
                        f"revision {to_revision} has outcome {entry.get('outcome')}: only a pair that was Ready "
                        "can be rolled back to"
                    )
                return entry
        known = ", ".join(str(e.get("revision")) for e in history)
        raise RollbackError(f"no revision {to_revision} in status.history (known: {known})")
    image = (status.get("image") or {}).get("digest")
    version = (status.get("model") or {}).get("version")
    for entry in history:
        if entry.get("outcome") not in ROLLBACK_OUTCOMES:
            continue
        same = entry.get("imageDigest") == image and normalize_etag(str(entry.get("modelVersion", ""))) == (
            normalize_etag(str(version or ""))
        )
        if not same:
            return entry
    raise RollbackError("no earlier Ready pair in status.history (use --to-revision to pick one)")


@dataclass(frozen=True)
class PinCheck:
    """What must still exist in storage for a history entry to be restored: its blob version."""

    url: str  # the blob URL, no query
    version: str  # the ETag the entry ran
    pin: PinnedVersion  # its version ID or snapshot (unpinned: only the ETag, read-only identity)

    def describe(self) -> str:
        return f"{self.url} {self.pin.describe() or 'ETag ' + self.version}"


def pin_to_check(entry: Mapping[str, Any]) -> PinCheck | None:
    """The model version a rollback to `entry` needs (None: the entry names no blob to check)."""
    url, version = entry.get("modelUrl"), entry.get("modelVersion")
    if not isinstance(url, str) or not url or not isinstance(version, str) or not version:
        return None
    return PinCheck(url=url, version=version, pin=pin_from(entry, "model"))


def pin_problem(check: PinCheck, found_etag: str | None) -> str | None:
    """Why the entry cannot be restored (None: it can), given the ETag storage reports for the pinned
    version (None: not found). A snapshot or version keeps its ETag; an unpinned entry needs the blob
    itself still at that ETag."""
    if found_etag is None:
        what = check.pin.describe() if check.pin.pinned else "the blob"
        return f"{what} of {check.url} no longer exists (deleted): the model bytes of that pair are gone"
    if normalize_etag(found_etag) != normalize_etag(check.version):
        if check.pin.pinned:
            return f"{check.pin.describe()} of {check.url} has ETag {found_etag}, not {check.version}"
        return (
            f"{check.url} was overwritten (ETag {found_etag}, not {check.version}) and that pair was not pinned "
            "to a snapshot or version: its model bytes are gone"
        )
    return None


def build_rollback_patch(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Pin the spec to a history entry's image digest and model version (and sha256)."""
    digest = check_digest(str(entry.get("imageDigest")))
    model: dict[str, Any] = {"version": str(entry.get("modelVersion"))}
    if entry.get("modelSha256"):
        model["sha256"] = str(entry["modelSha256"])
    return {"spec": {"image": {"digest": digest, "tag": None, "followTag": None}, "model": model}}


# --- human-readable output ---------------------------------------------------------------------


def age(timestamp: str | None, now: datetime) -> str:
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "-"
    seconds = max(0, int((now - then.astimezone(UTC)).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        indent + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def status_summary(body: Mapping[str, Any]) -> dict[str, Any]:
    """What `modelapp status -o json` prints."""
    metadata = body.get("metadata") or {}
    status = body.get("status") or {}
    return {
        "name": metadata.get("name"),
        "namespace": metadata.get("namespace"),
        "generation": metadata.get("generation"),
        "observedGeneration": status.get("observedGeneration"),
        "image": status.get("image") or {},
        "model": status.get("model") or {},
        "replicas": {
            "desired": status.get("replicas"),
            "ready": status.get("readyReplicas"),
            "updated": status.get("updatedReplicas"),
            "summary": status.get("replicaSummary"),
        },
        "conditions": list(status.get("conditions") or []),
        "history": list(status.get("history") or []),
        "failedPairs": list(status.get("failedPairs") or []),
        "gate": dict(status.get("gate") or {}),
    }


def render_status(body: Mapping[str, Any], now: datetime) -> str:
    summary = status_summary(body)
    image, model, replicas = summary["image"], summary["model"], summary["replicas"]
    lines = [
        f"ModelApp {summary['namespace']}/{summary['name']}  "
        f"(generation {summary['generation']}, observed {summary['observedGeneration'] or '-'})",
    ]
    image_text = image.get("reference") or "-"
    if image.get("tag"):
        image_text += f"  (tag {image['tag']})"
    model_text = "-"
    if model.get("version"):
        model_text = f"{model['version']}  sha256 {str(model.get('sha256', '-'))[:12]}  {model.get('format', '')}"
        model_text += f"  {model.get('url', '')}"
    lines += table(
        [
            ("Image", image_text),
            ("Model", model_text.rstrip()),
            (
                "Replicas",
                f"{replicas['ready'] or 0}/{replicas['desired'] or 0} ready, {replicas['updated'] or 0} updated",
            ),
        ],
        indent="",
    )
    conditions = summary["conditions"]
    lines.append("Conditions:")
    if conditions:
        rows: list[tuple[str, ...]] = [("TYPE", "STATUS", "REASON", "AGE", "MESSAGE")]
        rows += [
            (
                str(c.get("type")),
                str(c.get("status")),
                str(c.get("reason") or ""),
                age(c.get("lastTransitionTime"), now),
                str(c.get("message") or "")[:100],
            )
            for c in conditions
        ]
        lines += table(rows)
    else:
        lines.append("  (none yet: the operator has not reconciled this ModelApp)")
    lines += gate_lines(summary["gate"])
    history = summary["history"]
    lines.append("History:")
    if history:
        history_rows: list[tuple[str, ...]] = [("REV", "OUTCOME", "IMAGE", "MODEL", "STARTED", "REASON")]
        history_rows += [
            (
                str(h.get("revision")),
                str(h.get("outcome")),
                short(str(h.get("imageDigest") or "")),
                str(h.get("modelVersion") or ""),
                age(h.get("startedAt"), now),
                str(h.get("reason") or "")[:60],
            )
            for h in history
        ]
        lines += table(history_rows)
    else:
        lines.append("  (none)")
    return "\n".join(lines)


def gate_lines(gate: Mapping[str, Any]) -> list[str]:
    """The release gate's candidate, phase and checks with their figures (nothing without a gate)."""
    if not gate:
        return []
    candidate = gate.get("candidate") or {}
    lines = [
        f"Gate: {gate.get('phase', '-')}  candidate image {short(str(candidate.get('imageDigest') or '-'))} "
        f"model {candidate.get('modelVersion') or '-'}",
        f"  {gate.get('message') or ''}".rstrip(),
    ]
    if gate.get("decidedBy"):
        lines.append(f"  decided by {gate['decidedBy']}")
    checks = [c for c in gate.get("checks") or [] if isinstance(c, Mapping)]
    if checks:
        rows: list[tuple[str, ...]] = [("CHECK", "STATE", "FIGURES")]
        rows += [(str(c.get("name")), str(c.get("state")), str(c.get("message") or "")) for c in checks]
        lines += table(rows)
    return lines
