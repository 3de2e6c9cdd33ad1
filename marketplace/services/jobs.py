"""Remote-execution jobs: submission, approval, leasing, completion, metering, expiry.

For: the job lifecycle of DESIGN §4. A consumer creates a job (``POST /v1/jobs``: kind, units,
limits, code for ``custom``) and learns the compute site's sealing key; it seals its input
(:mod:`marketplace.agent.payload`) to that key and uploads it (``POST /v1/jobs/{id}/payload``),
which is the submission: units are reserved (:func:`marketplace.services.metering.begin`) and
the job is queued, or awaits the provider's approval (``custom``). A compute site leases it (the
provider's agent for provider-hosted offerings, this process's worker threads for
marketplace-hosted ones), opens the input, computes, seals the result to the consumer's reply
key and posts it. The first successful result commits the reservation (charged once); failure,
cancellation, rejection or expiry release it. The marketplace stores and relays sealed bytes only,
and deletes a job's sealed input as soon as the job is final (:func:`_drop_input`, :func:`_purge`).

States::

    created -> queued | awaiting_approval -> queued -> running -> succeeded | failed
    any non-final state -> cancelled (consumer) | expired (deadline); awaiting_approval -> failed
    (rejected). A running job whose lease runs out goes back to queued (or fails after
    ``max_attempts`` leases).

Not for: the computations themselves (:mod:`marketplace.agent.compute`) or agent presence
(:mod:`marketplace.services.agents`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import traceback
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from crypto.errors import DecryptionError
from crypto.sealing import SealKeyPair, open_sealed
from marketplace.db.base import new_id, utcnow
from marketplace.db.models import Artifact, Offering
from marketplace.db.models_jobs import Agent, Job
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, PayloadTooLarge, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import agents, audit, catalog, metering, storage, validation
from marketplace.services.identity import Principal

__all__ = [
    "DEFAULT_LIMITS",
    "FINAL",
    "KINDS",
    "MAX_LIMITS",
    "approve",
    "cancel",
    "complete",
    "create",
    "decide",
    "ensure_background",
    "fail",
    "fetch_result",
    "get_for",
    "input_for_agent",
    "lease_for_agent",
    "list_for",
    "marketplace_seal_key",
    "submit_input",
    "sweep",
    "view",
]

log = logging.getLogger("som.jobs")

KINDS = ("predict", "evaluate", "custom")
FINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})
DEFAULT_LIMITS = {"cpu_seconds": 60, "memory_mb": 1024, "wall_seconds": 120.0}
MAX_LIMITS = {"cpu_seconds": 3600, "memory_mb": 16384, "wall_seconds": 7200.0}
DEFAULT_TIMEOUT_SECONDS = 3600.0
"""A job not finished this long after creation expires (the consumer may ask for 10 s .. 7 days)."""
FETCHED_GRACE_SECONDS = 600.0
"""A fetched result is kept this much longer (a retried download still works), then deleted."""
SWEEP_SECONDS = 1.0
_MAGIC_SEAL = b"SOMSEAL"
_PROBE = SealKeyPair.generate()


# -- the marketplace's own compute-site key ---------------------------------------------------


def marketplace_seal_key(rt: Runtime) -> SealKeyPair:
    """The worker's sealing key pair (``<key_dir>/job_seal.key``, 0600, made on first use; the key
    directory is outside the data directory, :mod:`marketplace.custody`)."""
    kp = rt.extras.get("jobs.seal_key")
    if isinstance(kp, SealKeyPair):
        return kp
    from marketplace.custody import SEAL_KEY_FILE

    path = Path(rt.key_dir) / SEAL_KEY_FILE
    try:
        kp = SealKeyPair.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        # Write a complete key to a private temp file, then link it into place: atomic, and when
        # several replicas race on first use exactly one key wins and everyone reads that one.
        kp = SealKeyPair.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(kp.unsafe_private_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            kp = SealKeyPair.from_private_bytes(path.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
    rt.extras["jobs.seal_key"] = kp
    return kp


# -- views ------------------------------------------------------------------------------------


def view(job: Job, p: Principal | None = None) -> dict[str, Any]:
    """The public form of a job (no payloads; code only for the parties)."""
    return {
        "id": job.id,
        "offering_id": job.offering_id,
        "org_id": job.org_id,
        "kind": job.kind,
        "status": job.status,
        "hosting": job.hosting,
        "seal_public": job.seal_public,
        "seal_statement": job.seal_statement,
        "units": job.units,
        "limits": job.limits,
        "code": job.code,
        "code_digest": job.code_digest,
        "input_size": job.input_size or None,
        "input_digest": job.input_digest or None,
        "result_size": job.result_size if job.result_blob else None,
        "result_available": bool(job.result_blob) and job.status == "succeeded",
        "attempts": job.attempts,
        "error": job.error,
        "error_reason": job.error_reason,
        "contract_id": job.contract_id,
        "usage_id": job.usage_id,
        "charged": job.charged,
        "receipt": job.receipt,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "deadline_at": job.deadline_at,
        "result_expires_at": job.result_expires_at,
    }


def get_for(s: Session, p: Principal, job_id: str) -> Job:
    """A job the caller may see: its consumer organisation, or the offering's provider.
    Anyone else gets a 404 that is audited as a denied access."""
    job = s.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found", denied=job_id)  # audited as a foreign one is
    if p.org_id not in (job.org_id, job.provider_org_id):
        raise NotFound(f"job {job_id} not found", denied=job_id)
    return job


def list_for(
    s: Session, p: Principal, *, role: str, status: str | None, offering_id: str | None, limit: int, offset: int
) -> tuple[list[Job], int]:
    stmt = select(Job).where(Job.provider_org_id == p.org_id if role == "provider" else Job.org_id == p.org_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if offering_id:
        stmt = stmt.where(Job.offering_id == offering_id)
    rows = list(s.scalars(stmt.order_by(Job.created_at.desc(), Job.id)))
    return rows[offset : offset + limit], len(rows)


# -- creation and submission --------------------------------------------------------------------


def _limits(requested: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(DEFAULT_LIMITS)
    for k, v in (requested or {}).items():
        if k not in DEFAULT_LIMITS:
            raise Invalid(f"limits: unknown key {k!r}; expected {sorted(DEFAULT_LIMITS)}")
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0 or v > MAX_LIMITS[k]:
            raise Invalid(f"limits.{k}: expected a number in (0, {MAX_LIMITS[k]}], got {v!r}")
        out[k] = int(v) if k != "wall_seconds" else float(v)
    return out


def create(
    rt: Runtime,
    p: Principal,
    *,
    offering_id: str,
    kind: str,
    units: int,
    limits: dict[str, Any] | None,
    code: str | None,
    timeout_seconds: float | None,
    contract_id: str | None,
    idempotency_key: str,
    who: audit.Actor,
) -> tuple[Job, bool]:
    """Create a job (state ``created``) and name its compute site's sealing key.

    For a provider-hosted offering the job also carries the provider's signed statement vouching
    for that key (:mod:`marketplace.agent.sealkey`), which the consumer checks before sealing.

    Returns (job, created); the same Idempotency-Key returns the same job (False). Raises
    Invalid (bad kind, units, limits, code), NotFound (offering), Unavailable (no agent has ever
    registered for a provider-hosted offering).
    """
    from marketplace.agent.payload import code_digest

    p.require("consumer")
    metering.check_idempotency_key(idempotency_key)
    if kind not in KINDS:
        raise Invalid(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if isinstance(units, bool) or not isinstance(units, int) or not 1 <= units <= 10_000_000:
        raise Invalid(f"units must be an integer in 1..10000000 (rows you will send), got {units!r}")
    if (kind == "custom") != (code is not None):
        raise Invalid("code is required for custom jobs and only for them")
    if code is not None and (not code.strip() or len(code) > 1_000_000):
        raise Invalid("code must be 1..1000000 characters")
    lim = _limits(limits)
    timeout = DEFAULT_TIMEOUT_SECONDS if timeout_seconds is None else float(timeout_seconds)
    if not 10.0 <= timeout <= 7 * 86400:
        raise Invalid(f"timeout_seconds must be in 10..604800, got {timeout}")
    with rt.tx() as s:
        existing = s.scalar(select(Job).where(Job.org_id == p.org_id, Job.idempotency_key == idempotency_key))
        if existing is not None:
            if (existing.offering_id, existing.kind, existing.code_digest, existing.units) != (
                offering_id, kind, code_digest(code) if code is not None else None, units
            ):
                raise Invalid("this Idempotency-Key was already used for a different job; use a new key")
            return existing, False
        off = catalog.get_visible(s, p, offering_id)
        if off.status != "published":
            raise Conflict(f"offering {offering_id} is {off.status}; jobs run only on published offerings")
        statement: dict[str, Any] | None = None
        if kind == "custom" and off.hosting == "marketplace":
            check_jail(rt)
        if off.hosting == "provider":
            seal_public, statement = agents.sealing_key_for(rt, s, off)
        else:
            if catalog.latest_version(s, off.id) is None:
                raise Conflict(f"offering {offering_id} has no model version yet")
            seal_public = marketplace_seal_key(rt).public_text()
        now = utcnow()
        job = Job(
            id=new_id("job"), org_id=p.org_id, submitted_by=p.key_id, offering_id=off.id,
            provider_org_id=off.org_id, hosting=off.hosting, kind=kind, status="created",
            seal_public=seal_public, seal_statement=statement, input_blob="", input_size=0, input_digest="",
            code=code, code_digest=code_digest(code) if code is not None else None, units=units,
            limits=lim, idempotency_key=idempotency_key, request_digest="", contract_id=contract_id,
            created_at=now, updated_at=now, deadline_at=now + timedelta(seconds=timeout),
        )
        s.add(job)
        s.flush()
        audit.emit(s, who, "job.create", target=job.id, detail={"offering_id": off.id, "kind": kind, "units": units})
    return job, True


def check_sealed(blob: bytes, max_size: int) -> None:
    """Refuse what is not a well-framed sealed payload (413 if too large, 422 if malformed)."""
    if len(blob) > max_size:
        raise PayloadTooLarge(f"sealed payload of {len(blob)} bytes exceeds the limit of {max_size} bytes")
    try:  # framing errors are ValueError before any cryptography; a well-framed blob fails to open
        open_sealed(_PROBE, blob, info=b"som/probe", max_size=max_size)
    except ValueError as e:
        raise Invalid(f"not a sealed payload: {e}") from e
    except DecryptionError:
        return
    raise Invalid("not a sealed payload")  # pragma: no cover - sealed to a throwaway key


def _reservation_dict(r: metering.Reservation) -> dict[str, Any]:
    d = asdict(r)
    d.pop("replay", None)
    for k in ("time", "lease_expires_at"):
        if d.get(k) is not None:
            d[k] = d[k].isoformat()
    return d


def _reservation(d: dict[str, Any] | None) -> metering.Reservation | None:
    if not d:
        return None
    kw = dict(d)
    for k in ("time", "lease_expires_at"):
        if kw.get(k) is not None:
            kw[k] = datetime.fromisoformat(kw[k])
    return metering.Reservation(**kw)


def _clamp_to_contract(s: Session, job: Job) -> None:
    """Lower the job's limits to the contract's job limits; refuse kinds it does not allow."""
    if not job.contract_id:
        return
    from marketplace.db.models_contracts import ContractRow
    from marketplace.services.contracts import terms_of

    row = s.get(ContractRow, job.contract_id)
    if row is None:
        return
    jl = terms_of(row).job_limits
    lim = dict(job.limits)
    lim["cpu_seconds"] = min(int(lim["cpu_seconds"]), jl.cpu_seconds)
    lim["memory_mb"] = min(int(lim["memory_mb"]), jl.memory_mb)
    lim["wall_seconds"] = min(float(lim["wall_seconds"]), float(jl.wall_seconds))
    job.limits = lim


def submit_input(rt: Runtime, p: Principal, job_id: str, blob: bytes, *, who: audit.Actor) -> Job:
    """Attach the sealed input and submit: reserve units, then queue (or await approval).

    Idempotent: re-sending the same bytes returns the job; other bytes after submission are 409.
    Raises PayloadTooLarge/Invalid (framing), PolicyDenied (the contract), Conflict (state).
    """
    import hashlib

    p.require("consumer")
    check_sealed(blob, rt.settings.max_sealed_bytes)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with rt.tx() as s:
        job = get_for(s, p, job_id)
        if job.org_id != p.org_id:
            raise NotFound(f"job {job_id} not found", denied=job_id)
        if job.status != "created":
            if job.input_digest == digest:
                return job
            raise Conflict(f"job {job_id} was already submitted ({job.status}); create a new job")
        req = metering.request_digest("jobs/v1", job.offering_id, job.kind, str(job.units), job.code_digest or "", digest)
        timeout = max(1.0, (job.deadline_at - utcnow()).total_seconds())
        key, offering_id, kind, units, contract_id = job.idempotency_key, job.offering_id, job.kind, job.units, job.contract_id
    with rt.tx() as s:
        storage.check_quota(rt, s, p.org_id, len(blob), what="this job's sealed input")
    res = metering.begin(
        rt, p, offering_id=offering_id, mode="remote_job", units=units, idempotency_key=key,
        request_digest=req, contract_id=contract_id, job_kind=kind, batch_size=1,
        lease_seconds=timeout + 60.0, actor=who,
    )
    if res.replay is not None:  # pragma: no cover - each job begins once; a replay means a reused key
        raise Conflict("this job's Idempotency-Key was already charged for another job")
    addr = rt.blobs.put(blob)
    try:
        with rt.tx() as s:
            row = s.get(Job, job_id)
            if row is None or row.status != "created":
                raise Conflict(f"job {job_id} changed state while submitting; fetch it again")
            job = row
            job.input_blob, job.input_size, job.input_digest = addr, len(blob), digest
            job.request_digest = req
            job.contract_id = res.contract_id
            job.reservation = _reservation_dict(res)
            _clamp_to_contract(s, job)
            job.status = "awaiting_approval" if job.kind == "custom" else "queued"
            job.updated_at = utcnow()
            audit.emit(s, who, "job.submit", target=job.id,
                       detail={"status": job.status, "input_digest": digest, "usage_id": res.usage_id})
    except BaseException:
        metering.release(rt, res, reason="submission failed")
        _purge(rt, addr)
        raise
    ensure_background(rt)
    agents.notify(rt)
    return job


# -- approval (custom) ------------------------------------------------------------------------


def check_jail(rt: Runtime) -> None:
    """Raise Unavailable (503) if this marketplace cannot jail custom-job code (and the operator
    did not set SOM_UNSAFE_UNJAILED_CUSTOM_JOBS; then a warning is logged instead)."""
    from marketplace.services.jail import JailUnavailable, require

    try:
        require(rt.settings.jail_config())
    except JailUnavailable as e:
        raise Unavailable(str(e), reason="jail_unavailable") from e


def decide(
    rt: Runtime, p: Principal, job_id: str, *, approve: bool, code_digest: str, reason: str, who: audit.Actor,
) -> Job:
    """The provider approves or rejects a custom job's exact code (by digest)."""
    from contracts.records import job_approval_record
    from marketplace.services.contracts import ledger_append

    p.require("provider")
    if p.kind == "agent":
        raise Forbidden("approvals are made by a person with a provider key, not by an agent key")
    release_after: dict[str, Any] | None = None
    purge = ""
    with rt.tx() as s:
        job = get_for(s, p, job_id)
        if job.provider_org_id != p.org_id:
            raise NotFound(f"job {job_id} not found", denied=job_id)
        if job.status != "awaiting_approval":
            raise Conflict(f"job {job_id} is {job.status}; only jobs awaiting approval can be decided")
        if code_digest != job.code_digest:
            raise Conflict(f"code_digest {code_digest} is not this job's code ({job.code_digest}); review it again")
        if approve and job.hosting == "marketplace":
            check_jail(rt)
        now = utcnow()
        decision = "approved" if approve else "rejected"
        if job.contract_id:
            ledger_append(s, job_approval_record(
                job_id=job.id, contract_id=job.contract_id, code_digest=job.code_digest or "",
                decision=decision, actor=p.key_id, time=now,
            ))
        job.decided_by = p.key_id
        job.updated_at = now
        if approve:
            job.status = "queued"
        else:
            job.status, job.error, job.error_reason, job.finished_at = "failed", f"rejected by the provider: {reason}"[:2000], "rejected", now
            release_after = job.reservation
            purge = _drop_input(job)
        audit.emit(s, who, f"job.{'approve' if approve else 'reject'}", target=job.id,
                   detail={"code_digest": job.code_digest, "reason": reason[:500]})
    _purge(rt, purge)
    if release_after is not None:
        _release(rt, release_after, "custom code rejected by the provider")
    else:
        agents.notify(rt)
    return job


