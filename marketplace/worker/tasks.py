"""What a Celery worker runs: the worker-side bodies of the compute tasks (no Celery here).

For: turning one task message (:mod:`marketplace.compute.messages`) into one reply dict with the
code the local executor runs: :func:`marketplace.compute.he.run_he_task` for HE evaluation,
:func:`marketplace.compute.hosted.run_hosted_job` for marketplace-hosted jobs. The worker opens
the shared blob store and its own KEK provider (:class:`~marketplace.compute.store.StoreSpec`
from the *worker's* settings, :func:`worker_store`: a KEK never travels over Redis), decrypts the
model only in its memory, and answers with ciphertexts or sealed bytes only. A message without a
valid ``mac`` under the key directory's task key is refused.

Replies: ``{"ok": True, "out": b64}`` or ``{"ok": False, "kind"|"reason": ..., "message": ...}``.
A task never raises: a failure is a reply, so the API maps it to the same errors as the local
executor (``ComputeError`` kinds ``invalid``/``internal``; job failures ``JobFailed.reason``).

Not for: anything that needs the database (the API replicas do metering, audit and job state).
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from marketplace.compute.he import ComputeError, run_he_task
from marketplace.compute.hosted import run_hosted_job
from marketplace.compute.jobs import JobFailed
from marketplace.compute.messages import TASK_HE, TASK_JOB, b64e, check_mac, he_task, job_spec
from marketplace.compute.store import StoreSpec
from marketplace.custody import resolve_key_dir
from marketplace.settings import Settings

__all__ = ["he_evaluate", "run_marketplace_job", "worker_store"]

log = logging.getLogger("som.worker")


def worker_store(settings: Settings) -> StoreSpec:
    """The worker's own view of the shared data directory, its key directory and KEK provider.
    Raises SettingsError if the key directory cannot be found (:func:`marketplace.custody.resolve_key_dir`)."""
    return StoreSpec.from_settings(
        settings, data_dir=settings.data_dir.resolve(), key_dir=resolve_key_dir(settings, create=False)
    )


def he_evaluate(store: StoreSpec, msg: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one HE request (``msg``: :func:`marketplace.compute.messages.he_message`).
    Returns a reply dict (never raises)."""
    try:
        check_mac(store.keys_path(), TASK_HE, msg)
    except (ValueError, OSError) as e:
        log.error("refused an HE task: %s", e)
        return {"ok": False, "kind": "internal", "message": "task message refused (not signed for this data directory)"}
    try:
        task = he_task(store, msg)
    except (KeyError, TypeError, ValueError) as e:
        return {"ok": False, "kind": "internal", "message": f"malformed task message ({type(e).__name__})"}
    try:
        return {"ok": True, "out": b64e(run_he_task(task))}
    except ComputeError as e:
        return {"ok": False, "kind": e.kind, "message": e.message}


def run_marketplace_job(store: StoreSpec, msg: dict[str, Any]) -> dict[str, Any]:
    """Run one leased marketplace-hosted job (``msg``: :func:`marketplace.compute.messages.job_message`).
    Returns ``{"ok": True, "out": b64 sealed result}`` or ``{"ok": False, "reason", "message"}``."""
    try:
        check_mac(store.keys_path(), TASK_JOB, msg)
    except (ValueError, OSError) as e:
        log.error("refused a job task: %s", e)
        return {"ok": False, "reason": "error", "message": "task message refused (not signed for this data directory)"}
    try:
        spec = job_spec(msg)
    except (KeyError, TypeError, ValueError) as e:
        log.error("job task cannot start: %s", type(e).__name__)
        return {"ok": False, "reason": "error", "message": f"the worker cannot read the job ({type(e).__name__})"}
    try:
        return {"ok": True, "out": b64e(run_hosted_job(spec, store))}
    except JobFailed as e:
        return {"ok": False, "reason": e.reason, "message": e.message}
    except Exception as e:  # noqa: BLE001 - a worker answers; the job fails, the worker lives
        # the exception's message may quote the consumer's input: log its type and frames only
        log.error(
            "job %s crashed in the worker: %s\n%s",
            spec.job_id,
            type(e).__name__,
            "".join(traceback.format_tb(e.__traceback__)),
        )
        return {"ok": False, "reason": "error", "message": "internal error in the worker"}
