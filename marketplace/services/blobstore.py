"""A content-addressed blob store on the local filesystem.

For: keeping large opaque byte strings (envelope-encrypted model artifacts, sealed job payloads,
HE key sets) under a data directory, addressed by ``sha256:<hex>`` of the stored bytes.
Not for: plaintext weights (callers store what :func:`crypto.envelope.encrypt_artifact`
returns), metadata (that is in the DB), or sharing a directory between hosts.

Layout: ``<root>/ab/cd/<64 hex>`` (two fan-out levels), temporary files in ``<root>/.tmp``
(same filesystem, so ``os.replace`` is atomic). Files are 0600 and directories 0700.
Every read re-hashes the bytes: a corrupt or substituted file raises :class:`BlobCorrupt`.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from marketplace.errors import MarketplaceError, NotFound, PayloadTooLarge

__all__ = ["BlobCorrupt", "BlobNotFound", "BlobStore", "parse_address"]

_ADDR = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class BlobNotFound(NotFound):
    """No blob with that address is stored."""


class BlobCorrupt(MarketplaceError):
    """A stored blob no longer hashes to its address (disk corruption or tampering)."""


def parse_address(addr: str) -> str:
    """Return the hex digest of ``sha256:<64 lowercase hex>``. Raises ValueError otherwise."""
    if not isinstance(addr, str):
        raise TypeError(f"blob address must be str, got {type(addr).__name__}")
    m = _ADDR.fullmatch(addr)
    if m is None:
        raise ValueError(f"blob address must look like 'sha256:<64 lowercase hex>', got {addr[:80]!r}")
    return m.group(1)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """Content-addressed blobs under ``root`` (created 0700 if missing).

    ``fsync=False`` skips the flushes (tests, throwaway stores); the default survives a crash.
    """

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._root = Path(root)
        self._fsync = fsync
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._root, 0o700)
        self._tmp = self._root / ".tmp"
        self._tmp.mkdir(mode=0o700, exist_ok=True)

    @property
    def root(self) -> Path:
        return self._root

    def __repr__(self) -> str:
        return f"BlobStore(root={str(self._root)!r})"

    def _path(self, hexdigest: str) -> Path:
        return self._root / hexdigest[:2] / hexdigest[2:4] / hexdigest

    def path_of(self, addr: str) -> Path:
        """Where the blob ``addr`` lives (it may not exist)."""
        return self._path(parse_address(addr))

    def put(self, data: bytes) -> str:
        """Store ``data``; return its address. Idempotent: the same bytes give the same address."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return self.put_stream([bytes(data)])

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> str:
        """Store the concatenation of ``chunks`` without holding it in memory; return its address.

        Raises PayloadTooLarge (and stores nothing) once more than ``max_bytes`` arrived.
        """
        h = hashlib.sha256()
        total = 0
        fd, tmp_name = tempfile.mkstemp(prefix="put-", dir=self._tmp)  # mode 0600
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    if not isinstance(chunk, bytes | bytearray | memoryview):
                        raise TypeError(f"chunks must be bytes, got {type(chunk).__name__}")
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise PayloadTooLarge(f"blob larger than the limit of {max_bytes} bytes")
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                if self._fsync:
                    os.fsync(f.fileno())
            hexdigest = h.hexdigest()
            final = self._path(hexdigest)
            if final.exists():
                tmp.unlink()
            else:
                for d in (final.parent.parent, final.parent):
                    d.mkdir(mode=0o700, exist_ok=True)
                os.replace(tmp, final)
                if self._fsync:
                    _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return "sha256:" + hexdigest

    def get(self, addr: str) -> bytes:
        """The stored bytes. Raises BlobNotFound, or BlobCorrupt if they do not hash to ``addr``."""
        hexdigest = parse_address(addr)
        try:
            data = self._path(hexdigest).read_bytes()
        except FileNotFoundError as e:
            raise BlobNotFound(f"no blob {addr}") from e
        if hashlib.sha256(data).hexdigest() != hexdigest:
            raise BlobCorrupt(f"blob {addr} is corrupt: its bytes no longer hash to its address")
        return data

    def iter_chunks(self, addr: str, *, chunk_size: int = _CHUNK) -> Iterator[bytes]:
        """Stream the blob. The hash is checked at the end: BlobCorrupt after the last chunk."""
        hexdigest = parse_address(addr)
        try:
            f = self._path(hexdigest).open("rb")
        except FileNotFoundError as e:
            raise BlobNotFound(f"no blob {addr}") from e
        h = hashlib.sha256()
        with f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
                yield chunk
        if h.hexdigest() != hexdigest:
            raise BlobCorrupt(f"blob {addr} is corrupt: its bytes no longer hash to its address")

    def exists(self, addr: str) -> bool:
        return self._path(parse_address(addr)).is_file()

    def size(self, addr: str) -> int:
        try:
            return self._path(parse_address(addr)).stat().st_size
        except FileNotFoundError as e:
            raise BlobNotFound(f"no blob {addr}") from e

    def delete(self, addr: str) -> bool:
        """Remove the blob; return whether it was there."""
        try:
            self._path(parse_address(addr)).unlink()
        except FileNotFoundError:
            return False
        return True

    def iter_addresses(self) -> Iterator[str]:
        """Every stored address, in sorted order (temporary files excluded)."""
        for d1 in sorted(self._root.iterdir()):
            if not d1.is_dir() or len(d1.name) != 2:
                continue
            for d2 in sorted(d1.iterdir()):
                if not d2.is_dir():
                    continue
                for f in sorted(d2.iterdir()):
                    if _HEX.fullmatch(f.name) and f.name.startswith(d1.name + d2.name):
                        yield "sha256:" + f.name
