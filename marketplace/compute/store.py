"""Opening a compute site's blob store, KEK provider and job sealing key: one way, from one spec.

For: :class:`StoreSpec`, the picklable (and JSON-free: it never travels over Redis) description
of where a compute site finds the shared data directory's blob store and *its own* key directory,
and :func:`open_store` / :func:`job_seal_key`, the only code that turns a spec into a
:class:`~marketplace.services.blobstore.BlobStore`, a KEK provider and the marketplace's job
sealing key pair. The local process pool, the local job threads and the Celery workers all open
their stores here (cached per spec and per process). :meth:`StoreSpec.from_settings` builds the
spec from settings (the API replica and ``som worker`` alike).

Not for: the API process's own blob store and KEK provider (:attr:`marketplace.runtime.Runtime.blobs`,
which may create a fresh KEK on first upload; a compute site never creates one), or making the job
sealing key (:func:`marketplace.services.jobs.marketplace_seal_key` makes it when the first job
names its compute site; a compute site only reads it).

A KEK (``SOM_KEK``) sits in the spec only for ``key_provider == "env"`` and is never shown by
``repr``.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from crypto.keyproviders import EnvKeyProvider, KeyProvider, LocalFileKeyProvider
from crypto.sealing import SealKeyPair
from marketplace.custody import KEK_FILE, SEAL_KEY_FILE
from marketplace.services.blobstore import BlobStore
from marketplace.settings import Settings

__all__ = ["StoreSpec", "job_seal_key", "open_store"]


@dataclass(frozen=True)
class StoreSpec:
    """How a compute site opens the data directory's blob store and its KEK provider."""

    data_dir: str
    key_provider: str  # "local" | "env"
    kek: str | None = None  # base64 KEK when key_provider == "env" (never logged)
    key_dir: str = ""  # the key directory (marketplace.custody); "" = <data_dir>/keys (unsafe dev layout)

    @classmethod
    def from_settings(cls, settings: Settings, *, data_dir: Path, key_dir: Path) -> StoreSpec:
        """The spec of ``settings``: the KEK of ``SOM_KEK`` (settings, else the environment) for
        the ``env`` provider; ``data_dir`` and ``key_dir`` as resolved by the caller."""
        kek: str | None = None
        if settings.key_provider == "env":
            kek = settings.kek.get_secret_value() if settings.kek is not None else os.environ.get("SOM_KEK")
        return cls(data_dir=str(data_dir), key_provider=settings.key_provider, kek=kek, key_dir=str(key_dir))

    def keys_path(self) -> Path:
        """The key directory: ``key_dir``, or ``<data_dir>/keys`` when it is empty."""
        return Path(self.key_dir) if self.key_dir else Path(self.data_dir) / "keys"

    @property
    def workdir(self) -> Path:
        """Where job computations may make scratch directories (``<data_dir>/work``)."""
        return Path(self.data_dir) / "work"

    def __repr__(self) -> str:
        return f"StoreSpec(data_dir={self.data_dir!r}, key_provider={self.key_provider!r}, key_dir={self.key_dir!r})"


_lock = threading.Lock()
_stores: dict[StoreSpec, tuple[BlobStore, KeyProvider]] = {}
_seal_keys: dict[str, SealKeyPair] = {}


def open_store(spec: StoreSpec) -> tuple[BlobStore, KeyProvider]:
    """The blob store and KEK provider of ``spec`` (opened once per process). Never creates a KEK:
    raises :class:`crypto.errors.KeyMaterialError` if it is missing."""
    with _lock:
        hit = _stores.get(spec)
        if hit is not None:
            return hit
        provider: KeyProvider
        if spec.key_provider == "env":
            provider = EnvKeyProvider(environ={"SOM_KEK": spec.kek or ""})
        else:
            provider = LocalFileKeyProvider(spec.keys_path() / KEK_FILE, create_if_missing=False)
        pair = (BlobStore(Path(spec.data_dir) / "blobs"), provider)
        _stores[spec] = pair
        return pair


def job_seal_key(spec: StoreSpec) -> SealKeyPair:
    """The marketplace's job sealing key pair (``<key_dir>/job_seal.key``), read once per process.
    Raises OSError if it is missing (the API replica makes it), ValueError if it is malformed."""
    path = spec.keys_path() / SEAL_KEY_FILE
    with _lock:
        kp = _seal_keys.get(str(path))
        if kp is None:
            kp = SealKeyPair.from_private_bytes(path.read_bytes())
            _seal_keys[str(path)] = kp
        return kp
