"""The plaintext inside a sealed job input or result, and sealing it (HPKE via crypto.sealing).

For: the consumer (SDK) building and sealing a job input to the compute site's key, the compute
site opening it and sealing the result to the consumer's reply key, and the consumer opening
that. Not for: transport or storage (the marketplace relays the sealed bytes opaquely).

Framing (both directions)::

    MAGIC (8 bytes) || u32 big-endian len(header) || header (UTF-8 JSON object) || body

The input header names the job, its kind, the data format and the consumer's ``reply_public``
key; a ``custom`` input also carries its code (the compute site runs it only if its digest is
the one the provider approved). The result header carries metrics, logs and output names.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from crypto.sealing import SealKeyPair, SealPublicKey, job_info, open_sealed, seal

__all__ = [
    "INPUT_MAGIC",
    "RESULT_MAGIC",
    "JobInput",
    "JobResult",
    "code_digest",
    "open_input",
    "open_result",
    "seal_input",
    "seal_result",
]

INPUT_MAGIC = b"SOMJOBI1"
RESULT_MAGIC = b"SOMJOBR1"
_MAX_HEADER = 1 << 20
FORMATS = ("csv", "npy", "npz")


def code_digest(code: str) -> str:
    """``sha256:<hex>`` of the UTF-8 code a provider approves."""
    return "sha256:" + hashlib.sha256(code.encode("utf-8")).hexdigest()


def _frame(magic: bytes, header: dict[str, Any], body: bytes) -> bytes:
    h = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return magic + len(h).to_bytes(4, "big") + h + body


def _unframe(magic: bytes, data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < len(magic) + 4 or not data.startswith(magic):
        raise ValueError(f"not a job payload: expected prefix {magic!r}, got {data[: len(magic)]!r}")
    n = int.from_bytes(data[len(magic) : len(magic) + 4], "big")
    start = len(magic) + 4
    if n > _MAX_HEADER or start + n > len(data):
        raise ValueError(f"job payload header length {n} is out of range for {len(data)} bytes")
    try:
        header = json.loads(data[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"job payload header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise ValueError(f"job payload header must be a JSON object, got {type(header).__name__}")
    return header, data[start + n :]


@dataclass(frozen=True)
class JobInput:
    """What a consumer sends: data (CSV/NPY/NPZ bytes), its reply key, and code for ``custom``."""

    job_id: str
    kind: str
    reply_public: str
    data: bytes
    format: str = "csv"
    code: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("predict", "evaluate", "custom"):
            raise ValueError(f"kind must be predict, evaluate or custom, got {self.kind!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if (self.kind == "custom") != (self.code is not None):
            raise ValueError("code is required for custom jobs and only for them")
        SealPublicKey.from_text(self.reply_public)


@dataclass(frozen=True)
class JobResult:
    """What a compute site returns: ``body`` (predictions, or a zip of custom outputs) and a header."""

    job_id: str
    kind: str
    body: bytes = b""
    format: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""
    outputs: tuple[str, ...] = ()


def seal_input(compute_public: str | SealPublicKey, job: JobInput) -> bytes:
    header: dict[str, Any] = {
        "job_id": job.job_id,
        "kind": job.kind,
        "reply_public": job.reply_public,
        "format": job.format,
        "params": job.params,
    }
    if job.code is not None:
        header["code"] = job.code
    return seal(compute_public, _frame(INPUT_MAGIC, header, job.data), info=job_info(job.job_id, "input"))


def open_input(keypair: SealKeyPair, job_id: str, blob: bytes, *, max_size: int) -> JobInput:
    """Open and parse a sealed input. Raises DecryptionError (opaque) or ValueError (framing)."""
    header, body = _unframe(INPUT_MAGIC, open_sealed(keypair, blob, info=job_info(job_id, "input"), max_size=max_size))
    if header.get("job_id") != job_id:
        raise ValueError(f"sealed input names job {header.get('job_id')!r}, expected {job_id!r}")
    return JobInput(
        job_id=job_id,
        kind=str(header.get("kind")),
        reply_public=str(header.get("reply_public")),
        data=body,
        format=str(header.get("format", "csv")),
        code=header.get("code"),
        params=dict(header.get("params") or {}),
    )


def seal_result(reply_public: str, result: JobResult) -> bytes:
    header = {
        "job_id": result.job_id,
        "kind": result.kind,
        "format": result.format,
        "metrics": result.metrics,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "outputs": list(result.outputs),
    }
    return seal(reply_public, _frame(RESULT_MAGIC, header, result.body), info=job_info(result.job_id, "result"))


def open_result(keypair: SealKeyPair, job_id: str, blob: bytes, *, max_size: int = 1 << 30) -> JobResult:
    header, body = _unframe(
        RESULT_MAGIC, open_sealed(keypair, blob, info=job_info(job_id, "result"), max_size=max_size)
    )
    if header.get("job_id") != job_id:
        raise ValueError(f"sealed result names job {header.get('job_id')!r}, expected {job_id!r}")
    return JobResult(
        job_id=job_id,
        kind=str(header.get("kind")),
        body=body,
        format=str(header.get("format", "")),
        metrics=dict(header.get("metrics") or {}),
        stdout=str(header.get("stdout", "")),
        stderr=str(header.get("stderr", "")),
        outputs=tuple(header.get("outputs") or ()),
    )
