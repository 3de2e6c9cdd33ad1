"""Exactly-once metering: reserve, compute, commit (or release), keyed by an idempotency key.

For: every metered use (HE inference, remote jobs). The route or worker calls::

    r = metering.begin(rt, p, offering_id=..., mode="he_inference", units=n,
                       idempotency_key=key, request_digest=metering.request_digest(body, ...),
                       keyset_id=...)
    if r.replay is not None:          # same key, same request, already charged
        return r.replay.body, r.replay.receipt
    try:
        out = compute(...)             # no DB transaction held here
    except BaseException:
        metering.release(rt, r, reason="computation failed")
        raise
    charged = metering.commit(rt, r, result=out, media_type="application/octet-stream")

Not for: policy logic (:mod:`contracts.policy`, pure), prices and statements
(:mod:`contracts.metering`), or the ledger itself (:mod:`marketplace.services.ledger`).

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
* Idempotency keys are scoped to the calling organisation and stored only as a SHA-256 digest,
  together with the request digest: same key + same request replays, same key + another request
  is 422, same key still in flight (lease not expired) is 409.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from contracts import policy, records
from contracts.offer import Status
from contracts.terms import JOB_KINDS, MODES
from crypto.canonical import canonicalize
from marketplace.db.base import new_id, utcnow
from marketplace.db.models_contracts import ContractRow, IdempotencyKey, UsageRow
from marketplace.errors import Conflict, Invalid, NotFound, PolicyDenied
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.audit import Actor
from marketplace.services.contracts import (
    contract_of,
    ledger_append,
    ledger_receipt,
    lock_contract,
    terms_of,
)
from marketplace.services.identity import Principal
from marketplace.services.keysets import keyset_bound

__all__ = [
    "LEASE_SECONDS",
    "Charged",
    "Reservation",
    "StoredResult",
    "begin",
    "check_idempotency_key",
    "commit",
    "key_digest",
    "receipt_for",
    "receipt_header",
    "release",
    "request_digest",
    "sweep_expired",
]

#: Results up to this size are kept in the usage row; larger ones in the blob store.
INLINE_RESULT_BYTES = 64 * 1024
#: Default lease of a reservation: after this long without commit/release it may be reclaimed.
LEASE_SECONDS = 600.0
_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")

# -- values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResult:
    """The first answer to an idempotent request, replayed: result bytes and the receipt."""

    body: bytes
    media_type: str
    receipt: dict[str, Any]
    usage_id: str


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


# -- helpers for routes -------------------------------------------------------------------------


def check_idempotency_key(value: str | None) -> str:
    """The ``Idempotency-Key`` header value, or :class:`Invalid` (422) if missing or malformed."""
    if value is None or value == "":
        raise Invalid("the Idempotency-Key header is required for metered requests (e.g. a UUID)")
    if not _KEY_RE.fullmatch(value):
        raise Invalid("Idempotency-Key must be 1..255 printable ASCII characters without spaces")
    return value


def key_digest(key: str) -> str:
    """``sha256:<hex>`` of an idempotency key (what is stored and ledgered, never the key)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def request_digest(*parts: bytes | str) -> str:
    """``sha256:<hex>`` over length-prefixed ``parts`` (route, parameters, body bytes...)."""
    h = hashlib.sha256(b"som.request/v1")
    for part in parts:
        b = part.encode() if isinstance(part, str) else bytes(part)
        h.update(len(b).to_bytes(8, "big"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def receipt_header(receipt: dict[str, Any]) -> str:
    """The ``X-Som-Receipt`` header value: base64url of the receipt's RFC 8785 canonical JSON."""
    return base64.urlsafe_b64encode(canonicalize(receipt)).decode()


# -- internals --------------------------------------------------------------------------------


def _usage_state(row: ContractRow, bound: frozenset[str]) -> policy.UsageState:
    return policy.UsageState(
        used_units=row.used_units,
        reserved_units=row.reserved_units,
        window_units=row.window_units,
        window_start=row.window_start,
        status=Status(row.status),
        bound_keysets=bound,
    )


def _apply(row: ContractRow, st: policy.UsageState, now: datetime) -> None:
    row.used_units = st.used_units
    row.reserved_units = st.reserved_units
    row.window_units = st.window_units
    row.window_start = st.window_start
    row.updated_at = now


def _policy_res(u: UsageRow) -> policy.Reservation:
    return policy.Reservation(units=u.units, time=u.reserved_at, window_start=u.window_start)


def _finish(
    s: Session, c: ContractRow, u: UsageRow, outcome: str, now: datetime, *, reason: str | None = None
) -> None:
    """Charge or release ``u`` (state ``reserved``) on locked contract ``c``: counters, leaf, row."""
    st = _usage_state(c, frozenset())
    # A released use gives its units back to the quota but not to the rate window: every attempt
    # that reserved (a failed, rejected, cancelled or expired job too) counts against the rate.
    st = policy.commit(st, _policy_res(u)) if outcome == "charged" else policy.release(st, _policy_res(u), keep_rate=True)
    _apply(c, st, now)
    rec = records.usage_record(
        contract_of(c),
        usage_id=u.id,
        mode=u.mode,
        units=u.units,
        outcome=outcome,
        request_digest=u.request_digest,
        idempotency_key_digest=u.idempotency_key_digest,
        time=u.reserved_at,
        terms=terms_of(c),
        version=c.version_number,  # the pinned model version the use computed with
    )
    u.ledger_index = ledger_append(s, rec)
    u.record = rec
    u.state = outcome
    u.finished_at = now
    if reason is not None:
        u.release_reason = reason[:200]
    s.execute(
        update(IdempotencyKey)
        .where(
            IdempotencyKey.org_id == u.consumer_org_id,
            IdempotencyKey.key_digest == u.idempotency_key_digest,
            IdempotencyKey.usage_id == u.id,
        )
        .values(state=outcome)
    )


def _sweep(s: Session, c: ContractRow, now: datetime) -> int:
    if c.reserved_units <= 0:
        return 0
    expired = list(
        s.scalars(
            select(UsageRow)
            .where(
                UsageRow.contract_id == c.id,
                UsageRow.state == "reserved",
                UsageRow.lease_expires_at <= now,
            )
            .order_by(UsageRow.reserved_at, UsageRow.id)
        )
    )
    for u in expired:
        _finish(s, c, u, "released", now, reason="lease expired")
    return len(expired)


def _resolve(s: Session, p: Principal, offering_id: str) -> ContractRow:
    """The caller's single live contract for ``offering_id``, locked (one query)."""
    stmt = select(ContractRow).where(
        ContractRow.consumer_org_id == p.org_id,
        ContractRow.offering_id == offering_id,
        ContractRow.status != Status.TERMINATED.value,
    )
    if s.get_bind().dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    rows = list(s.scalars(stmt))
    if not rows:
        raise NotFound(
            f"no contract of your organisation for offering {offering_id}; accept an offer first "
            f"(`som contract accept`)"
        )
    if len(rows) > 1:
        active = [r for r in rows if r.status == Status.ACTIVE.value]
        if len(active) != 1:
            raise Conflict(
                f"your organisation has {len(rows)} contracts for offering {offering_id}; "
                f"choose one with the X-Som-Contract header"
            )
        rows = active
    return rows[0]


def _validate(
    mode: str, units: int, idempotency_key: str, req_digest: str, job_kind: str | None,
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
    if not isinstance(req_digest, str) or not _DIGEST_RE.fullmatch(req_digest):
        raise Invalid(f"request_digest: expected 'sha256:<64 hex>', got {req_digest!r}")


def _audit_denial(
    rt: Runtime, p: Principal, actor: Actor | None, denied: policy.Deny, *, contract_id: str, offering_id: str,
    mode: str, units: int, job_kind: str | None, keyset_id: str | None,
) -> None:
    """Record a policy denial as ``authz.denied`` (its own transaction; none may be open)."""
    detail: dict[str, Any] = {"reason": denied.reason.value, "message": denied.message[:500],
                              "offering_id": offering_id, "mode": mode, "units": units}
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
            usage_id=new_id("use"), contract_id=contract_id, offering_id=offering_id, mode=mode,
            units=units, time=t, metered=False, org_id=p.org_id, key_digest=kd,
        )
    p.require("consumer")
    lease = timedelta(seconds=LEASE_SECONDS if lease_seconds is None else lease_seconds)
    denied: policy.Deny | None = None
    denied_contract = ""
    replay_of: tuple[str, str, bytes | None, str, int | None] | None = None
    res: Reservation | None = None
    try:
        with rt.tx() as s:
            c = lock_contract(s, contract_id) if contract_id else _resolve(s, p, offering_id)
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
                if idem.state == "charged" and prev is not None:
                    replay_of = (prev.id, prev.result_blob or "", prev.result_inline,
                                 prev.result_media_type or "", prev.ledger_index)
                elif idem.state == "reserved" and prev is not None:
                    if prev.lease_expires_at > t:
                        wait = int((prev.lease_expires_at - t).total_seconds()) + 1
                        raise Conflict(
                            "a request with this Idempotency-Key is still in progress; retry later",
                            headers={"Retry-After": str(wait)},
                        )
                    if prev.contract_id != c.id:
                        raise Conflict("this Idempotency-Key is in use on another contract")
                    _finish(s, c, prev, "released", t, reason="lease expired")
            if replay_of is None:
                _sweep(s, c, t)
                bound: frozenset[str] = frozenset()
                if keyset_id is not None and (
                    keyset_bound(s, c.id, keyset_id)
                ):
                    bound = frozenset({keyset_id})
                st = _usage_state(c, bound)
                terms = terms_of(c)
                req = policy.UseRequest(
                    mode=mode, units=units, batch_size=batch_size or units,
                    job_kind=job_kind, keyset_id=keyset_id,
                )
                decision = policy.decide(terms, st, req, t)
                if isinstance(decision, policy.Deny):
                    denied = decision  # raised after the commit: expired leases stay released
                    denied_contract = c.id
                else:
                    st, pres = policy.reserve(st, units, t, terms=terms)
                    _apply(c, st, t)
                    u = UsageRow(
                        id=new_id("use"), contract_id=c.id, offering_id=offering_id,
                        consumer_org_id=c.consumer_org_id, provider_org_id=c.provider_org_id,
                        mode=mode, job_kind=job_kind, keyset_id=keyset_id, units=units,
                        state="reserved", idempotency_key_digest=kd,
                        request_digest=request_digest, reserved_at=t,
                        window_start=pres.window_start, lease_expires_at=t + lease,
                    )
                    s.add(u)
                    if idem is None:
                        s.add(IdempotencyKey(
                            org_id=p.org_id, key_digest=kd, request_digest=request_digest,
                            usage_id=u.id, contract_id=c.id, state="reserved", created_at=t,
                        ))
                    else:
                        idem.usage_id = u.id
                        idem.contract_id = c.id
                        idem.state = "reserved"
                    res = Reservation(
                        usage_id=u.id, contract_id=c.id, offering_id=offering_id, mode=mode,
                        units=units, time=t, lease_expires_at=t + lease, org_id=p.org_id,
                        key_digest=kd,
                    )
    except IntegrityError as e:  # the same key raced in on another contract (PostgreSQL)
        raise Conflict("a request with this Idempotency-Key is in progress; retry later") from e
    if denied is not None:
        _audit_denial(rt, p, actor, denied, contract_id=denied_contract, offering_id=offering_id, mode=mode,
                      units=units, job_kind=job_kind, keyset_id=keyset_id)
        raise PolicyDenied(denied.message, reason=denied.reason.value, retry_after=denied.retry_after,
                           contract_id=denied_contract)
    if replay_of is not None:
        uid, blob, inline, media, index = replay_of
        body = rt.blobs.get(blob) if blob else (inline or b"")
        stored = StoredResult(body=body, media_type=media, receipt=ledger_receipt(rt, index), usage_id=uid)
        return Reservation(
            usage_id=uid, contract_id=cid, offering_id=offering_id, mode=mode, units=units,
            time=t, replay=stored, org_id=p.org_id, key_digest=kd,
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
        if u.state != "reserved":
            raise Conflict(
                f"usage {u.id} is already {u.state} (its lease expired?); nothing more was charged; "
                f"retry with the same Idempotency-Key"
            )
        u.result_blob = addr
        u.result_inline = None if addr else data
        u.result_media_type = media_type
        _finish(s, c, u, "charged", t)
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
        if c is None or u is None or u.state != "reserved":
            return
        _finish(s, c, u, "released", t, reason=reason or "released")


def sweep_expired(rt: Runtime, *, now: datetime | None = None) -> int:
    """Release every reservation whose lease has expired (all contracts); how many were released.
    :func:`begin` does this lazily per contract; a background reaper may call this."""
    t = now or utcnow()
    with rt.tx() as s:
        ids = sorted(set(s.scalars(
            select(UsageRow.contract_id).where(UsageRow.state == "reserved", UsageRow.lease_expires_at <= t)
        )))
    n = 0
    for cid in ids:
        with rt.tx() as s:
            c = lock_contract(s, cid)
            if c is not None:
                n += _sweep(s, c, t)
    return n


def receipt_for(rt: Runtime, p: Principal, usage_id: str) -> dict[str, Any]:
    """The receipt of a finished use, for its consumer, its provider or a compliance officer."""
    with rt.tx() as s:
        u = s.get(UsageRow, usage_id)
        if u is None or not (
            p.org_id in (u.consumer_org_id, u.provider_org_id) or p.has("compliance")
        ):
            raise NotFound(f"usage {usage_id} not found", denied=usage_id)
        if u.state == "reserved":
            raise Conflict(f"usage {usage_id} is still in progress; no receipt yet")
        index = u.ledger_index
        out = {"usage_id": u.id, "contract_id": u.contract_id, "outcome": u.state}
    return {**out, "receipt": ledger_receipt(rt, index)}
