"""Attacks on authentication and authorization (OWASP API1 BOLA, API2, API5 BFLA), over a real server.

Each test runs the app under uvicorn on loopback with a real SQLite database and speaks raw HTTP
with httpx, as an attacker would. Different client addresses are real source addresses on the
loopback network (127.0.0.x), not forwarded headers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import World, build_world, make_settings, serve_in_thread


@pytest.fixture
def srv(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[World, str]]:
    """The SQLite world served by uvicorn on loopback: (world, base URL)."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _http(url: str, *, source: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(base_url=url, timeout=30, transport=httpx.HTTPTransport(local_address=source))


def _agent_key(w: World) -> str:
    off = w.provider.create_offering(name="remote", task="binary-classification", hosting="provider")  # type: ignore[attr-defined]
    created = w.provider.create_agent_key([off["id"]])  # type: ignore[attr-defined]
    return str(created["key"])


SPELLINGS = ("Bearer", "bearer", "BEARER", "bEaReR")


def test_agent_key_cannot_reach_provider_routes_under_any_scheme_spelling(srv: tuple[World, str]) -> None:
    """The reproduced break: ``Authorization: bearer <agent key>`` skipped the confinement
    middleware and reached every provider route, including key creation."""
    w, url = srv
    agent = _agent_key(w)
    org = w.orgs["provider"]
    with _http(url) as c:
        for scheme in SPELLINGS:
            h = {"Authorization": f"{scheme} {agent}"}
            assert c.get("/v1/whoami", headers=h).status_code == 200, scheme  # the agent may know who it is
            for method, path, body in (
                ("GET", "/v1/offerings", None),
                ("GET", "/v1/jobs", None),
                ("GET", "/v1/keys", None),
                ("POST", "/v1/offerings", {"name": "x", "task": "t"}),
            ):
                r = c.request(method, path, json=body, headers=h)
                assert r.status_code == 403, (scheme, path, r.text)
                assert r.json()["error"]["code"] == "forbidden"


def test_agent_key_never_creates_keys(srv: tuple[World, str]) -> None:
    w, url = srv
    agent = _agent_key(w)
    org = w.orgs["provider"]
    with _http(url) as c:
        for scheme in SPELLINGS:
            h = {"Authorization": f"{scheme} {agent}"}
            r = c.post(f"/v1/orgs/{org}/keys", json={"roles": ["provider"], "ttl_days": 3650}, headers=h)
            assert r.status_code == 403 and "key" not in r.json(), (scheme, r.text)
            r = c.post("/v1/agents/keys", json={"offering_ids": ["off_x"]}, headers=h)
            assert r.status_code == 403, (scheme, r.text)
    keys = w.provider.list_keys()  # type: ignore[attr-defined]
    assert [k["kind"] for k in keys].count("agent") == 1 and len(keys) == 2, keys
