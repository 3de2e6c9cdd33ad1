"""Exactly-once metering: reserve, compute, commit (or release), keyed by an idempotency key.

For: every metered use (HE inference, remote jobs). A use that computes in one call reads::

    with metering.reserved(rt, p, offering_id=..., mode="he_inference", units=n,
                           idempotency_key=key, request_digest=metering.request_digest(body, ...),
                           keyset_id=...) as use:
        if use.replay is not None:     # same key, same request, already charged
            return use.replay.body, use.replay.receipt
        out = compute(...)             # no DB transaction held here
        charged = use.commit(out, media_type="application/octet-stream")

(an exception in the block releases the units); a use that computes elsewhere (a job) calls
:func:`begin`, then :func:`commit` or :func:`release` itself.

Not for: policy logic (:mod:`contracts.policy`, pure), prices and statements
(:mod:`contracts.metering`), idempotency keys and receipts
(:mod:`~marketplace.services.metering.idempotency`), counters and usage rows
(:mod:`~marketplace.services.metering.usage`), or the ledger itself
(:mod:`marketplace.services.ledger`).

Guarantees (DESIGN §5):

* :func:`begin` locks the contract row (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN
  IMMEDIATE`` on SQLite), runs :func:`contracts.policy.decide` on the contract's counters, and
  reserves the units, in one short transaction. Reserved units count against quota and rate, so
  concurrent requests never overspend.
* :func:`commit` writes the charged usage record, its ``som.usage/v1`` ledger leaf and the
  counters in one transaction; the result bytes (opaque: ciphertexts or sealed boxes) are kept in
  the blob store so a retry with the same key replays the first answer.
* :func:`release` gives the units back to the quota (not to the rate window: an attempt counts
  against the rate whether or not it succeeded) and records an uncharged (``released``) usage leaf.
* A reservation holds a *lease* (:data:`LEASE_SECONDS` by default). If the process dies between
  compute and commit, nothing is charged; once the lease expires the next :func:`begin` on that
  contract releases it, and a retry with the same key proceeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from contracts import policy
from contracts.terms import JOB_KINDS, MODES
from marketplace.db.base import new_id, utcnow
from marketplace.db.models_contracts import IdempotencyKey, UsageRow, UsageState
from marketplace.errors import Conflict, Invalid, NotFound, PolicyDenied
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.audit import Actor
from marketplace.services.contracts import ledger_receipt, lock_contract, terms_of
from marketplace.services.identity import Principal
from marketplace.services.keysets import keyset_bound
from marketplace.services.metering.idempotency import (
    StoredResult,
    check_idempotency_key,
    check_request_digest,
    key_digest,
)
from marketplace.services.metering.usage import (
    apply_state,
    finish,
    resolve_contract,
    sweep,
    usage_state,
)

__all__ = [
    "INLINE_RESULT_BYTES",
    "LEASE_SECONDS",
    "Charged",
    "Reservation",
    "begin",
    "commit",
    "release",
]

#: Results up to this size are kept in the usage row; larger ones in the blob store.
INLINE_RESULT_BYTES = 64 * 1024
#: Default lease of a reservation: after this long without commit/release it may be reclaimed.
LEASE_SECONDS = 600.0


@dataclass(frozen=True)
class Reservation:
    """Units reserved for one use. ``replay`` is set instead when the key was already charged:
    return ``replay`` and do not compute. ``metered`` is False when metering is switched off."""

    usage_id: str
    contract_id: str | None
    offering_id: str
    mode: str
    units: int
    time: datetime
    lease_expires_at: datetime | None = None
    replay: StoredResult | None = None
    metered: bool = True
    org_id: str = ""
    key_digest: str = ""


@dataclass(frozen=True)
class Charged:
    """A committed use: its usage id, its ledger leaf index and the ledger receipt."""

    usage_id: str
    ledger_index: int | None
    receipt: dict[str, Any]


def _validate(
    mode: str,
    units: int,
    idempotency_key: str,
    req_digest: str,
    job_kind: str | None,
    batch_size: int | None,
) -> None:
    if mode not in MODES:
        raise Invalid(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if type(units) is not int or units < 1:
        raise Invalid(f"units: expected an integer >= 1, got {units!r}")
    if batch_size is not None and (type(batch_size) is not int or batch_size < 1):
        raise Invalid(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    if job_kind is not None and job_kind not in JOB_KINDS:
        raise Invalid(f"job_kind: expected one of {list(JOB_KINDS)}, got {job_kind!r}")
    check_idempotency_key(idempotency_key)
    check_request_digest(req_digest)


def _audit_denial(
    rt: Runtime,
    p: Principal,
    actor: Actor | None,
    denied: policy.Deny,
    *,
    contract_id: str,
    offering_id: str,
    mode: str,
    units: int,
    job_kind: str | None,
    keyset_id: str | None,
) -> None:
    """Record a policy denial as ``authz.denied`` (its own transaction; none may be open)."""
    detail: dict[str, Any] = {
        "reason": denied.reason.value,
        "message": denied.message[:500],
        "offering_id": offering_id,
        "mode": mode,
        "units": units,
    }
    if job_kind is not None:
        detail["job_kind"] = job_kind
    if keyset_id is not None:
        detail["keyset_id"] = keyset_id
    if denied.retry_after is not None:
        detail["retry_after"] = round(float(denied.retry_after), 3)
    who = actor or audit.Actor(actor=p.key_id, org_id=p.org_id)
    audit.emit_detached(rt.sessions, who, "authz.denied", target=contract_id, outcome="denied", detail=detail)


# -- the API ----------------------------------------------------------------------------------


def begin(
    rt: Runtime,
    p: Principal,
    *,
    offering_id: str,
    mode: str,
    units: int,
    idempotency_key: str,
    request_digest: str,
    contract_id: str | None = None,
    keyset_id: str | None = None,
    job_kind: str | None = None,
    batch_size: int | None = None,
    lease_seconds: float | None = None,
    now: datetime | None = None,
    actor: Actor | None = None,
) -> Reservation:
    """Reserve ``units`` of the caller's contract for ``offering_id`` (see module docstring).

    ``contract_id`` picks the contract (else the organisation's single live contract for the
    offering). ``batch_size`` (default ``units``) is checked against ``max_batch``. Raises
    :class:`Invalid` (bad arguments; key reused with another request), :class:`NotFound` (no such
    contract of yours), :class:`Conflict` (several contracts; same key in flight),
    :class:`PolicyDenied` (403, or 429 with ``Retry-After`` for ``rate_limited``).

    A policy denial is a failed authorization of a use: it is recorded as an ``authz.denied``
    audit event (target: the contract; detail: the reason, mode, units) in a transaction of its
    own after the reservation transaction ended, by ``actor`` (default: the caller's key, without
    a request id). Call ``begin`` with no transaction open.
    """
    t = now or utcnow()
    _validate(mode, units, idempotency_key, request_digest, job_kind, batch_size)
    kd = key_digest(idempotency_key)
    if not rt.settings.metering:
        return Reservation(
            usage_id=new_id("use"),
            contract_id=contract_id,
            offering_id=offering_id,
            mode=mode,
            units=units,
            time=t,
            metered=False,
            org_id=p.org_id,
            key_digest=kd,
        )
    p.require("consumer")
    lease = timedelta(seconds=LEASE_SECONDS if lease_seconds is None else lease_seconds)
    denied: policy.Deny | None = None
    denied_contract = ""
    replay_of: tuple[str, str, bytes | None, str, int | None] | None = None
    res: Reservation | None = None
    try:
        with rt.tx() as s:
            c = lock_contract(s, contract_id) if contract_id else resolve_contract(s, p, offering_id)
            cid = contract_id or (c.id if c else "")
            if c is None or c.consumer_org_id != p.org_id:
                raise NotFound(f"contract {cid} not found", denied=cid or None)
            if c.offering_id != offering_id:
                raise Invalid(f"contract {cid} is for offering {c.offering_id}, not {offering_id}")
            idem = s.get(IdempotencyKey, (p.org_id, kd))
            if idem is not None:
                if idem.request_digest != request_digest:
                    raise Invalid(
                        "this Idempotency-Key was already used with a different request; "
                        "use a new key for a new request"
                    )
                prev = s.get(UsageRow, idem.usage_id)
                if idem.state == UsageState.CHARGED and prev is not None:
                    replay_of = (
                        prev.id,
                        prev.result_blob or "",
                        prev.result_inline,
                        prev.result_media_type or "",
                        prev.ledger_index,
                    )
                elif idem.state == UsageState.RESERVED and prev is not None:
                    if prev.lease_expires_at > t:
                        wait = int((prev.lease_expires_at - t).total_seconds()) + 1
                        raise Conflict(
                            "a request with this Idempotency-Key is still in progress; retry later",
                            headers={"Retry-After": str(wait)},
                        )
                    if prev.contract_id != c.id:
                        raise Conflict("this Idempotency-Key is in use on another contract")
                    finish(s, c, prev, UsageState.RELEASED, t, reason="lease expired")
            if replay_of is None:
                sweep(s, c, t)
                bound: frozenset[str] = frozenset()
                if keyset_id is not None and (keyset_bound(s, c.id, keyset_id)):
                    bound = frozenset({keyset_id})
                st = usage_state(c, bound)
                terms = terms_of(c)
                req = policy.UseRequest(
                    mode=mode,
                    units=units,
                    batch_size=batch_size or units,
                    job_kind=job_kind,
                    keyset_id=keyset_id,
                )
                decision = policy.decide(terms, st, req, t)
                if isinstance(decision, policy.Deny):
                    denied = decision  # raised after the commit: expired leases stay released
                    denied_contract = c.id
                else:
                    st, pres = policy.reserve(st, units, t, terms=terms)
                    apply_state(c, st, t)
                    u = UsageRow(
                        id=new_id("use"),
                        contract_id=c.id,
                        offering_id=offering_id,
                        consumer_org_id=c.consumer_org_id,
                        provider_org_id=c.provider_org_id,
                        mode=mode,
                        job_kind=job_kind,
                        keyset_id=keyset_id,
                        units=units,
                        state=UsageState.RESERVED,
                        idempotency_key_digest=kd,
                        request_digest=request_digest,
                        reserved_at=t,
                        window_start=pres.window_start,
                        lease_expires_at=t + lease,
                    )
                    s.add(u)
                    if idem is None:
                        s.add(
                            IdempotencyKey(
                                org_id=p.org_id,
                                key_digest=kd,
                                request_digest=request_digest,
                                usage_id=u.id,
                                contract_id=c.id,
                                state=UsageState.RESERVED,
                                created_at=t,
                            )
                        )
                    else:
                        idem.usage_id = u.id
                        idem.contract_id = c.id
                        idem.state = UsageState.RESERVED
                    res = Reservation(
                        usage_id=u.id,
                        contract_id=c.id,
                        offering_id=offering_id,
                        mode=mode,
                        units=units,
                        time=t,
                        lease_expires_at=t + lease,
                        org_id=p.org_id,
                        key_digest=kd,
                    )
    except IntegrityError as e:  # the same key raced in on another contract (PostgreSQL)
        raise Conflict("a request with this Idempotency-Key is in progress; retry later") from e
    if denied is not None:
        _audit_denial(
            rt,
            p,
            actor,
            denied,
            contract_id=denied_contract,
            offering_id=offering_id,
            mode=mode,
            units=units,
            job_kind=job_kind,
            keyset_id=keyset_id,
        )
        raise PolicyDenied(
            denied.message, reason=denied.reason.value, retry_after=denied.retry_after, contract_id=denied_contract
        )
    if replay_of is not None:
        uid, blob, inline, media, index = replay_of
        body = rt.blobs.get(blob) if blob else (inline or b"")
        stored = StoredResult(body=body, media_type=media, receipt=ledger_receipt(rt, index), usage_id=uid)
        return Reservation(
            usage_id=uid,
            contract_id=cid,
            offering_id=offering_id,
            mode=mode,
            units=units,
            time=t,
            replay=stored,
            org_id=p.org_id,
            key_digest=kd,
        )
    if res is None:  # pragma: no cover - every branch above sets one of them
        raise Conflict("metering state changed; retry")
    return res


def commit(
    rt: Runtime, reservation: Reservation, *, result: bytes, media_type: str, now: datetime | None = None
) -> Charged:
    """Charge the reservation: usage record, ledger leaf, counters in one transaction, the result
    kept for replays; then the ledger receipt. :class:`Conflict` if the reservation was released
    meanwhile (its lease expired): nothing is charged, and a retry with the same key recomputes."""
    if not isinstance(reservation, Reservation):
        raise TypeError(f"reservation: expected metering.Reservation, got {type(reservation).__name__}")
    if reservation.replay is not None:
        raise ValueError("a replayed reservation has nothing to commit: return reservation.replay")
    if not isinstance(result, bytes | bytearray | memoryview):
        raise TypeError(f"result: expected bytes, got {type(result).__name__}")
    if not reservation.metered:
        return Charged(usage_id=reservation.usage_id, ledger_index=None, receipt={})
    t = now or utcnow()
    data = bytes(result)
    addr = rt.blobs.put(data) if len(data) > INLINE_RESULT_BYTES else None
    with rt.tx() as s:
        c = lock_contract(s, reservation.contract_id or "")
        u = s.get(UsageRow, reservation.usage_id)
        if c is None or u is None:
            raise NotFound(f"usage {reservation.usage_id} not found")
        if u.state != UsageState.RESERVED:
            raise Conflict(
                f"usage {u.id} is already {u.state} (its lease expired?); nothing more was charged; "
                f"retry with the same Idempotency-Key"
            )
        u.result_blob = addr
        u.result_inline = None if addr else data
        u.result_media_type = media_type
        finish(s, c, u, UsageState.CHARGED, t)
        index = u.ledger_index
    return Charged(usage_id=reservation.usage_id, ledger_index=index, receipt=ledger_receipt(rt, index))


def release(rt: Runtime, reservation: Reservation, *, reason: str, now: datetime | None = None) -> None:
    """Give the reservation's units back and record an uncharged (``released``) usage leaf.
    Idempotent: releasing a reservation that is already released (or charged) does nothing."""
    if not isinstance(reservation, Reservation):
        raise TypeError(f"reservation: expected metering.Reservation, got {type(reservation).__name__}")
    if reservation.replay is not None or not reservation.metered:
        return
    t = now or utcnow()
    with rt.tx() as s:
        c = lock_contract(s, reservation.contract_id or "")
        u = s.get(UsageRow, reservation.usage_id)
        if c is None or u is None or u.state != UsageState.RESERVED:
            return
        finish(s, c, u, UsageState.RELEASED, t, reason=reason or "released")
