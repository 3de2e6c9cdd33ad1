"""Binary framing of HE requests and responses (serialized CKKS vectors).

For: carrying ciphertexts between consumer and compute site as one octet stream, bound to a
plan by digest, with the sample count visible for metering (``count_samples``). Not for:
ciphertext validity (``evaluate`` checks levels and sizes after deserializing).

Layout (all integers big-endian)::

    magic  "SOMHE" | version u8 (=1) | kind u8 (1 request, 2 response) | layout u8 (0 batch,
    1 single) | plan sha256 (32 bytes) | n_samples u32 | n_ct u32 |
    n_ct x ( length u32 | serialized TenSEAL CKKSVector )

Malformed, truncated or oversized frames raise ValueError, before any HE work.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from crypto.he.plan import Layout, PublicPlan

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "KIND_REQUEST",
    "KIND_RESPONSE",
    "Frame",
    "count_samples",
    "decode",
    "encode",
    "expected_ciphertexts",
    "make_frame",
]

MAGIC = b"SOMHE"
VERSION = 1
KIND_REQUEST = 1
KIND_RESPONSE = 2
_LAYOUT_CODES: dict[str, int] = {"batch": 0, "single": 1}
_HEADER = struct.Struct(">5sBBB32sII")
DEFAULT_MAX_FRAME_BYTES = 1 << 30
MAX_SAMPLES = 1 << 20


@dataclass(frozen=True)
class Frame:
    kind: int
    layout: Layout
    plan_digest: bytes
    n_samples: int
    blobs: tuple[bytes, ...]


def _digest_bytes(plan: PublicPlan) -> bytes:
    return bytes.fromhex(plan.digest().removeprefix("sha256:"))


def expected_ciphertexts(plan: PublicPlan, layout: str, n_samples: int, *, kind: int) -> int:
    """How many ciphertexts a frame for ``n_samples`` carries."""
    if layout == "single":
        return n_samples
    width = plan.input_dim if kind == KIND_REQUEST else plan.output_dim
    return math.ceil(n_samples / plan.slots) * width


def encode(frame: Frame) -> bytes:
    if frame.layout not in _LAYOUT_CODES:
        raise ValueError(f"layout must be batch|single, got {frame.layout!r}")
    head = _HEADER.pack(
        MAGIC,
        VERSION,
        frame.kind,
        _LAYOUT_CODES[frame.layout],
        frame.plan_digest,
        frame.n_samples,
        len(frame.blobs),
    )
    parts = [head]
    for b in frame.blobs:
        parts.append(struct.pack(">I", len(b)))
        parts.append(b)
    return b"".join(parts)


def make_frame(plan: PublicPlan, *, kind: int, layout: Layout, n_samples: int, blobs: list[bytes]) -> bytes:
    return encode(Frame(kind, layout, _digest_bytes(plan), n_samples, tuple(blobs)))


def decode(
    data: bytes,
    plan: PublicPlan,
    *,
    kind: int,
    max_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> Frame:
    """Parse and size-check a frame for ``plan``. Raises TypeError/ValueError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > max_bytes:
        raise ValueError(f"frame too large: {len(data)} bytes > max {max_bytes}")
    if len(data) < _HEADER.size:
        raise ValueError(f"truncated frame: {len(data)} bytes < header {_HEADER.size}")
    magic, version, k, layout_code, digest, n, n_ct = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"expected magic {MAGIC!r} v{VERSION}, got {magic!r} v{version}")
    if k != kind:
        raise ValueError(f"expected frame kind {kind}, got {k}")
    layouts = {v: key for key, v in _LAYOUT_CODES.items()}
    if layout_code not in layouts:
        raise ValueError(f"unknown layout code {layout_code}")
    layout: Layout = layouts[layout_code]  # type: ignore[assignment]
    if layout not in plan.layouts:
        raise ValueError(f"layout {layout!r} not offered by this plan")
    if digest != _digest_bytes(plan):
        raise ValueError("frame was made for a different plan")
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n_samples must be in [1, {MAX_SAMPLES}], got {n}")
    want = expected_ciphertexts(plan, layout, n, kind=kind)
    if n_ct != want:
        raise ValueError(f"expected {want} ciphertexts for {n} samples ({layout}), got {n_ct}")
    off = _HEADER.size
    blobs: list[bytes] = []
    for i in range(n_ct):
        if off + 4 > len(data):
            raise ValueError(f"truncated frame at ciphertext {i}")
        (ln,) = struct.unpack_from(">I", data, off)
        off += 4
        if ln == 0 or off + ln > len(data):
            raise ValueError(f"truncated frame: ciphertext {i} needs {ln} bytes")
        blobs.append(data[off : off + ln])
        off += ln
    if off != len(data):
        raise ValueError(f"trailing garbage: {len(data) - off} bytes after the last ciphertext")
    return Frame(k, layout, digest, n, tuple(blobs))


def count_samples(request: bytes, plan: PublicPlan) -> int:
    """Number of samples in a request (one metered unit each). Raises ValueError if malformed."""
    return decode(request, plan, kind=KIND_REQUEST).n_samples
