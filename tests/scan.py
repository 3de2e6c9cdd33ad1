"""Leak-test helpers: look for recognisable bytes (weights, inputs) where they must not be.

``find_bytes`` greps files and directories (binary-safe, recursive, symlinks not followed) and
in-memory blobs for byte patterns. ``float_patterns`` turns a weight array into the patterns a
leak would leave: raw float32/float64 little-endian bytes of a run of consecutive values, and
their decimal text as ``json.dumps``, ``repr``, CSV, numpy printing or logs would render them.

Typical use::

    hits = find_bytes(float_patterns(weights), paths=[data_dir, db_file, log_file])
    assert hits == []
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["find_bytes", "float_patterns"]

_CHUNK = 1 << 20


def _scan_stream(read, patterns: Sequence[bytes], where: str, hits: list[str]) -> None:
    keep = max(len(p) for p in patterns) - 1
    tail = b""
    offset = 0  # file offset of buf[0]
    found: set[int] = set()
    while True:
        chunk = read(_CHUNK)
        if not chunk:
            break
        buf = tail + chunk
        for i, p in enumerate(patterns):
            if i in found:
                continue
            at = buf.find(p)
            if at >= 0:
                found.add(i)
                hits.append(f"{where}@{offset + at}: pattern {i} ({p[:24]!r})")
        tail = buf[-keep:] if keep else b""
        offset += len(buf) - len(tail)


def find_bytes(
    patterns: Sequence[bytes],
    *,
    paths: Iterable[str | os.PathLike[str]] = (),
    extra_blobs: Iterable[bytes] = (),
) -> list[str]:
    """Where any of ``patterns`` occurs: ``"<path or blob[i]>@<offset>: pattern <n> (...)"``.

    Each pattern is reported at most once per file or blob. Missing paths are skipped
    (a DB or log that was never written leaks nothing). Empty patterns are refused.
    """
    pats = [bytes(p) for p in patterns]
    if not pats or any(len(p) == 0 for p in pats):
        raise ValueError("need at least one pattern, and no empty pattern")
    hits: list[str] = []
    for root in paths:
        root = Path(root)
        if root.is_symlink() or not root.exists():
            continue
        files = [root] if root.is_file() else []
        if root.is_dir():
            for dirpath, _dirs, names in os.walk(root, followlinks=False):
                files.extend(Path(dirpath) / n for n in sorted(names))
        for f in files:
            if f.is_symlink() or not f.is_file():
                continue
            with f.open("rb") as fh:
                _scan_stream(fh.read, pats, str(f), hits)
    for i, blob in enumerate(extra_blobs):
        data = bytes(blob)
        pos = 0

        def read(n: int, _data: bytes = data) -> bytes:
            nonlocal pos
            out = _data[pos : pos + n]
            pos += len(out)
            return out

        _scan_stream(read, pats, f"blob[{i}]", hits)
    return hits


def _text_forms(values: Sequence[float], *, f32: bool) -> list[str]:
    """Single-value decimal renderings: Python repr (JSON), numpy shortest repr, %g, %.6f."""
    out: list[str] = []
    for v in values:
        forms = {repr(float(v)), json.dumps(float(v))}
        if f32:
            forms.add(np.format_float_positional(np.float32(v), unique=True, trim="-"))
            forms.add(str(np.float32(v)))
        forms.add(np.format_float_scientific(np.float64(v), unique=True))
        out.extend(sorted(forms))
    return out


def float_patterns(array: Any, *, run: int = 4, start: int | None = None, min_text_len: int = 9) -> list[bytes]:
    """Byte patterns that would betray a copy of ``array`` (any shape, float dtype).

    Takes ``run`` consecutive values of the flattened array (from ``start``, default the
    middle) and returns: their float32 and float64 little-endian raw bytes, the run joined as
    JSON (``", "``), CSV (``","``) and numpy (``" "``) text, and each value's decimal text when it
    is at least ``min_text_len`` characters long (short ones like ``0.5`` would match by chance).
    Use an array of random-looking values so these are recognisable.
    """
    flat = np.asarray(array).reshape(-1)
    if flat.size < run:
        raise ValueError(f"array must have at least run={run} values, got {flat.size}")
    if start is None:
        start = (flat.size - run) // 2
    values = flat[start : start + run]
    pats: list[bytes] = [
        values.astype("<f4").tobytes(),
        values.astype("<f8").tobytes(),
    ]
    singles32 = [float(np.float32(v)) for v in values]
    singles64 = [float(v) for v in values]
    texts: list[str] = []
    for seq, f32 in ((singles64, False), (singles32, True)):
        for forms in (
            [repr(v) for v in seq],
            [str(np.float32(v)) if f32 else repr(v) for v in seq],
        ):
            for sep in (", ", ",", " "):
                texts.append(sep.join(forms))
        texts.extend(t for t in _text_forms(seq, f32=f32) if len(t) >= min_text_len)
    for t in texts:
        b = t.encode()
        if b not in pats:
            pats.append(b)
    return pats
