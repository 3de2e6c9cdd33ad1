"""The job lifecycle as a state machine: the states, the allowed moves, and the one way to end.

For: every change of ``Job.status``. :func:`move` makes the non-terminal moves (submission,
approval, leasing, a lost lease); :func:`finish` makes every terminal one and returns the
:class:`Settlement` to apply once the transaction committed (release the reserved units, delete
the sealed input and any unwanted result). Nothing else in the code assigns a job's status.

::

    created --submit--> queued ---lease---> running --result--> succeeded
       |                  ^  ^                |
       | submit (custom)  |  +---lease lost---+  (attempts left)
       v                  | approve
    awaiting_approval ----+
    any live state --> failed (compute site failed; lease lost max_attempts times; code rejected)
                   --> cancelled (the consumer) | expired (deadline; reservation released early)

    +-------------------+-------------------------------------------------------+
    | from              | to                                                    |
    +-------------------+-------------------------------------------------------+
    | created           | queued, awaiting_approval, failed, cancelled, expired |
    | awaiting_approval | queued, failed, cancelled, expired                    |
    | queued            | running, succeeded, failed, cancelled, expired        |
    | running           | queued, succeeded, failed, cancelled, expired         |
    | succeeded, failed, cancelled, expired: final, no move out                 |
    +-------------------+-------------------------------------------------------+

(``queued -> succeeded``: a result posted by a compute site whose lease was just reaped.)

Invariants: a final job never moves again, so it is charged at most once (``charged`` is set only
by ``finish(succeeded)``); every final job's sealed input is dropped in the same transaction and
deleted after it; a job that ends without a result has its reservation released.

Not for: the preconditions a caller checks first (who may act, which messages a refused request
gets): those stay with the caller, in :mod:`.lifecycle` and :mod:`.results`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from marketplace.db.models_jobs import Job
from marketplace.errors import Conflict
from marketplace.runtime import Runtime
from marketplace.services import audit, metering

__all__ = [
    "FINAL",
    "KINDS",
    "TRANSITIONS",
    "IllegalTransition",
    "JobKind",
    "JobStatus",
    "Settlement",
    "finish",
    "move",
    "reservation_dict",
    "reservation_of",
]


class JobKind(StrEnum):
    PREDICT = "predict"
    EVALUATE = "evaluate"
    CUSTOM = "custom"


class JobStatus(StrEnum):
    CREATED = "created"
    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


S = JobStatus
KINDS: tuple[str, ...] = tuple(JobKind)
FINAL: frozenset[JobStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.EXPIRED})
_ENDS = {S.FAILED, S.CANCELLED, S.EXPIRED}
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    S.CREATED: frozenset({S.QUEUED, S.AWAITING_APPROVAL, *_ENDS}),
    S.AWAITING_APPROVAL: frozenset({S.QUEUED, *_ENDS}),
    S.QUEUED: frozenset({S.RUNNING, S.SUCCEEDED, *_ENDS}),
    S.RUNNING: frozenset({S.QUEUED, S.SUCCEEDED, *_ENDS}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
    S.EXPIRED: frozenset(),
}


class IllegalTransition(Conflict):
    """A move the table does not allow (a caller's precondition was missed: a bug, not a request)."""


def _check(job: Job, to: JobStatus) -> None:
    try:
        frm = JobStatus(job.status)
    except ValueError:
        raise IllegalTransition(f"job {job.id} has an unknown status {job.status!r}") from None
    if to not in TRANSITIONS[frm]:
        why = "it is final" if frm in FINAL else "allowed: " + ", ".join(sorted(TRANSITIONS[frm]))
        raise IllegalTransition(f"job {job.id} cannot go from {frm} to {to} ({why})")


def move(job: Job, to: str, *, now: datetime | None = None) -> None:
    """A non-terminal move (``to`` not final; :func:`finish` ends a job). Raises IllegalTransition."""
    target = JobStatus(to)
    if target in FINAL:
        raise IllegalTransition(f"job {job.id}: {target} is final; end a job with finish()")
    _check(job, target)
    job.status = target.value  # stored and audited as a plain str
    if now is not None:
        job.updated_at = now


# -- ending a job ---------------------------------------------------------------------------------


def reservation_dict(r: metering.Reservation) -> dict[str, Any]:
    """A reservation as the job row stores it (JSON)."""
    d = asdict(r)
    d.pop("replay", None)
    for k in ("time", "lease_expires_at"):
        if d.get(k) is not None:
            d[k] = d[k].isoformat()
    return d


def reservation_of(d: dict[str, Any] | None) -> metering.Reservation | None:
    if not d:
        return None
    kw = dict(d)
    for k in ("time", "lease_expires_at"):
        if kw.get(k) is not None:
            kw[k] = datetime.fromisoformat(kw[k])
    return metering.Reservation(**kw)


@dataclass
class Settlement:
    """What a job's end leaves to do after its transaction commits: blobs to delete, and the
    reservation to release (None once charged, or when it was released already)."""

    purge: list[str] = field(default_factory=list)
    release: dict[str, Any] | None = None
    reason: str = ""

    def apply(self, rt: Runtime) -> None:
        purge(rt, *self.purge)
        r = reservation_of(self.release)
        if r is not None:
            metering.release(rt, r, reason=self.reason)


def purge(rt: Runtime, *addrs: str | None) -> None:
    """Delete these blobs (after the transaction that dropped their addresses committed)."""
    for addr in addrs:
        if addr:
            with contextlib.suppress(OSError, ValueError):
                rt.blobs.delete(addr)


def finish(
    s: Session,
    job: Job,
    to: str,
    *,
    now: datetime,
    event: str,
    who: audit.Actor | None = None,
    error: str | None = None,
    reason: str | None = None,
    detail: dict[str, Any] | None = None,
    outcome: str = "success",
    release: str | None = None,
    usage_id: str | None = None,
    receipt: dict[str, Any] | None = None,
    result_ttl: float = 0.0,
) -> Settlement:
    """In ``s``: end ``job`` in the final state ``to`` and audit it as ``event``.

    The lease is cleared, the sealed input's address dropped (deleted by the Settlement), and:
    ``succeeded`` marks the job charged (``usage_id``, ``receipt``, the result kept for
    ``result_ttl`` s); any other end records ``error``/``reason`` and, if ``release`` names why,
    releases the reservation; ``expired`` also drops a stored result. Raises IllegalTransition
    if the table does not allow the move (so a final job is never finished twice).
    """
    target = JobStatus(to)
    if target not in FINAL:
        raise IllegalTransition(f"job {job.id}: {target} is not final; use move()")
    _check(job, target)
    out = Settlement()
    job.status = target.value  # stored and audited as a plain str
    job.finished_at = job.updated_at = now
    job.lease_owner = job.lease_expires_at = None
    job.finishing = False
    out.purge.append(job.input_blob)
    job.input_blob = ""  # a final job keeps no sealed input
    if target is S.SUCCEEDED:
        job.charged = True
        job.usage_id, job.receipt = usage_id, receipt
        job.result_expires_at = now + timedelta(seconds=result_ttl)
    else:
        if error is not None:
            job.error = error
        if reason is not None:
            job.error_reason = reason
        if target is S.EXPIRED and job.result_blob:
            out.purge.append(job.result_blob)
            job.result_blob = None
        if release is not None:
            out.release, out.reason = job.reservation, release
    audit.emit(s, who or audit.Actor.system(), event, target=job.id, outcome=outcome, detail=detail)
    return out
