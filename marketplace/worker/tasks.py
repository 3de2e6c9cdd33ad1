"""What a Celery worker runs: the worker-side bodies of the compute tasks (no Celery here).

For: turning one task message (a JSON dict; bytes as base64) into one reply dict, with the same
code as the local compute pool: :func:`marketplace.services.compute.run_he_task` for HE
evaluation, :func:`marketplace.agent.compute.run_job` for marketplace-hosted jobs. A message
names where things are, never what they are: the encrypted model's blob address, its wrapped
data key and AAD, the key set's blob address, the sealed input's blob address. The worker opens
the shared blob store and its own key-encryption-key provider (:class:`StoreSpec` from the
*worker's* settings: a KEK never travels over Redis), decrypts the model only in its memory, and
answers with ciphertexts or sealed bytes only.

Every message carries an HMAC (``mac``) under the task key (``task_mac.key`` in the key directory,
made by the first API replica; the key directory is outside the data directory,
:mod:`marketplace.custody`): a worker refuses anything else, so write access to Redis (or a copy
of the data directory) alone cannot make a worker decrypt a model for someone's code.

Replies: ``{"ok": True, "out": b64}`` or ``{"ok": False, "kind"|"reason": ..., "message": ...}``.
A task never raises: a failure is a reply, so the API maps it to the same errors as the local
pool (``ComputeError`` kinds ``invalid``/``internal``; job failures ``JobFailed.reason``).

Not for: anything that needs the database (the API replicas do metering, audit and job state).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import threading
import traceback
from pathlib import Path
from typing import Any

from marketplace.services.compute import ComputeError, HETask, StoreSpec, run_he_task
from marketplace.settings import Settings

__all__ = [
    "JOB_SEAL_KEY_PATH",
    "TASK_KEY_PATH",
    "b64d",
    "b64e",
    "check_mac",
    "he_evaluate",
    "run_marketplace_job",
    "sign_message",
    "task_key",
    "worker_store",
]

log = logging.getLogger("som.worker")

JOB_SEAL_KEY_PATH = Path("job_seal.key")
"""The marketplace's job sealing key, relative to the key directory (made by the API replicas)."""

TASK_KEY_PATH = Path("task_mac.key")
"""HMAC key of task messages, relative to the key directory (made by the first API replica)."""

_seal_lock = threading.Lock()
_task_keys: dict[str, bytes] = {}
_seal_keys: dict[str, Any] = {}


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"expected base64 text, got {type(text).__name__}")
    return base64.b64decode(text.encode("ascii"), validate=True)


def task_key(key_dir: str | Path, *, create: bool = False) -> bytes:
    """The task-message HMAC key in ``key_dir`` (32 bytes, 0600). ``create`` (API replicas)
    makes it on first use; a worker only reads it. Raises OSError if it is missing."""
    root = str(Path(key_dir).resolve())
    with _seal_lock:
        key = _task_keys.get(root)
        if key is not None:
            return key
        path = Path(root) / TASK_KEY_PATH
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
    """``msg`` with its ``mac`` (HMAC-SHA256 under the data directory's task key)."""
    return {**msg, "mac": _mac(key, task, msg)}


def check_mac(key_dir: str | Path, task: str, msg: dict[str, Any]) -> None:
    """Raise ValueError unless ``msg`` was signed by an API replica sharing this key directory.

    Whoever can write to Redis but cannot read the key directory cannot make a worker decrypt
    a model for their own code."""
    mac = msg.get("mac")
    if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(task_key(key_dir), task, msg)):
        raise ValueError("task message is not signed with this data directory's task key")


def worker_store(settings: Settings) -> StoreSpec:
    """The worker's own view of the shared data directory, its key directory and KEK provider.
    Raises SettingsError if the key directory cannot be found (:func:`marketplace.custody.resolve_key_dir`)."""
    from marketplace.custody import resolve_key_dir

    kek: str | None = None
    if settings.key_provider == "env":
        kek = settings.kek.get_secret_value() if settings.kek is not None else os.environ.get("SOM_KEK")
    return StoreSpec(data_dir=str(settings.data_dir.resolve()), key_provider=settings.key_provider, kek=kek,
                     key_dir=str(resolve_key_dir(settings, create=False)))


