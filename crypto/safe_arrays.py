"""Bounded, pickle-free reading of ``.npy`` and ``.npz`` bytes from someone else.

For: every ``.npy``/``.npz`` a provider or consumer sends (model layers, job inputs, calibration
data). Everything is decided from metadata **before** any array data is decompressed or read:

* ``.npz``: the zip end record (member count and central-directory size bounded, no zip64, no
  encryption, only stored/deflated members), member names (only the names the caller expects,
  no paths, no duplicates), each member's ``.npy`` header (dtype kind allowed, never object or
  structured, so never pickle), the declared uncompressed size of every member equal to what its
  header implies, the total capped (``max_bytes``) and the compression ratio bounded
  (``max_ratio``); the caller then checks shapes (e.g. rows against the paid units) and only then
  calls :meth:`NpzArchive.read`, which never decompresses past a member's declared size.
* ``.npy``: the header, the same dtype rules, and the data length equal to what the header says.

Arrays are read with ``allow_pickle=False``. Not for: our own trusted outputs, or arrays in
memory. Errors are ``ValueError`` with a precise message that names members, never values.
"""

from __future__ import annotations

import io
import math
import re
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import IO

import numpy as np
import numpy.lib.format as npformat

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_RATIO",
    "NUMERIC_KINDS",
    "ArrayHeader",
    "NpzArchive",
    "inspect_npy",
    "inspect_npz",
    "layer_names",
    "read_npy",
]

#: Default cap on the total uncompressed size of one archive or array (bytes).
DEFAULT_MAX_BYTES = 256 * 2**20
#: Default bound on uncompressed / compressed size for a whole archive.
DEFAULT_MAX_RATIO = 100
#: dtype kinds of plain numbers: float, signed, unsigned, bool.
NUMERIC_KINDS = frozenset("fiub")
_MAX_MEMBERS = 1024
_MAX_CENTRAL_DIR = 256 * 1024
_MAX_HEADER = 4096  # a .npy header of a plain dtype is < 200 bytes
_RATIO_SLACK = 64 * 1024  # tiny archives may compress better than max_ratio
_EOCD = b"PK\x05\x06"
# What zipfile and zlib raise on damaged input (NotImplementedError: a "zip version" it does not
# know; RuntimeError: an encrypted member; struct.error: truncated records).
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    ValueError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    struct.error,
    UnicodeDecodeError,
    OverflowError,
    zlib.error,
)
_ZIP64_LOCATOR = b"PK\x06\x07"


