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
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from crypto.keyproviders import EnvKeyProvider, KeyProvider, LocalFileKeyProvider
from crypto.note import NoteSigner
from marketplace.compute.store import StoreSpec
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

if TYPE_CHECKING:
    from crypto.sealing import SealKeyPair
    from marketplace.compute.executor import Executor
    from marketplace.compute.gateway import GatewayPool
    from marketplace.services.gateway import Batcher, TargetCache
    from marketplace.services.gateway_hub import Hub
    from marketplace.services.jobs.background import Background
    from marketplace.services.leases import Bell

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
        # -- the inference gateway (docs/gateway.md): its warm ORT worker pool, the in-process
        # hub of provider-hosted calls, and its caches/micro-batcher; made on first use.
        self.gateway_pool: GatewayPool | None = None
        self.gateway_hub: Hub | None = None
        self.gateway_state: tuple[TargetCache, Batcher | None] | None = None
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
