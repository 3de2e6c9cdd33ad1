"""Task messages between API replicas and Celery workers: JSON dicts, signed, naming where things are.

For: the two task messages (``som.he_evaluate``, ``som.run_job``) as JSON dicts (bytes as base64),
built from and read back into :class:`~marketplace.compute.he.HETask` and
:class:`~marketplace.compute.hosted.JobSpec`, and their HMAC under the task key (``task_mac.key``
in the key directory, made by the first API replica; the key directory is outside the data
directory, :mod:`marketplace.custody`). A worker refuses any message without a valid ``mac``, so
write access to Redis (or a copy of the data directory) alone cannot make a worker decrypt a model
for someone's code. A message names where things are, never what they are: blob addresses, the
*wrapped* data key and AAD, the public plan, ciphertexts and sealed bytes; never a plaintext
model, a KEK or a secret key (the worker's :class:`~marketplace.compute.store.StoreSpec` comes
from its own settings).

Record (``som.run_job``; ``som.he_evaluate`` likewise with the fields of ``HETask``)::

    {"job_id", "kind", "input_blob", "model_blob", "wrapped_key": b64, "aad", "format", "limits",
     "approved_digest", "max_rows", "max_sealed_bytes", "max_decompressed_bytes",
     "max_compression_ratio", "mac": hex HMAC-SHA256("som/task/v1" 0 task 0 canonical JSON)}

Replies: ``{"ok": True, "out": b64}`` or ``{"ok": False, "kind"|"reason": ..., "message": ...}``.

Not for: sending (:mod:`marketplace.compute.remote`) or running (:mod:`marketplace.worker.tasks`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
from pathlib import Path
from typing import Any

from marketplace.compute.he import HETask
from marketplace.compute.hosted import JobSpec
from marketplace.compute.jobs import InputLimits
from marketplace.compute.store import StoreSpec
from marketplace.custody import TASK_KEY_FILE

__all__ = [
    "TASK_HE",
    "TASK_JOB",
    "b64d",
    "b64e",
    "check_mac",
    "he_message",
    "he_task",
    "job_message",
    "job_spec",
    "sign_message",
    "task_key",
]

TASK_HE = "som.he_evaluate"
TASK_JOB = "som.run_job"

_lock = threading.Lock()
_task_keys: dict[str, bytes] = {}


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text.encode("ascii"), validate=True)


# ---------------------------------------------------------------- the task key and the mac


def task_key(key_dir: str | Path, *, create: bool = False) -> bytes:
    """The task-message HMAC key in ``key_dir`` (32 bytes, 0600). ``create`` (API replicas)
    makes it on first use; a worker only reads it. Raises OSError if it is missing."""
    root = str(Path(key_dir).resolve())
    with _lock:
        key = _task_keys.get(root)
        if key is not None:
            return key
        path = Path(root) / TASK_KEY_FILE
        if create and not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another replica made it first: use theirs
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(os.urandom(32))
        key = path.read_bytes()
        if len(key) != 32:
            raise OSError(f"{path}: expected a 32-byte key, got {len(key)} bytes")
        _task_keys[root] = key
        return key


def _mac(key: bytes, task: str, msg: dict[str, Any]) -> str:
    body = json.dumps({k: v for k, v in msg.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, b"som/task/v1\x00" + task.encode() + b"\x00" + body.encode(), hashlib.sha256).hexdigest()


def sign_message(key: bytes, task: str, msg: dict[str, Any]) -> dict[str, Any]:
    """``msg`` with its ``mac`` (HMAC-SHA256 under the key directory's task key)."""
    return {**msg, "mac": _mac(key, task, msg)}


def check_mac(key_dir: str | Path, task: str, msg: dict[str, Any]) -> None:
    """Raise ValueError unless ``msg`` was signed by an API replica sharing this key directory
    (OSError if this site has no task key)."""
    mac = msg.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(task_key(key_dir), task, msg)):
        raise ValueError("task message is not signed with this data directory's task key")


# ---------------------------------------------------------------- messages <-> tasks


def he_message(task: HETask) -> dict[str, Any]:
    """The unsigned ``som.he_evaluate`` message of ``task`` (its store spec stays behind)."""
    return {
        "version_id": task.version_id,
        "model_blob": task.model_blob,
        "wrapped_key": b64e(task.wrapped_key),
        "aad": task.aad,
        "keyset_id": task.keyset_id,
        "keyset_blob": task.keyset_blob,
        "plan_json": task.plan_json,
        "request": b64e(task.request),
    }


def he_task(store: StoreSpec, msg: dict[str, Any]) -> HETask:
    """The task of a (checked) message, to run against this site's ``store``.
    Raises KeyError/TypeError/ValueError on a malformed message."""
    return HETask(
        store=store,
        version_id=str(msg["version_id"]),
        model_blob=str(msg["model_blob"]),
        wrapped_key=b64d(msg["wrapped_key"]),
        aad=str(msg["aad"]),
        keyset_id=str(msg["keyset_id"]),
        keyset_blob=str(msg["keyset_blob"]),
        plan_json=str(msg["plan_json"]),
        request=b64d(msg["request"]),
    )


def job_message(spec: JobSpec) -> dict[str, Any]:
    """The unsigned ``som.run_job`` message of ``spec``."""
    return {
        "job_id": spec.job_id,
        "input_blob": spec.input_blob,
        "model_blob": spec.model_blob,
        "wrapped_key": b64e(spec.wrapped_key),
        "aad": spec.aad,
        "format": spec.fmt,
        "kind": spec.kind,
        "limits": dict(spec.limits),
        "approved_digest": spec.approved_digest,
        "max_rows": spec.max_rows,
        "max_sealed_bytes": spec.max_sealed_bytes,
        "max_decompressed_bytes": spec.input_limits.max_decompressed,
        "max_compression_ratio": spec.input_limits.max_ratio,
    }


def job_spec(msg: dict[str, Any]) -> JobSpec:
    """The job of a (checked) message. Raises KeyError/TypeError/ValueError on a malformed one."""
    dflt = InputLimits()
    max_rows = msg.get("max_rows")
    approved = msg.get("approved_digest")
    return JobSpec(
        job_id=str(msg["job_id"]),
        kind=str(msg["kind"]),
        input_blob=str(msg["input_blob"]),
        model_blob=str(msg["model_blob"]),
        wrapped_key=b64d(msg["wrapped_key"]),
        aad=str(msg["aad"]),
        fmt=str(msg["format"]),
        limits=dict(msg["limits"]),
        approved_digest=str(approved) if approved is not None else None,
        max_rows=int(max_rows) if max_rows is not None else None,
        max_sealed_bytes=int(msg["max_sealed_bytes"]),
        input_limits=InputLimits(
            int(msg.get("max_decompressed_bytes", dflt.max_decompressed)),
            float(msg.get("max_compression_ratio", dflt.max_ratio)),
        ),
    )
