"""Shared fixtures: settings on a temporary data dir, real SQLite or PostgreSQL, the real app.

PostgreSQL: tests using the ``db_url`` fixture run on both backends. The machine's server on
loopback is started if it is down (as the machine's docs say); if it cannot be reached at all the
PostgreSQL variants are skipped with the reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("SOM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
_pg_state: dict[str, object] = {}


def _pg_up() -> str | None:
    """Return None if PostgreSQL answers (starting it if needed), else the reason it does not."""
    if "reason" in _pg_state:
        return _pg_state["reason"]  # type: ignore[return-value]
    import psycopg

    reason: str | None = None
    for attempt in range(2):
        try:
            with psycopg.connect(PG_ADMIN_URL, connect_timeout=3):
                reason = None
                break
        except psycopg.OperationalError as e:
            reason = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}"
            if attempt == 0 and shutil.which("pg_ctlcluster") and Path("/etc/postgresql").exists():
                versions = sorted(os.listdir("/etc/postgresql"))
                if versions:
                    subprocess.run(
                        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
                        capture_output=True,
                        timeout=60,
                        check=False,
                    )
    _pg_state["reason"] = reason
    return reason


@pytest.fixture(autouse=True, scope="session")
def _key_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The default key directory root (``$XDG_CONFIG_HOME/som/keys``) of this test session: a
    temporary folder, so the default key custody (keys outside the data directory) is what every
    test and every ``som`` subprocess uses, and the user's own config dir is left alone."""
    root = tmp_path_factory.mktemp("xdg-config")
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(root)
    try:
        yield root / "som" / "keys"
    finally:
        if old is None:
            os.environ.pop("XDG_CONFIG_HOME", None)
        else:
            os.environ["XDG_CONFIG_HOME"] = old


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'som.db'}"
        return
    reason = _pg_up()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = "som_test_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    from sqlalchemy import create_engine  # noqa: F401  (engines are disposed by the runtime)

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'som.db'}"


def make_settings(tmp_path: Path, db_url: str, **kw: object):  # type: ignore[no-untyped-def]
    from marketplace.settings import Settings

    return Settings(data_dir=tmp_path / "data", database_url=db_url, **kw)  # type: ignore[arg-type]


@dataclass
class World:
    """A running app with an admin, two provider orgs and two consumer orgs and a compliance org."""

    app: object
    http: object  # TestClient
    rt: object
    admin: object
    provider: object
    consumer: object
    compliance: object
    other_provider: object
    other_consumer: object
    orgs: dict[str, str]
    keys: dict[str, str]

    def client(self, key: str | None):  # type: ignore[no-untyped-def]
        from fastapi.testclient import TestClient

        from marketplace.sdk import SomClient

        tc = TestClient(self.app, raise_server_exceptions=False)  # type: ignore[arg-type]
        return SomClient("http://testserver", key, http=tc)


def build_world(app) -> World:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from marketplace.sdk import SomClient
    from marketplace.services import audit
    from marketplace.services.identity import bootstrap

    rt = app.state.runtime
    with rt.tx() as s:
        row, admin_key = bootstrap(s)
        audit.emit(s, audit.Actor.system(), "key.create", target=row.id)
    http = TestClient(app, raise_server_exceptions=False)

    def mk(key: str) -> SomClient:
        return SomClient("http://testserver", key, http=TestClient(app, raise_server_exceptions=False))

    admin = mk(admin_key)
    orgs: dict[str, str] = {}
    keys: dict[str, str] = {}
    clients = {}
    for name, roles in [
        ("provider", ["provider"]),
        ("consumer", ["consumer"]),
        ("compliance", ["compliance"]),
        ("other_provider", ["provider"]),
        ("other_consumer", ["consumer"]),
    ]:
        org = admin.create_org(f"{name}-org")
        k = admin.create_key(org["id"], roles, name=name)
        orgs[name] = org["id"]
        keys[name] = k["key"]
        clients[name] = mk(k["key"])
    keys["admin"] = admin_key
    return World(app=app, http=http, rt=rt, admin=admin, orgs=orgs, keys=keys, **clients)


@pytest.fixture
def world(tmp_path: Path, db_url: str) -> Iterator[World]:
    """The app on SQLite and on PostgreSQL, with organisations and keys for every role."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


@pytest.fixture
def sqlite_world(tmp_path: Path, sqlite_url: str) -> Iterator[World]:
    """The same world on SQLite only (for slow or SQLite-specific tests)."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


@contextmanager
def serve_in_thread(app, *, lifespan: str = "off") -> Iterator[str]:  # type: ignore[no-untyped-def]
    """Run ``app`` under uvicorn on a free loopback port in a thread; yield its base URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan=lifespan))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture
def live(sqlite_world: World) -> Iterator[tuple[World, str]]:
    """The SQLite world served by uvicorn on loopback: (world, base URL)."""
    with serve_in_thread(sqlite_world.app) as url:
        yield sqlite_world, url
