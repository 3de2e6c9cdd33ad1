"""The service's runtime: settings, DB engine and sessions, blob store, key provider, log files.

The secret keys live in :attr:`Runtime.key_dir`, outside the data directory (:mod:`marketplace.custody`).

Built by :func:`marketplace.api.app.create_app` (never at import time) and shared by routes and
workers. Everything with a lifetime hangs off one :class:`Runtime`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from marketplace.compute.store import StoreSpec
from marketplace.db.session import make_engine, make_sessionmaker, upgrade
from marketplace.settings import Settings

if TYPE_CHECKING:
    from crypto.sealing import SealKeyPair
    from marketplace.compute.executor import Executor
    from marketplace.services.jobs.background import Background
    from marketplace.services.leases import Bell

__all__ = ["Runtime"]

log = logging.getLogger("som")


class Runtime:
    """Owns the engine, the session factory and the data directory's files."""

    def __init__(self, settings: Settings, *, migrate: bool = True) -> None:
        settings.check_secrets()
        self.settings = settings
        from marketplace.custody import private_file, resolve_key_dir, tighten_db_files

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
        self.extras: dict[str, Any] = {}
        self._blobs: Any = None
        self._keys: Any = None
        # -- jobs and agent work (issue 11, part `jobs`): the wake-up bells of lease waiters
        # (services.leases.bell), the marketplace's sealing key (services.jobs.sitekey) and the
        # sweeper/worker threads (services.jobs.background.ensure_background).
        self.bells: dict[str, Bell] = {}
        self.job_seal_key: SealKeyPair | None = None
        self.job_threads: Background | None = None
        self.job_threads_lock = threading.Lock()
        # -- issue 11 step 3 (compute site): where computations run, chosen once from settings
        self.store_spec: StoreSpec = StoreSpec.from_settings(settings, data_dir=self.data_dir, key_dir=self.key_dir)
        self._executor: Executor | None = None
        self._executor_lock = threading.Lock()
        self.on_close(self.shutdown_executor)

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One short transaction. Never hold one across a long computation."""
        with self.sessions() as session, session.begin():
            yield session

    @property
    def blobs(self) -> Any:
        if self._blobs is None:
            from marketplace.services.blobstore import BlobStore

            self._blobs = BlobStore(self.data_dir / "blobs")
        return self._blobs

    @property
    def key_provider(self) -> Any:
        if self._keys is None:
            if self.settings.key_provider == "env":
                from crypto.keyproviders import EnvKeyProvider

                env = dict(os.environ)
                if self.settings.kek is not None:
                    env["SOM_KEK"] = self.settings.kek.get_secret_value()
                self._keys = EnvKeyProvider(environ=env)
            else:
                from crypto.keyproviders import LocalFileKeyProvider
                from marketplace.custody import KEK_FILE

                self._keys = LocalFileKeyProvider(self.key_dir / KEK_FILE)
        return self._keys

    # -- issue 11 step 3 (compute site) ------------------------------------------------------

    @property
    def executor(self) -> Executor:
        """The one executor of ``settings.job_backend`` (built on first use; nothing starts until
        a computation is sent to it)."""
        with self._executor_lock:
            if self._executor is None:
                # start-up cost: the executor loads TenSEAL (and Celery for the celery backend)
                from marketplace.compute.executor import make_executor

                self._executor = make_executor(self.settings, store=self.store_spec)
            return self._executor

    def shutdown_executor(self) -> None:
        """Stop the executor's workers (when the app stops; the next computation makes a new one)."""
        with self._executor_lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown()

    # -- end of issue 11 step 3 -------------------------------------------------------------

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