def approve(rt: Runtime, p: Principal, job_id: str, *, code_digest: str, who: audit.Actor) -> Job:
    return decide(rt, p, job_id, approve=True, code_digest=code_digest, reason="", who=who)


def _release(rt: Runtime, rdict: dict[str, Any] | None, reason: str) -> None:
    r = _reservation(rdict)
    if r is not None:
        metering.release(rt, r, reason=reason)


def _drop_input(job: Job) -> str:
    """In the caller's transaction, as the job becomes final: forget its sealed input's address
    and return it for :func:`_purge` after the commit (a final job keeps no sealed input)."""
    addr, job.input_blob = job.input_blob, ""
    return addr


def _purge(rt: Runtime, *addrs: str | None) -> None:
    """Delete these blobs (after the transaction that dropped their addresses committed)."""
    for addr in addrs:
        if addr:
            with contextlib.suppress(OSError, ValueError):
                rt.blobs.delete(addr)


def cancel(rt: Runtime, p: Principal, job_id: str, *, who: audit.Actor) -> Job:
    p.require("consumer")
    with rt.tx() as s:
        job = get_for(s, p, job_id)
        if job.org_id != p.org_id:
            raise NotFound(f"job {job_id} not found", denied=job_id)
        if job.status in FINAL or job.finishing:
            raise Conflict(f"job {job_id} is {job.status}; it can no longer be cancelled")
        job.status, job.finished_at, job.updated_at = "cancelled", utcnow(), utcnow()
        job.lease_owner = job.lease_expires_at = None
        rdict = job.reservation
        purge = _drop_input(job)
        audit.emit(s, who, "job.cancel", target=job.id)
    _purge(rt, purge)
    _release(rt, rdict, "cancelled by the consumer")
    return job


