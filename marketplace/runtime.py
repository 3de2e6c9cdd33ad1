"""The service's runtime: settings, DB engine and sessions, blob store, key provider, log files.

The secret keys live in :attr:`Runtime.key_dir`, outside the data directory (:mod:`marketplace.custody`).

Built by :func:`marketplace.api.app.create_app` (never at import time) and shared by routes and
workers. Everything with a lifetime hangs off one :class:`Runtime`, as a typed attribute: the
ledger's log signer and background :class:`~marketplace.services.ledger.Checkpointer` among them
(started and stopped by ``create_app``'s lifespan, the one place lifecycles are wired).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from crypto.keyproviders import EnvKeyProvider, KeyProvider, LocalFileKeyProvider
from crypto.note import NoteSigner
from marketplace.custody import (
    KEK_FILE,
    LOG_KEY_FILE,
    private_file,
    resolve_key_dir,
    tighten_db_files,
)
from marketplace.db.session import make_engine, make_sessionmaker, upgrade
from marketplace.services.auth_failures import FailureSummaries
from marketplace.services.auth_throttle import FailureThrottle
from marketplace.services.blobstore import BlobStore
from marketplace.services.ledger.checkpoints import Checkpointer, load_log_signer
from marketplace.settings import Settings

__all__ = ["Runtime"]

log = logging.getLogger("som")


class Runtime:
    """Owns the engine, the session factory and the data directory's files."""

    def __init__(self, settings: Settings, *, migrate: bool = True) -> None:
        settings.check_secrets()
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key_dir: Path = resolve_key_dir(settings, create=True)
        (self.data_dir / "logs").mkdir(exist_ok=True, mode=0o700)
        private_file(self.log_path)
        tighten_db_files(settings.resolved_database_url())
        self.engine: Engine = make_engine(settings.resolved_database_url())
        if migrate:
            upgrade(self.engine)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self._closers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        #: Still used by services/jobs.py, agents.py (helper ``jobs``), compute.py and
        #: worker/dispatch.py (helper ``compute``) until those parts give their state typed
        #: attributes; nothing of the wiring part is kept here.
        self.extras: dict[str, Any] = {}
        self._blobs: BlobStore | None = None
        self._keys: KeyProvider | None = None
        # -- issue 11, wiring: the ledger ------------------------------------------------
        self._log_signer: NoteSigner | None = None
        #: Signs checkpoints in the background; ``create_app`` starts and stops it.
        self.checkpointer = Checkpointer(self, self.sessions)
        # -- issue 11, wiring: authentication failures (api/deps.py, services/auth_failures.py) --
        #: Failed-authentication counters of this process (429 with ``Retry-After``).
        self.auth_throttle = FailureThrottle(
            per_client=settings.auth_fail_max_per_client,
            per_prefix=settings.auth_fail_max_per_prefix,
            window=settings.auth_fail_window_seconds,
        )
        #: Summarises failed authentications per client and window; its thread starts on the
        #: first failure and stops (flushing) with :meth:`close`.
        self.auth_failures = FailureSummaries(self)
        self.on_close(self.auth_failures.close)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One short transaction. Never hold one across a long computation."""
        with self.sessions() as session, session.begin():
            yield session

    @property
    def blobs(self) -> BlobStore:
        if self._blobs is None:
            self._blobs = BlobStore(self.data_dir / "blobs")
        return self._blobs

    @property
    def key_provider(self) -> KeyProvider:
        if self._keys is None:
            if self.settings.key_provider == "env":
                env = dict(os.environ)
                if self.settings.kek is not None:
                    env["SOM_KEK"] = self.settings.kek.get_secret_value()
                self._keys = EnvKeyProvider(environ=env)
            else:
                self._keys = LocalFileKeyProvider(self.key_dir / KEK_FILE)
        return self._keys

    # -- issue 11, wiring: the ledger ----------------------------------------------------

    @property
    def log_signer(self) -> NoteSigner:
        """The log's Ed25519 note signer (``<key_dir>/log.key``, loaded or created once)."""
        if self._log_signer is None:
            with self._lock:
                if self._log_signer is None:
                    self._log_signer = load_log_signer(self.key_dir / LOG_KEY_FILE, self.settings.log_origin)
        return self._log_signer

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception:  # pragma: no cover - best effort shutdown
                log.exception("error while closing runtime")
        self._closers.clear()
        self.engine.dispose()

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "som.log"
