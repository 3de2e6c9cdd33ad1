"""Running a marketplace-hosted job: the job service's thin call into the compute site.

For: :func:`run_marketplace_job`, called by the local worker threads (:mod:`.background`) with a
job they leased: read the job and its model's encrypted artifact, audit the decryption, hand a
:class:`marketplace.compute.hosted.JobSpec` to the runtime's executor (local pool or Celery,
chosen once from settings), keep the lease meanwhile, and record the outcome (:mod:`.results`).
Not for: opening the sealed input, decrypting the model or computing (all in
:mod:`marketplace.compute`, where the weights are decrypted in memory only).
"""

from __future__ import annotations

import contextlib
import threading

from sqlalchemy import select

from marketplace.compute.hosted import JobSpec
from marketplace.compute.jobs import InputLimits, JobFailed
from marketplace.db.base import utcnow
from marketplace.db.models import Artifact, Offering
from marketplace.db.models_jobs import Job
from marketplace.errors import Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit, validation
from marketplace.services.jobs.leasing import keep
from marketplace.services.jobs.results import complete, fail
from marketplace.services.jobs.states import JobStatus

__all__ = ["run_marketplace_job"]


def _keep_lease(rt: Runtime, job_id: str, owner: str, done: threading.Event) -> None:
    every = max(0.2, rt.settings.agent_lease_seconds / 3)
    while not done.wait(every):
        with contextlib.suppress(Exception), rt.tx() as s:
            keep(rt, s, job_id, owner, utcnow())


def run_marketplace_job(rt: Runtime, job_id: str, *, owner: str, stop: threading.Event | None = None) -> None:
    """Run a leased marketplace-hosted job on the runtime's executor (the model is decrypted in
    the compute site's memory only, :mod:`marketplace.compute.hosted`) and record the outcome."""
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.RUNNING or job.lease_owner != owner:
            return
        version = validation.version_for(s, job.offering_id, job.contract_id)  # the contract's pinned version
        art = (
            s.scalar(select(Artifact).where(Artifact.version_id == version.id, Artifact.purpose == "model"))
            if version
            else None
        )
        off = s.get(Offering, job.offering_id)
        if art is None or version is None or off is None:
            raise Unavailable(f"offering {job.offering_id} has no model artifact")
        audit.emit(
            s,
            audit.Actor.system(),
            "artifact.decrypt",
            target=art.id,
            detail={"purpose": "job", "job_id": job.id, "version": version.number},
        )
        spec = JobSpec(
            job_id=job_id,
            kind=job.kind,
            input_blob=job.input_blob,
            model_blob=art.blob,
            wrapped_key=bytes(art.wrapped_key),
            aad=art.aad,
            fmt=version.format,
            limits=job.limits,
            approved_digest=job.code_digest,
            max_rows=job.units if job.kind != "custom" else None,
            max_sealed_bytes=rt.settings.max_sealed_bytes,
            input_limits=InputLimits(rt.settings.max_decompressed_bytes, rt.settings.max_compression_ratio),
        )
        deadline = job.deadline_at
    done = threading.Event()
    keeper = threading.Thread(target=_keep_lease, args=(rt, job_id, owner, done), daemon=True)
    keeper.start()
    try:
        try:
            sealed = rt.executor.run_job(spec, timeout=max(1.0, (deadline - utcnow()).total_seconds()))
        except JobFailed as e:
            fail(rt, job_id, owner=owner, reason=e.reason, message=e.message)
            return
        complete(rt, job_id, owner=owner, result=sealed)
    finally:
        done.set()