def fetch_result(rt: Runtime, p: Principal, job_id: str, *, who: audit.Actor) -> tuple[Job, bytes]:
    """The sealed result (only the consumer can open it)."""
    with rt.tx() as s:
        job = get_for(s, p, job_id)
        if job.org_id != p.org_id:
            raise NotFound(f"job {job_id} not found", denied=job_id)
        if job.status != "succeeded":
            raise Conflict(f"job {job_id} is {job.status}; no result" + (f": {job.error}" if job.error else ""))
        if not job.result_blob:
            raise NotFound(f"the result of job {job_id} has expired and was deleted")
        now = utcnow()
        if job.fetched_at is None:
            job.fetched_at = now
            grace = now + timedelta(seconds=FETCHED_GRACE_SECONDS)
            if job.result_expires_at is None or grace < job.result_expires_at:
                job.result_expires_at = grace
            audit.emit(s, who, "job.result.fetch", target=job.id)
        addr = job.result_blob
    data: bytes = rt.blobs.get(addr)
    return job, data


# -- compute sites: leasing, input, completion -----------------------------------------------


def _lease_stmt(s: Session, *conds: Any) -> Any:
    stmt = select(Job).where(Job.status == "queued", *conds).order_by(Job.created_at).limit(1)
    if s.bind is not None and s.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    return stmt


