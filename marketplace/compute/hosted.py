"""One marketplace-hosted job at the compute site: from a :class:`JobSpec` to a sealed result.

For: :func:`run_hosted_job`, the one body of a leased marketplace-hosted job wherever it runs (a
job thread of the API process through :class:`~marketplace.compute.executor.LocalExecutor`, or a
Celery worker through :mod:`marketplace.worker.tasks`): read the sealed input from the blob store,
open it with the marketplace's job sealing key, decrypt the model in memory only, compute
(:func:`marketplace.compute.jobs.run_job`) and seal the result to the consumer's reply key.

Not for: leases, job state, metering or audit (:mod:`marketplace.services.jobs` reads the job and
its artifact from the database, emits ``artifact.decrypt``, keeps the lease and records
``complete``/``fail``); provider-hosted jobs (the agent, :mod:`marketplace.agent.runner`).

Failures: :class:`~marketplace.compute.jobs.JobFailed` (its ``reason`` and ``message`` are
stored with the job). Anything else (e.g. a model that does not decrypt: the operator's problem)
propagates; the caller records it as ``error`` with a fixed message, never the exception's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crypto.envelope import WrappedKey, decrypt_artifact
from crypto.errors import DecryptionError, HEError
from marketplace.compute.jail import JailConfig
from marketplace.compute.jobs import (
    InputLimits,
    JobFailed,
    Limits,
    load_model,
    run_job,
    sealed_input_error,
)
from marketplace.compute.payload import open_input, seal_result
from marketplace.compute.store import StoreSpec, job_seal_key, open_store
from marketplace.services.blobstore import BlobNotFound

__all__ = ["JobSpec", "run_hosted_job"]


@dataclass(frozen=True)
class JobSpec:
    """A leased job as the compute site needs it: where the sealed input and the *encrypted* model
    are, the model's wrapped data key and AAD, and what the marketplace allows."""

    job_id: str
    kind: str  # predict | evaluate | custom
    input_blob: str
    model_blob: str
    wrapped_key: bytes  # WrappedKey JSON
    aad: str
    fmt: str  # the model artifact's format (npz | onnx)
    limits: dict[str, Any] = field(default_factory=dict)  # Limits.from_dict
    approved_digest: str | None = None  # custom: the code digest the provider approved
    max_rows: int | None = None  # predict/evaluate: the paid rows
    max_sealed_bytes: int = 1 << 30
    input_limits: InputLimits = field(default_factory=InputLimits)

    def __repr__(self) -> str:
        return f"JobSpec(job_id={self.job_id!r}, kind={self.kind!r}, fmt={self.fmt!r})"


def run_hosted_job(spec: JobSpec, store: StoreSpec, *, jail: JailConfig | None = None) -> bytes:
    """Run ``spec`` against the site ``store``; the result sealed to the consumer's reply key.

    ``jail``: how to jail ``custom`` code (None: from the environment, as
    :func:`marketplace.compute.jobs.run_job`). Raises :class:`JobFailed`."""
    blobs, provider = open_store(store)
    try:
        sealed = blobs.get(spec.input_blob)
    except (BlobNotFound, ValueError):  # the job became final meanwhile (its input is purged)
        raise JobFailed("error", "the sealed input is no longer stored") from None
    try:
        keypair = job_seal_key(store)
    except (OSError, ValueError) as e:
        raise JobFailed("error", f"the compute site cannot read the job ({type(e).__name__})") from None
    try:
        inp = open_input(keypair, spec.job_id, sealed, max_size=spec.max_sealed_bytes)
    except (DecryptionError, ValueError) as e:
        raise JobFailed("bad_input", sealed_input_error(e)) from None
    wrapped = WrappedKey.from_json(spec.wrapped_key.decode())
    plaintext = decrypt_artifact(blobs.get(spec.model_blob), wrapped, provider=provider, aad=spec.aad.encode())
    try:
        model = load_model(plaintext, spec.fmt)
    except (HEError, ValueError) as e:  # one message: nothing of what the loader saw
        raise JobFailed("error", "the model artifact was refused by the model loader") from e
    finally:
        del plaintext
    out = run_job(
        model,
        inp,
        expected_kind=spec.kind,
        max_rows=spec.max_rows,
        approved_digest=spec.approved_digest,
        limits=Limits.from_dict(spec.limits),
        workdir=store.workdir,
        input_limits=spec.input_limits,
        jail=jail,
    )
    return seal_result(inp.reply_public, out)