def he_evaluate(store: StoreSpec, msg: dict[str, Any]) -> dict[str, Any]:
    """Evaluate one HE request. ``msg``: version_id, model_blob, wrapped_key (b64), aad, keyset_id,
    keyset_blob, plan_json, request (b64). Returns a reply dict (never raises)."""
    try:
        check_mac(store.keys_path(), "som.he_evaluate", msg)
    except (ValueError, OSError) as e:
        log.error("refused an HE task: %s", e)
        return {"ok": False, "kind": "internal", "message": "task message refused (not signed for this data directory)"}
    try:
        task = HETask(
            store=store, version_id=str(msg["version_id"]), model_blob=str(msg["model_blob"]),
            wrapped_key=b64d(msg["wrapped_key"]), aad=str(msg["aad"]), keyset_id=str(msg["keyset_id"]),
            keyset_blob=str(msg["keyset_blob"]), plan_json=str(msg["plan_json"]), request=b64d(msg["request"]),
        )
    except (KeyError, TypeError, ValueError) as e:
        return {"ok": False, "kind": "internal", "message": f"malformed task message ({type(e).__name__})"}
    try:
        return {"ok": True, "out": b64e(run_he_task(task))}
    except ComputeError as e:
        return {"ok": False, "kind": e.kind, "message": e.message}


def _seal_key(key_dir: Path) -> Any:
    from crypto.sealing import SealKeyPair

    with _seal_lock:
        kp = _seal_keys.get(str(key_dir))
        if kp is None:
            kp = SealKeyPair.from_private_bytes((key_dir / JOB_SEAL_KEY_PATH).read_bytes())
            _seal_keys[str(key_dir)] = kp
        return kp


def run_marketplace_job(store: StoreSpec, msg: dict[str, Any]) -> dict[str, Any]:
    """Run one leased marketplace-hosted job. ``msg``: job_id, input_blob, model_blob, wrapped_key
    (b64), aad, format, kind, limits, approved_digest, max_rows, max_sealed_bytes.

    Opens the sealed input with the marketplace's sealing key (``<key_dir>/job_seal.key``),
    decrypts the model in memory, computes, seals the result to the consumer's reply key.
    Returns ``{"ok": True, "out": b64 sealed result}`` or ``{"ok": False, "reason", "message"}``.
    """
    from crypto.envelope import WrappedKey, decrypt_artifact
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
    from marketplace.services.compute import _open_store

    try:
        check_mac(store.keys_path(), "som.run_job", msg)
    except (ValueError, OSError) as e:
        log.error("refused a job task: %s", e)
        return {"ok": False, "reason": "error", "message": "task message refused (not signed for this data directory)"}
    try:
        job_id, kind = str(msg["job_id"]), str(msg["kind"])
        max_rows = msg.get("max_rows")
        blobs, provider = _open_store(store)
        sealed = blobs.get(str(msg["input_blob"]))
        keypair = _seal_key(store.keys_path())
    except (KeyError, TypeError, ValueError, OSError) as e:
        log.error("job task cannot start: %s", type(e).__name__)
        return {"ok": False, "reason": "error", "message": f"the worker cannot read the job ({type(e).__name__})"}
    try:
        inp = open_input(keypair, job_id, sealed, max_size=int(msg["max_sealed_bytes"]))
    except (DecryptionError, ValueError) as e:
        return {"ok": False, "reason": "bad_input", "message": sealed_input_error(e)}
    try:
        wrapped = WrappedKey.from_json(b64d(msg["wrapped_key"]).decode())
        plaintext = decrypt_artifact(blobs.get(str(msg["model_blob"])), wrapped, provider=provider,
                                     aad=str(msg["aad"]).encode())
        try:
            model = load_model(plaintext, str(msg["format"]))
        except (HEError, ValueError):
            return {"ok": False, "reason": "error", "message": "the model artifact was refused by the model loader"}
        del plaintext
        ilim = InputLimits()
        ilim = InputLimits(int(msg.get("max_decompressed_bytes", ilim.max_decompressed)),
                           float(msg.get("max_compression_ratio", ilim.max_ratio)))
        out = run_job(
            model, inp, expected_kind=kind, max_rows=int(max_rows) if max_rows is not None else None,
            approved_digest=msg.get("approved_digest"), limits=Limits.from_dict(dict(msg["limits"])),
            workdir=Path(store.data_dir) / "work", input_limits=ilim,
        )
        return {"ok": True, "out": b64e(seal_result(inp.reply_public, out))}
    except JobFailed as e:
        return {"ok": False, "reason": e.reason, "message": e.message}
    except Exception as e:  # noqa: BLE001 - a worker answers; the job fails, the worker lives
        # the exception's message may quote the consumer's input: log its type and frames only
        log.error("job %s crashed in the worker: %s\n%s", job_id, type(e).__name__,
                  "".join(traceback.format_tb(e.__traceback__)))
        return {"ok": False, "reason": "error", "message": "internal error in the worker"}