def _start(rt: Runtime, job: Job, owner: str, now: datetime) -> dict[str, Any]:
    job.status = "running"
    job.attempts += 1
    job.lease_owner = owner
    job.lease_expires_at = now + timedelta(seconds=rt.settings.agent_lease_seconds)
    job.started_at = job.started_at or now
    job.updated_at = now
    return {
        "type": "job", "id": job.id, "kind": job.kind, "offering_id": job.offering_id,
        "meta": {"units": job.units, "limits": job.limits, "code_digest": job.code_digest,
                 "max_rows": job.units if job.kind != "custom" else None},
        "lease_expires_at": job.lease_expires_at.isoformat(), "attempt": job.attempts,
    }


def lease_for_agent(rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None:
    """In the caller's transaction: lease the oldest queued job the agent can run, or None."""
    _reap(rt, s, now, hosting="provider", fail_lost=False)
    kinds = [k for k in agent.capabilities if k in KINDS]
    if not kinds:
        return None
    job = s.scalar(_lease_stmt(
        s, Job.hosting == "provider", Job.offering_id.in_(agent.offering_ids), Job.kind.in_(kinds),
        Job.seal_public == agent.seal_public, Job.deadline_at > now,
    ))
    if job is None:
        return None
    return _start(rt, job, agent.id, now)


def input_for_agent(rt: Runtime, p: Principal, agent_id: str, job_id: str) -> bytes:
    agents.require_agent(p)
    with rt.tx() as s:
        agent = agents.agent_of(s, p, agent_id)
        job = s.get(Job, job_id)
        if job is None or job.offering_id not in agent.offering_ids or job.hosting != "provider":
            raise NotFound(f"job {job_id} not found")
        if job.status != "running" or job.lease_owner != agent.id:
            raise Conflict(f"job {job_id} is not leased to this agent ({job.status})")
        addr = job.input_blob
    data: bytes = rt.blobs.get(addr)
    return data


def _owner_may_post(s: Session, job: Job, owner: str, p: Principal | None) -> None:
    if p is None:
        return  # the marketplace's own worker
    agent = agents.agent_of(s, p, owner)
    if job.offering_id not in agent.offering_ids or job.hosting != "provider":
        raise NotFound(f"job {job.id} not found")


def complete(rt: Runtime, job_id: str, *, owner: str, result: bytes, p: Principal | None = None) -> Job:
    """Store the sealed result and charge, once. A duplicate post (the job already succeeded)
    returns the job unchanged; a post for a cancelled/expired/failed job is a Conflict."""
    check_sealed(result, rt.settings.max_sealed_bytes)
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        _owner_may_post(s, job, owner, p)
        if job.status == "succeeded" or job.finishing:
            return job
        if job.status not in ("running", "queued"):
            raise Conflict(f"job {job_id} is {job.status}; the result is discarded")
        job.finishing = True
        job.updated_at = utcnow()
    return _charge(rt, job_id, result=result)


def _charge(rt: Runtime, job_id: str, *, result: bytes | None) -> Job:
    """Second half of :func:`complete` (also the sweeper's retry after a crash): commit, then mark."""
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:  # pragma: no cover
            raise NotFound(f"job {job_id} not found")
        rdict, addr = job.reservation, job.result_blob
    if result is not None:
        addr = rt.blobs.put(result)
        with rt.tx() as s:
            s.execute(update(Job).where(Job.id == job_id).values(result_blob=addr, result_size=len(result)))
    elif not addr:  # crashed before the result was stored: the job runs again
        with rt.tx() as s:
            s.execute(update(Job).where(Job.id == job_id).values(finishing=False, status="queued", lease_owner=None))
        return job
    r = _reservation(rdict)
    usage_id: str | None = None
    receipt: dict[str, Any] | None = None
    failed: str | None = None
    if r is not None:
        try:
            # A job's Idempotency-Key never replays (each job begins once), so the usage row keeps
            # no second copy of the sealed result: the job's own copy is purged when it expires.
            charged = metering.commit(rt, r, result=b"", media_type="application/octet-stream")
            usage_id, receipt = charged.usage_id, charged.receipt
        except Conflict as e:
            failed = f"the reservation was released before the result came ({e.message})"
        except NotFound as e:
            failed = e.message
    now = utcnow()
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:  # pragma: no cover
            raise NotFound(f"job {job_id} not found")
        job.finishing = False
        job.lease_owner = job.lease_expires_at = None
        job.finished_at = now
        job.updated_at = now
        purge = _drop_input(job)
        if failed is not None:
            job.status, job.error, job.error_reason = "expired", failed, "reservation_released"
            job.result_blob = None
            audit.emit(s, audit.Actor.system(), "job.expire", target=job.id, outcome="failure", detail={"error": failed})
        else:
            job.status, job.charged = "succeeded", True
            job.usage_id, job.receipt = usage_id or (r.usage_id if r else None), receipt
            job.result_expires_at = now + timedelta(seconds=rt.settings.job_result_ttl_seconds)
            audit.emit(s, audit.Actor.system(), "job.succeed", target=job.id,
                       detail={"usage_id": job.usage_id, "attempts": job.attempts})
    _purge(rt, purge, addr if failed is not None else None)
    return job


def fail(rt: Runtime, job_id: str, *, owner: str, reason: str, message: str, p: Principal | None = None) -> Job:
    """The compute site could not produce a result: the job fails and its units are released."""
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        _owner_may_post(s, job, owner, p)
        if job.status in FINAL or job.finishing:
            return job
        now = utcnow()
        job.status, job.error, job.error_reason = "failed", message[:4000], reason[:40]
        job.finished_at = job.updated_at = now
        job.lease_owner = job.lease_expires_at = None
        rdict = job.reservation
        purge = _drop_input(job)
        audit.emit(s, audit.Actor.system(), "job.fail", target=job.id, outcome="failure", detail={"reason": reason[:40]})
    _purge(rt, purge)
    _release(rt, rdict, f"job failed: {reason}"[:200])
    return job


# -- background: expiry, lost leases, marketplace workers ------------------------------------------


def _reap(
    rt: Runtime, s: Session, now: datetime, *, hosting: str | None = None, fail_lost: bool = True,
    purge: list[str] | None = None,
) -> list[dict[str, Any]]:
    """In ``s``: lost leases go back to the queue or (``fail_lost``) fail.
    Returns reservations to release after the transaction commits; the sealed inputs of failed
    jobs are added to ``purge`` (deleted after the commit)."""
    released: list[dict[str, Any]] = []
    stmt = select(Job).where(
        Job.status == "running", Job.finishing.is_(False), Job.lease_expires_at < now
    )
    if hosting:
        stmt = stmt.where(Job.hosting == hosting)
    for job in s.scalars(stmt):
        if job.attempts >= job.max_attempts and not fail_lost:
            continue  # the sweeper fails it and releases its units after its commit
        if job.attempts >= job.max_attempts:
            job.status, job.error_reason = "failed", "lost"
            job.error = f"the compute site stopped answering {job.attempts} times; giving up"
            job.finished_at = now
            if purge is not None:
                purge.append(_drop_input(job))
            if job.reservation:
                released.append(job.reservation)
        else:
            job.status = "queued"
        job.lease_owner = job.lease_expires_at = None
        job.updated_at = now
        audit.emit(s, audit.Actor.system(), "job.lease.expire", target=job.id, detail={"now": job.status})
    return released


def sweep(rt: Runtime, *, now: datetime | None = None) -> None:
    """Expire overdue jobs, requeue lost leases, purge old results and the sealed inputs of jobs
    that became final, finish interrupted charges."""
    now = now or utcnow()
    released: list[dict[str, Any]] = []
    purge: list[str] = []
    with rt.tx() as s:
        released += _reap(rt, s, now, purge=purge)
        for job in s.scalars(
            select(Job).where(Job.status.in_(("created", "queued", "awaiting_approval", "running")),
                              Job.finishing.is_(False), Job.deadline_at < now)
        ):
            job.status, job.error, job.error_reason = "expired", "the job did not finish before its deadline", "deadline"
            job.finished_at = job.updated_at = now
            job.lease_owner = job.lease_expires_at = None
            purge.append(_drop_input(job))
            if job.reservation:
                released.append(job.reservation)
            audit.emit(s, audit.Actor.system(), "job.expire", target=job.id, outcome="failure")
        for job in s.scalars(select(Job).where(Job.result_blob.is_not(None), Job.result_expires_at < now)):
            purge.append(job.result_blob or "")
            job.result_blob = None
        stuck = list(s.scalars(select(Job.id).where(
            Job.finishing.is_(True), Job.updated_at < now - timedelta(seconds=30)
        )))
    for rd in released:
        _release(rt, rd, "job expired or lost")
    _purge(rt, *purge)
    for jid in stuck:
        try:
            _charge(rt, jid, result=None)
        except Exception:  # noqa: BLE001 - retried on the next sweep
            log.exception("could not finish job %s", jid)


class _Background:
    """The sweeper thread and the worker threads of marketplace-hosted jobs."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        n = max(1, int(self.rt.settings.workers))
        self.threads.append(threading.Thread(target=self._sweeper, name="som-jobs-sweeper", daemon=True))
        for i in range(n):
            self.threads.append(threading.Thread(target=self._worker, args=(i,), name=f"som-jobs-worker-{i}", daemon=True))
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        agents.notify(self.rt)
        for t in self.threads:
            t.join(timeout=10)

    def _sweeper(self) -> None:
        while not self.stop.wait(SWEEP_SECONDS):
            try:
                sweep(self.rt)
            except Exception:  # noqa: BLE001 - keep sweeping
                if self.stop.is_set():
                    return
                log.exception("job sweeper failed")

    def _worker(self, i: int) -> None:
        owner = f"worker:{os.getpid()}:{i}"
        bell = agents._bell(self.rt, "work")
        while not self.stop.is_set():
            gen = bell.generation()
            try:
                item = self._lease(owner)
            except Exception:  # noqa: BLE001
                if self.stop.is_set():
                    return
                log.exception("job worker lease failed")
                item = None
            if item is None:
                bell.wait(gen, 0.5)
                continue
            try:
                run_marketplace_job(self.rt, item["id"], owner=owner, stop=self.stop)
            except Exception as e:  # noqa: BLE001 - the job fails, the worker lives
                # the exception's message may quote the consumer's input: log its type and frames only
                log.error("job worker crashed on %s: %s\n%s", item["id"], type(e).__name__,
                          "".join(traceback.format_tb(e.__traceback__)))
                with contextlib.suppress(Exception):
                    fail(self.rt, item["id"], owner=owner, reason="error", message="internal error in the worker")

    def _lease(self, owner: str) -> dict[str, Any] | None:
        now = utcnow()
        with self.rt.tx() as s:
            job = s.scalar(_lease_stmt(s, Job.hosting == "marketplace", Job.deadline_at > now))
            return None if job is None else _start(self.rt, job, owner, now)


def ensure_background(rt: Runtime) -> None:
    """Start the sweeper and worker threads once per runtime (stopped by ``rt.close()``)."""
    if "jobs.bg" in rt.extras:
        return
    lock = rt.extras.setdefault("jobs.bg.lock", threading.Lock())
    with lock:
        if "jobs.bg" in rt.extras:
            return
        bg = _Background(rt)
        rt.extras["jobs.bg"] = bg
        bg.start()
        rt.on_close(bg.close)


def _keep_lease(rt: Runtime, job_id: str, owner: str, done: threading.Event) -> None:
    every = max(0.2, rt.settings.agent_lease_seconds / 3)
    while not done.wait(every):
        with contextlib.suppress(Exception), rt.tx() as s:
            s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running").values(
                lease_expires_at=utcnow() + timedelta(seconds=rt.settings.agent_lease_seconds)))


def run_marketplace_job(rt: Runtime, job_id: str, *, owner: str, stop: threading.Event | None = None) -> None:
    """Run a leased marketplace-hosted job in this process: decrypt the model in memory only."""
    from crypto.errors import HEError
    from marketplace.agent.compute import (
        InputLimits,
        JobFailed,
        Limits,
        load_model,
        run_job,
        sealed_input_error,
    )
    from marketplace.agent.payload import open_input, seal_result
    from marketplace.services.blobstore import BlobNotFound

    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running" or job.lease_owner != owner:
            return
        version = validation.version_for(s, job.offering_id, job.contract_id)  # the contract's pinned version
        art = s.scalar(select(Artifact).where(Artifact.version_id == version.id, Artifact.purpose == "model")) if version else None
        off = s.get(Offering, job.offering_id)
        if art is None or version is None or off is None:
            raise Unavailable(f"offering {job.offering_id} has no model artifact")
        audit.emit(s, audit.Actor.system(), "artifact.decrypt", target=art.id,
                   detail={"purpose": "job", "job_id": job.id, "version": version.number})
        fmt, kind, limits, approved, max_rows = version.format, job.kind, job.limits, job.code_digest, job.units
        addr, deadline = job.input_blob, job.deadline_at
    done = threading.Event()
    keeper = threading.Thread(target=_keep_lease, args=(rt, job_id, owner, done), daemon=True)
    keeper.start()
    try:
        if rt.settings.job_backend == "celery":  # scale-out: a Celery worker computes (docs/deployment.md)
            from marketplace.worker.dispatch import JOB_GRACE_SECONDS, run_job_on_worker

            sealed, reason, message = run_job_on_worker(
                rt, job_id=job_id, input_blob=addr, model_blob=art.blob, wrapped_key=bytes(art.wrapped_key),
                aad=art.aad, fmt=fmt, kind=kind, limits=limits, approved_digest=approved,
                max_rows=max_rows if kind != "custom" else None,
                timeout=max(1.0, (deadline - utcnow()).total_seconds()) + JOB_GRACE_SECONDS,
            )
            if sealed is None:
                fail(rt, job_id, owner=owner, reason=reason, message=message)
            else:
                complete(rt, job_id, owner=owner, result=sealed)
            return
        try:
            sealed_input = rt.blobs.get(addr)
        except (BlobNotFound, ValueError):  # the job became final meanwhile (its input is purged)
            fail(rt, job_id, owner=owner, reason="error", message="the sealed input is no longer stored")
            return
        try:
            inp = open_input(marketplace_seal_key(rt), job_id, sealed_input, max_size=rt.settings.max_sealed_bytes)
        except (DecryptionError, ValueError) as e:
            fail(rt, job_id, owner=owner, reason="bad_input", message=sealed_input_error(e))
            return
        try:
            try:
                model = load_model(catalog.decrypt_artifact(rt, art), fmt)
            except (HEError, ValueError) as e:  # one message: nothing of what the loader saw
                raise JobFailed("error", "the model artifact was refused by the model loader") from e
            out = run_job(
                model, inp, expected_kind=kind, max_rows=max_rows if kind != "custom" else None,
                approved_digest=approved, limits=Limits.from_dict(limits), workdir=Path(rt.data_dir) / "work",
                jail=rt.settings.jail_config(),
                input_limits=InputLimits(rt.settings.max_decompressed_bytes, rt.settings.max_compression_ratio),
            )
        except JobFailed as e:
            fail(rt, job_id, owner=owner, reason=e.reason, message=e.message)
            return
        complete(rt, job_id, owner=owner, result=seal_result(inp.reply_public, out))
    finally:
        done.set()