@dataclass(frozen=True)
class ArrayHeader:
    """What a ``.npy`` header declares; ``offset`` is where the data starts, ``nbytes`` its size."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    offset: int
    nbytes: int


def _header(fp: IO[bytes], name: str, kinds: Collection[str]) -> ArrayHeader:
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=_MAX_HEADER)
        else:
            raise ValueError(f"npy version {version} is not supported (expected 1.0 or 2.0)")
    except (*_ZIP_ERRORS, SyntaxError, TypeError, KeyError, AttributeError, RecursionError, tokenize.TokenError) as e:
        raise ValueError(f"{name or 'array'}: not a valid .npy header") from e
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in kinds:
        raise ValueError(
            f"{name or 'array'}: dtype {dtype.str!r} is refused (allowed kinds: {''.join(sorted(kinds))}; "
            "never object arrays, which need pickle, nor structured ones)"
        )
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) > 8:
        raise ValueError(f"{name or 'array'}: bad shape in the .npy header")
    offset = int(fp.tell())  # where the data starts: after the magic, length field and header text
    nbytes = math.prod(shape) * dtype.itemsize
    return ArrayHeader(name, tuple(int(d) for d in shape), dtype, bool(fortran), int(offset), int(nbytes))


def inspect_npy(
    data: bytes, *, kinds: Collection[str] = NUMERIC_KINDS, max_bytes: int = DEFAULT_MAX_BYTES
) -> ArrayHeader:
    """Check a ``.npy`` from its header without reading the data.

    Raises ValueError: not an ``.npy`` (an ``.npz`` is refused too), refused dtype, data size over
    ``max_bytes``, or a data length that is not what the header declares.
    """
    if data[:2] == b"PK":
        raise ValueError("expected a single .npy array, got an .npz archive")
    h = _header(io.BytesIO(data), "", kinds)
    if h.nbytes > max_bytes:
        raise ValueError(f"array of {h.nbytes} bytes exceeds the limit of {max_bytes} bytes")
    if len(data) != h.offset + h.nbytes:
        raise ValueError(f"the .npy data is {len(data) - h.offset} bytes; its header declares {h.nbytes}")
    return h


def read_npy(data: bytes, header: ArrayHeader) -> np.ndarray:
    """The array of an ``.npy`` checked by :func:`inspect_npy` (a copy, without pickle)."""
    flat = np.frombuffer(data, dtype=header.dtype, count=math.prod(header.shape), offset=header.offset)
    return flat.reshape(header.shape, order="F" if header.fortran_order else "C").copy()


def _end_record(data: bytes) -> tuple[int, int]:
    """(member count, central-directory size) from the zip end record (APPNOTE 4.3.16)."""
    at = data.rfind(_EOCD, max(0, len(data) - 22 - 0xFFFF))
    if at < 0 or len(data) - at < 22:
        raise ValueError("not a valid .npz archive (no zip end record)")
    if at >= 20 and data[at - 20 : at - 16] == _ZIP64_LOCATOR:
        raise ValueError("zip64 archives are refused")
    _, _, _, count, cd_size, _, _ = struct.unpack("<HHHHIIH", data[at + 4 : at + 22])
    return int(count), int(cd_size)


Names = Collection[str] | Callable[[str], bool]


class NpzArchive:
    """An ``.npz`` whose metadata passed :func:`inspect_npz`; ``headers`` maps array name -> header."""

    def __init__(self, zf: zipfile.ZipFile, headers: dict[str, ArrayHeader], infos: dict[str, zipfile.ZipInfo]) -> None:
        self._zf = zf
        self.headers = headers
        self._infos = infos

    @property
    def names(self) -> list[str]:
        return list(self.headers)

    def read(self, name: str) -> np.ndarray:
        """Decompress and read one member (at most its declared size). Raises KeyError, ValueError."""
        h = self.headers[name]
        try:
            with self._zf.open(self._infos[name]) as fp:
                arr = npformat.read_array(fp, allow_pickle=False, max_header_size=_MAX_HEADER)
        except _ZIP_ERRORS as e:
            raise ValueError(f"{name}: the member's data is damaged") from e
        if not isinstance(arr, np.ndarray) or arr.shape != h.shape or arr.dtype != h.dtype:
            raise ValueError(f"{name}: the member's data does not match its header")
        return arr


def inspect_npz(
    data: bytes,
    *,
    names: Names,
    required: Collection[str] = (),
    kinds: Collection[str] | Callable[[str], Collection[str]] = NUMERIC_KINDS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> NpzArchive:
    """Check an ``.npz`` from its metadata only (see the module docstring); nothing is decompressed
    but the ``.npy`` headers.

    ``names`` are the allowed array names (without ``.npy``), as a collection or a predicate;
    ``required`` must all be present; ``kinds`` the allowed dtype kinds (or a function of the name).
    Raises ValueError naming the first problem.
    """
    if not data:
        raise ValueError("empty .npz archive")
    count, cd_size = _end_record(data)
    if count > _MAX_MEMBERS or cd_size > _MAX_CENTRAL_DIR:
        raise ValueError(f"the archive lists too many members (at most {_MAX_MEMBERS})")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except _ZIP_ERRORS as e:
        raise ValueError("not a valid .npz archive") from e
    infos = zf.infolist()
    if len(infos) > _MAX_MEMBERS:
        raise ValueError(f"the archive lists too many members (at most {_MAX_MEMBERS})")
    allowed: Callable[[str], bool] = names if callable(names) else frozenset(names).__contains__
    seen: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        fname = info.filename
        base = fname[:-4] if fname.endswith(".npy") else None
        if base is None or "/" in fname or "\\" in fname or ".." in fname or "\x00" in fname or not allowed(base):
            raise ValueError(f"unexpected archive member {fname[:80]!r}")
        if base in seen:
            raise ValueError(f"duplicate archive member {fname[:80]!r}")
        if info.flag_bits & 0x1:
            raise ValueError(f"{base}: encrypted members are refused")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ValueError(f"{base}: only stored or deflated members are accepted")
        total += info.file_size
        if total > max_bytes:
            raise ValueError(f"the archive declares more than {max_bytes} uncompressed bytes")
        seen[base] = info
    if total > _RATIO_SLACK and total > max_ratio * len(data):
        raise ValueError(f"the archive's compression ratio exceeds {max_ratio:g}:1")
    missing = [r for r in required if r not in seen]
    if missing:
        raise ValueError(f"the archive lacks {', '.join(sorted(missing))}")
    headers: dict[str, ArrayHeader] = {}
    for base, info in seen.items():
        k = kinds(base) if callable(kinds) else kinds
        try:
            fp = zf.open(info)
        except _ZIP_ERRORS as e:
            raise ValueError(f"{base}: damaged archive member") from e
        with fp:
            h = _header(fp, base, k)  # raises its own precise ValueError
        if h.offset + h.nbytes != info.file_size:
            raise ValueError(
                f"{base}: declared size {info.file_size} does not match its header ({h.offset + h.nbytes})"
            )
        headers[base] = h
    return NpzArchive(zf, headers, seen)


def layer_names(base: str) -> bool:
    """The member names of the ``som-layers-v1`` model format: ``layer{i}.weight|bias|activation``."""
    return re.fullmatch(r"layer(0|[1-9][0-9]{0,3})\.(weight|bias|activation)", base) is not None
