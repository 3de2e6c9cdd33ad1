"""Running a marketplace-hosted job in this process (or handing it to a Celery worker).

For: :func:`run_marketplace_job`, called by the local worker threads (:mod:`.background`) with a
job they leased: decrypt the model in memory only, open the sealed input, compute, seal the
result to the consumer's reply key and post it (:mod:`.results`), keeping the lease meanwhile.
This is the compute site's part of jobs: it moves to ``marketplace/compute/`` (issue 11 step 3);
the job service keeps a thin call to it.
Not for: the computations themselves (:mod:`marketplace.agent.compute`).
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from sqlalchemy import select

from crypto.errors import DecryptionError, HEError
from marketplace.agent.compute import (
    InputLimits,
    JobFailed,
    Limits,
    load_model,
    run_job,
    sealed_input_error,
)
from marketplace.agent.payload import open_input, seal_result
from marketplace.db.base import utcnow
from marketplace.db.models import Artifact, Offering
from marketplace.db.models_jobs import Job
from marketplace.errors import Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit, catalog
from marketplace.services.blobstore import BlobNotFound
from marketplace.services.jobs.leasing import keep
from marketplace.services.jobs.results import complete, fail
from marketplace.services.jobs.sitekey import marketplace_seal_key
from marketplace.services.jobs.states import JobStatus

__all__ = ["run_marketplace_job"]


def _keep_lease(rt: Runtime, job_id: str, owner: str, done: threading.Event) -> None:
    every = max(0.2, rt.settings.agent_lease_seconds / 3)
    while not done.wait(every):
        with contextlib.suppress(Exception), rt.tx() as s:
            keep(rt, s, job_id, owner, utcnow())


def run_marketplace_job(rt: Runtime, job_id: str, *, owner: str, stop: threading.Event | None = None) -> None:
    """Run a leased marketplace-hosted job in this process: decrypt the model in memory only."""
    with rt.tx() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != JobStatus.RUNNING or job.lease_owner != owner:
            return
        version = catalog.latest_version(s, job.offering_id)
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
            # optional: Celery is an extra, imported only for this backend (moves with compute, step 3)
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
