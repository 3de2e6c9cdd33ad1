"""Key-encryption-key (KEK) providers for envelope encryption.

For: wrapping and unwrapping the per-artifact data keys (DEKs) of :mod:`crypto.envelope` under
a KEK that lives somewhere else than the data: a local 0600 keyring file, an environment variable,
or (by implementing :class:`KeyProvider`) a cloud KMS or HSM.
Not for: encrypting data itself (use :mod:`crypto.envelope`), or storing anything but KEKs.

Wrapping algorithm of the local providers: ``A256GCMKW`` (AES-256-GCM key wrap, the JWA name,
RFC 7518 §4.7): ``wrapped = nonce(12) || AES-256-GCM(KEK, nonce, DEK, aad)``. Unlike AES key
wrap (RFC 3394/5649), GCM takes associated data, so a wrapped DEK is bound to the artifact it
belongs to and to the KEK id: it cannot be swapped onto another artifact's row.

A cloud KMS provider implements the same three members and never sees a blob::

    class AwsKmsKeyProvider:                      # sketch, not shipped
        def __init__(self, client, key_arn: str) -> None:
            self._client, self.kek_id = client, "aws-kms:" + key_arn

        def wrap(self, dek: bytes, *, aad: bytes) -> bytes:
            out = self._client.encrypt(KeyId=self.kek_id[8:], Plaintext=dek,
                                       EncryptionContext={"som-aad": aad.hex()})
            return out["CiphertextBlob"]

        def unwrap(self, wrapped: bytes, *, kek_id: str, aad: bytes) -> bytes:
            try:
                out = self._client.decrypt(KeyId=kek_id[8:], CiphertextBlob=wrapped,
                                           EncryptionContext={"som-aad": aad.hex()})
            except ClientError as e:
                raise DecryptionError("data key did not unwrap") from e
            return out["Plaintext"]

Key bytes never appear in ``repr()`` or in exception messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto.errors import DecryptionError, KeyMaterialError

__all__ = [
    "WRAP_ALG",
    "EnvKeyProvider",
    "KeyProvider",
    "LocalFileKeyProvider",
    "generate_kek_text",
]

log = logging.getLogger(__name__)

WRAP_ALG = "A256GCMKW"
_KEK_LEN = 32
_NONCE_LEN = 12
_TAG_LEN = 16
_KEYRING_FORMAT = "som-keyring/v1"
_WRAP_DOMAIN = b"som/kek-wrap/v1\x00"


@runtime_checkable
class KeyProvider(Protocol):
    """Wraps data keys under a KEK it holds (or reaches) and unwraps them again.

    ``kek_id`` is the id of the KEK that :meth:`wrap` uses now. :meth:`unwrap` takes the id
    recorded next to the wrapped key, so a provider holding several KEKs (a keyring) can
    unwrap keys wrapped before a rotation.
    """

    @property
    def kek_id(self) -> str: ...

    def wrap(self, dek: bytes, *, aad: bytes) -> bytes:
        """Return ``dek`` encrypted under the active KEK, bound to ``aad``."""
        ...

    def unwrap(self, wrapped: bytes, *, kek_id: str, aad: bytes) -> bytes:
        """Return the DEK. Raises DecryptionError if it does not authenticate,
        KeyMaterialError if this provider holds no KEK named ``kek_id``."""
        ...


def generate_kek_text(rng: Callable[[int], bytes] = os.urandom) -> str:
    """A fresh 32-byte KEK as base64, the form :class:`EnvKeyProvider` reads."""
    return base64.b64encode(_check_rng_output(rng(_KEK_LEN))).decode()


def _check_rng_output(raw: bytes) -> bytes:
    if not isinstance(raw, bytes) or len(raw) != _KEK_LEN:
        raise ValueError(f"rng must return {_KEK_LEN} bytes")
    return raw


def _fingerprint(key: bytes) -> str:
    """A short public id derived from a key (SHA-256 of a domain-separated key, 64 bits)."""
    return hashlib.sha256(b"som/kek-id/v1\x00" + key).hexdigest()[:16]


def _bound_aad(kek_id: str, aad: bytes) -> bytes:
    kid = kek_id.encode()
    return _WRAP_DOMAIN + len(kid).to_bytes(2, "big") + kid + aad


def _gcm_wrap(kek: bytes, kek_id: str, dek: bytes, aad: bytes, rng: Callable[[int], bytes]) -> bytes:
    _check_bytes("dek", dek)
    _check_bytes("aad", aad)
    nonce = rng(_NONCE_LEN)
    if len(nonce) != _NONCE_LEN:
        raise ValueError(f"rng must return {_NONCE_LEN} bytes, got {len(nonce)}")
    return nonce + AESGCM(kek).encrypt(nonce, dek, _bound_aad(kek_id, aad))


def _gcm_unwrap(kek: bytes, kek_id: str, wrapped: bytes, aad: bytes) -> bytes:
    _check_bytes("wrapped", wrapped)
    _check_bytes("aad", aad)
    if len(wrapped) < _NONCE_LEN + _TAG_LEN:
        raise DecryptionError("data key did not unwrap")
    nonce, body = wrapped[:_NONCE_LEN], wrapped[_NONCE_LEN:]
    try:
        return AESGCM(kek).decrypt(nonce, body, _bound_aad(kek_id, aad))
    except InvalidTag as e:
        raise DecryptionError("data key did not unwrap") from e


def _check_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")


class EnvKeyProvider:
    """One KEK read from an environment variable holding base64 of 32 random bytes.

    Generate one with ``python -c "from crypto.keyproviders import generate_kek_text as g;
    print(g())"``. ``environ`` defaults to ``os.environ`` (a parameter for tests). The KEK id is
    ``env:<fingerprint>`` unless given, so a wrong key shows up as an unknown KEK id.
    """

    __slots__ = ("_key", "_kek_id", "_var", "_rng")

    def __init__(
        self,
        var: str = "SOM_KEK",
        *,
        environ: Mapping[str, str] | None = None,
        kek_id: str | None = None,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        env = os.environ if environ is None else environ
        text = env.get(var)
        if not text:
            raise KeyMaterialError(
                f"environment variable {var} is not set; set it to base64 of 32 random bytes "
                "(crypto.keyproviders.generate_kek_text())"
            )
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise KeyMaterialError(f"environment variable {var} is not valid base64") from e
        if len(key) != _KEK_LEN:
            raise KeyMaterialError(f"environment variable {var} must decode to {_KEK_LEN} bytes, got {len(key)}")
        self._key = key
        self._var = var
        self._kek_id = kek_id if kek_id is not None else "env:" + _fingerprint(key)
        self._rng = rng

    @property
    def kek_id(self) -> str:
        return self._kek_id

    def wrap(self, dek: bytes, *, aad: bytes) -> bytes:
        return _gcm_wrap(self._key, self._kek_id, dek, aad, self._rng)

    def unwrap(self, wrapped: bytes, *, kek_id: str, aad: bytes) -> bytes:
        if kek_id != self._kek_id:
            raise KeyMaterialError(
                f"KEK {kek_id!r} is not available (environment variable {self._var} holds {self._kek_id!r})"
            )
        return _gcm_unwrap(self._key, kek_id, wrapped, aad)

    def __repr__(self) -> str:
        return f"EnvKeyProvider(var={self._var!r}, kek_id={self._kek_id!r})"


class LocalFileKeyProvider:
    """A keyring of KEKs in a local JSON file with mode 0600.

    The file holds every KEK ever made active that has not been retired, and which one is
    active. :meth:`rotate` adds a new active KEK; old ones still unwrap until :meth:`retire`
    removes them (after :func:`crypto.envelope.rewrap` moved every DEK to the new one).
    The constructor loads the file, creating it with one fresh KEK if it does not exist and
    ``create_if_missing`` (the default, so a first run just works; logged at INFO);
    :meth:`create` only makes a new one.

    Raises KeyMaterialError if the file is missing, malformed, a symlink, or readable or
    writable by group or others (fix with ``chmod 600 <file>``).

    Several processes share one keyring (API replicas, compute workers, ``som admin rotate-kek``):
    :meth:`rotate` and :meth:`retire` hold an exclusive lock (``flock`` on the file's directory) and
    re-read the file inside it, so two rotations never drop each other's key; a running process
    re-reads the file when it changed (on each wrap: one ``stat``) or when asked to unwrap under
    a KEK id it does not know yet, so it picks up a rotation without a restart.
    """

    __slots__ = ("_path", "_keys", "_active", "_rng", "_stamp", "_mu")

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create_if_missing: bool = True,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._path = Path(path)
        self._rng = rng
        self._keys: dict[str, bytes] = {}
        self._active = ""
        self._stamp: tuple[int, ...] = ()
        self._mu = threading.Lock()
        if create_if_missing and not os.path.lexists(self._path):
            try:
                self._create_file(self._path, rng)
                log.info("created a new KEK keyring at %s", self._path)
            except KeyMaterialError:
                pass  # another process created it first: load theirs
        self._load()

    @classmethod
    def create(cls, path: str | os.PathLike[str], *, rng: Callable[[int], bytes] = os.urandom) -> LocalFileKeyProvider:
        """Create a keyring file with one fresh KEK. Refuses to overwrite an existing file."""
        p = Path(path)
        cls._create_file(p, rng)
        return cls(p, create_if_missing=False, rng=rng)

    @staticmethod
    def _create_file(p: Path, rng: Callable[[int], bytes]) -> None:
        key = _check_rng_output(rng(_KEK_LEN))
        kid = "local:" + _fingerprint(key)
        data = _dump(kid, {kid: key})
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError as e:
            raise KeyMaterialError(f"key file {p} already exists; refusing to overwrite it") from e
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    @property
    def kek_id(self) -> str:
        return self._active

    @property
    def path(self) -> Path:
        return self._path

    def kek_ids(self) -> tuple[str, ...]:
        """Ids of every KEK in the keyring (the active one included), in file order."""
        return tuple(self._keys)

    def wrap(self, dek: bytes, *, aad: bytes) -> bytes:
        return self.wrap_with_id(dek, aad=aad)[1]

    def wrap_with_id(self, dek: bytes, *, aad: bytes) -> tuple[str, bytes]:
        """Wrap under the active KEK of the file as it is now; ``(its id, wrapped DEK)``."""
        self.refresh()
        with self._mu:
            active, key = self._active, self._keys[self._active]
        return active, _gcm_wrap(key, active, dek, aad, self._rng)

    def unwrap(self, wrapped: bytes, *, kek_id: str, aad: bytes) -> bytes:
        key = self._keys.get(kek_id)
        if key is None:
            self.refresh()  # rotated by another process since we read the file?
            key = self._keys.get(kek_id)
        if key is None:
            raise KeyMaterialError(f"KEK {kek_id!r} is not in key file {self._path} (retired or another keyring?)")
        return _gcm_unwrap(key, kek_id, wrapped, aad)

    def refresh(self) -> bool:
        """Re-read the file if it changed since it was read (inode, mtime, size); whether it did."""
        try:
            st = os.stat(self._path, follow_symlinks=False)
        except FileNotFoundError as e:
            raise KeyMaterialError(f"key file {self._path} is gone") from e
        if _stamp(st) == self._stamp:
            return False
        self._load()
        return True

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on the keyring across processes: ``flock`` on its directory (the file
        itself is replaced on every write, so a lock on it would not exclude the next writer)."""
        fd = os.open(self._path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def rotate(self) -> str:
        """Add a fresh KEK, make it active, write the file atomically; return its id. Under the
        keyring lock, from the file as it is now (another process may have rotated meanwhile)."""
        with self._locked():
            self._load()
            key = _check_rng_output(self._rng(_KEK_LEN))
            kid = "local:" + _fingerprint(key)
            keys = dict(self._keys)
            keys[kid] = key
            self._write(kid, keys)
        return kid

    def retire(self, kek_id: str) -> None:
        """Remove a non-active KEK. Whatever it wrapped can no longer be unwrapped."""
        with self._locked():
            self._load()
            if kek_id not in self._keys:
                raise ValueError(f"no KEK {kek_id!r} in {self._path}; have {list(self._keys)}")
            if kek_id == self._active:
                raise ValueError(f"KEK {kek_id!r} is active; rotate before retiring it")
            keys = {k: v for k, v in self._keys.items() if k != kek_id}
            self._write(self._active, keys)

    def _write(self, active: str, keys: dict[str, bytes]) -> None:
        data = _dump(active, keys)
        fd, tmp = tempfile.mkstemp(prefix=".keyring-", dir=self._path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        with self._mu:
            self._keys, self._active = keys, active
            self._stamp = _stamp(os.stat(self._path, follow_symlinks=False))

    def _load(self) -> None:
        p = self._path
        try:
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError as e:
            raise KeyMaterialError(f"key file {p} does not exist; create it with LocalFileKeyProvider.create()") from e
        except OSError as e:  # ELOOP: a symlink
            raise KeyMaterialError(f"key file {p} cannot be opened safely: {e.strerror}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyMaterialError(f"key file {p} is not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise KeyMaterialError(
                    f"key file {p} has mode {mode:04o}: readable or writable by group/others; "
                    f"expected 0600 (run: chmod 600 {p})"
                )
            raw = b""
            while chunk := os.read(fd, 65536):
                raw += chunk
        finally:
            os.close(fd)
        active, keys = _parse(raw, p)
        with self._mu:
            self._active, self._keys, self._stamp = active, keys, _stamp(st)

    def __repr__(self) -> str:
        return f"LocalFileKeyProvider(path={str(self._path)!r}, active={self._active!r}, keys={len(self._keys)})"


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes when the keyring file is replaced or rewritten."""
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _dump(active: str, keys: dict[str, bytes]) -> bytes:
    doc = {
        "format": _KEYRING_FORMAT,
        "active": active,
        "keys": [{"id": k, "alg": WRAP_ALG, "key": base64.b64encode(v).decode()} for k, v in keys.items()],
    }
    return json.dumps(doc, indent=2).encode() + b"\n"


def _parse(raw: bytes, p: Path) -> tuple[str, dict[str, bytes]]:
    bad = KeyMaterialError(f"key file {p} is not a {_KEYRING_FORMAT} keyring")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad from e
    if not isinstance(doc, dict) or doc.get("format") != _KEYRING_FORMAT:
        raise bad
    entries = doc.get("keys")
    active = doc.get("active")
    if not isinstance(entries, list) or not isinstance(active, str):
        raise bad
    keys: dict[str, bytes] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise bad
        try:
            key = base64.b64decode(str(entry.get("key", "")), validate=True)
        except (binascii.Error, ValueError) as e:
            raise bad from e
        if len(key) != _KEK_LEN or entry.get("alg") != WRAP_ALG:
            raise bad
        keys[entry["id"]] = key
    if active not in keys:
        raise KeyMaterialError(f"key file {p}: active KEK {active!r} is not in the keyring")
    return active, keys
