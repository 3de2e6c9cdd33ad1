"""Creating, submitting, approving, cancelling a job and fetching its result: the consumer's and
the provider's side of the job lifecycle (DESIGN §4).

A consumer creates a job (``POST /v1/jobs``: kind, units, limits, code for ``custom``) and learns
the compute site's sealing key; it seals its input (:mod:`marketplace.compute.payload`) to that key
and uploads it (``POST /v1/jobs/{id}/payload``), which is the submission: units are reserved
(:func:`marketplace.services.metering.begin`) and the job is queued, or awaits the provider's
approval (``custom``). A compute site then leases it (:mod:`.leasing`) and posts a result or a
failure (:mod:`.results`). The marketplace stores and relays sealed bytes only, and deletes a
job's sealed input as soon as the job is final (:func:`.states.finish`).

Not for: the allowed moves (:mod:`.states`), what compute sites post (:mod:`.results`), the
computations themselves (:mod:`marketplace.compute.jobs`) or agent presence
(:mod:`marketplace.services.agents`).
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts.records import job_approval_record
from marketplace.compute.jail import JailUnavailable, require
from marketplace.compute.payload import code_digest as digest_of_code
from marketplace.db.base import new_id, utcnow
from marketplace.db.models_contracts import ContractRow
from marketplace.db.models_jobs import Job
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import agents, audit, catalog, leases, metering, storage
from marketplace.services.contracts import ledger_append, terms_of
from marketplace.services.identity import Principal
from marketplace.services.jobs.background import ensure_background
from marketplace.services.jobs.results import check_sealed
from marketplace.services.jobs.sitekey import marketplace_seal_key
from marketplace.services.jobs.states import (
    FINAL,
    KINDS,
    JobStatus,
    finish,
    move,
    purge,
    reservation_dict,
)
from marketplace.services.jobs.views import get_for, own

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_LIMITS",
    "approve",
    "cancel",
    "check_jail",
    "create",
    "decide",
    "fetch_result",
    "submit_input",
]

DEFAULT_LIMITS = {"cpu_seconds": 60, "memory_mb": 1024, "wall_seconds": 120.0}
MAX_LIMITS = {"cpu_seconds": 3600, "memory_mb": 16384, "wall_seconds": 7200.0}
DEFAULT_TIMEOUT_SECONDS = 3600.0
"""A job not finished this long after creation expires (the consumer may ask for 10 s .. 7 days)."""
FETCHED_GRACE_SECONDS = 600.0
"""A fetched result is kept this much longer (a retried download still works), then deleted."""


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
                offering_id,
                kind,
                digest_of_code(code) if code is not None else None,
                units,
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
            id=new_id("job"),
            org_id=p.org_id,
            submitted_by=p.key_id,
            offering_id=off.id,
            provider_org_id=off.org_id,
            hosting=off.hosting,
            kind=kind,
            status=JobStatus.CREATED.value,
            seal_public=seal_public,
            seal_statement=statement,
            input_blob="",
            input_size=0,
            input_digest="",
            code=code,
            code_digest=digest_of_code(code) if code is not None else None,
            units=units,
            limits=lim,
            idempotency_key=idempotency_key,
            request_digest="",
            contract_id=contract_id,
            created_at=now,
            updated_at=now,
            deadline_at=now + timedelta(seconds=timeout),
        )
        s.add(job)
        s.flush()
        audit.emit(s, who, "job.create", target=job.id, detail={"offering_id": off.id, "kind": kind, "units": units})
    return job, True


def _clamp_to_contract(s: Session, job: Job) -> None:
    """Lower the job's limits to the contract's job limits; refuse kinds it does not allow."""
    if not job.contract_id:
        return
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
    p.require("consumer")
    check_sealed(blob, rt.settings.max_sealed_bytes)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    with rt.tx() as s:
        job = own(s, p, job_id)
        if job.status != JobStatus.CREATED:
            if job.input_digest == digest:
                return job
            raise Conflict(f"job {job_id} was already submitted ({job.status}); create a new job")
        req = metering.request_digest(
            "jobs/v1", job.offering_id, job.kind, str(job.units), job.code_digest or "", digest
        )
        timeout = max(1.0, (job.deadline_at - utcnow()).total_seconds())
        key, offering_id, kind, units, contract_id = (
            job.idempotency_key,
            job.offering_id,
            job.kind,
            job.units,
            job.contract_id,
        )
    with rt.tx() as s:
        storage.check_quota(rt, s, p.org_id, len(blob), what="this job's sealed input")
    res = metering.begin(
        rt,
        p,
        offering_id=offering_id,
        mode="remote_job",
        units=units,
        idempotency_key=key,
        request_digest=req,
        contract_id=contract_id,
        job_kind=kind,
        batch_size=1,
        lease_seconds=timeout + 60.0,
        actor=who,
    )
    if res.replay is not None:  # pragma: no cover - each job begins once; a replay means a reused key
        raise Conflict("this job's Idempotency-Key was already charged for another job")
    addr = rt.blobs.put(blob)
    try:
        with rt.tx() as s:
            row = s.get(Job, job_id)
            if row is None or row.status != JobStatus.CREATED:
                raise Conflict(f"job {job_id} changed state while submitting; fetch it again")
            job = row
            job.input_blob, job.input_size, job.input_digest = addr, len(blob), digest
            job.request_digest = req
            job.contract_id = res.contract_id
            job.reservation = reservation_dict(res)
            _clamp_to_contract(s, job)
            move(job, JobStatus.AWAITING_APPROVAL if job.kind == "custom" else JobStatus.QUEUED, now=utcnow())
            audit.emit(
                s,
                who,
                "job.submit",
                target=job.id,
                detail={"status": job.status, "input_digest": digest, "usage_id": res.usage_id},
            )
    except BaseException:
        metering.release(rt, res, reason="submission failed")
        purge(rt, addr)
        raise
    ensure_background(rt)
    leases.notify(rt)
    return job


# -- approval (custom) ------------------------------------------------------------------------


def check_jail(rt: Runtime) -> None:
    """Raise Unavailable (503) if this marketplace cannot jail custom-job code (and the operator
    did not set SOM_UNSAFE_UNJAILED_CUSTOM_JOBS; then a warning is logged instead)."""
    try:
        require(rt.settings.jail_config())
    except JailUnavailable as e:
        raise Unavailable(str(e), reason="jail_unavailable") from e


def decide(
    rt: Runtime,
    p: Principal,
    job_id: str,
    *,
    approve: bool,
    code_digest: str,
    reason: str,
    who: audit.Actor,
) -> Job:
    """The provider approves or rejects a custom job's exact code (by digest)."""
    p.require("provider")
    if p.kind == "agent":
        raise Forbidden("approvals are made by a person with a provider key, not by an agent key")
    done = None
    with rt.tx() as s:
        job = get_for(s, p, job_id)
        if job.provider_org_id != p.org_id:
            raise NotFound(f"job {job_id} not found", denied=job_id)
        if job.status != JobStatus.AWAITING_APPROVAL:
            raise Conflict(f"job {job_id} is {job.status}; only jobs awaiting approval can be decided")
        if code_digest != job.code_digest:
            raise Conflict(f"code_digest {code_digest} is not this job's code ({job.code_digest}); review it again")
        if approve and job.hosting == "marketplace":
            check_jail(rt)
        now = utcnow()
        decision = "approved" if approve else "rejected"
        if job.contract_id:
            ledger_append(
                s,
                job_approval_record(
                    job_id=job.id,
                    contract_id=job.contract_id,
                    code_digest=job.code_digest or "",
                    decision=decision,
                    actor=p.key_id,
                    time=now,
                ),
            )
        job.decided_by = p.key_id
        detail = {"code_digest": job.code_digest, "reason": reason[:500]}
        if approve:
            move(job, JobStatus.QUEUED, now=now)
            audit.emit(s, who, "job.approve", target=job.id, detail=detail)
        else:
            done = finish(
                s,
                job,
                JobStatus.FAILED,
                now=now,
                event="job.reject",
                who=who,
                detail=detail,
                error=f"rejected by the provider: {reason}"[:2000],
                reason="rejected",
                release="custom code rejected by the provider",
            )
    if done is not None:
        done.apply(rt)
    else:
        leases.notify(rt)
    return job


def approve(rt: Runtime, p: Principal, job_id: str, *, code_digest: str, who: audit.Actor) -> Job:
    return decide(rt, p, job_id, approve=True, code_digest=code_digest, reason="", who=who)


def cancel(rt: Runtime, p: Principal, job_id: str, *, who: audit.Actor) -> Job:
    """The consumer cancels a job that is not final yet; its units are released."""
    p.require("consumer")
    with rt.tx() as s:
        job = own(s, p, job_id)
        if job.status in FINAL or job.finishing:
            raise Conflict(f"job {job_id} is {job.status}; it can no longer be cancelled")
        done = finish(
            s, job, JobStatus.CANCELLED, now=utcnow(), event="job.cancel", who=who, release="cancelled by the consumer"
        )
    done.apply(rt)
    return job


def fetch_result(rt: Runtime, p: Principal, job_id: str, *, who: audit.Actor) -> tuple[Job, bytes]:
    """The sealed result (only the consumer can open it)."""
    with rt.tx() as s:
        job = own(s, p, job_id)
        if job.status != JobStatus.SUCCEEDED:
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
