"""Attacks on authentication and authorization (OWASP API1 BOLA, API2, API5 BFLA), over a real server.

Each test runs the app under uvicorn on loopback with a real SQLite database and speaks raw HTTP
with httpx, as an attacker would. Different client addresses are real source addresses on the
loopback network (127.0.0.x), not forwarded headers.
"""

from __future__ import annotations

import base64
import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import World, build_world, make_settings, serve_in_thread


@contextmanager
def _served(tmp_path: Path, url: str, **settings: Any) -> Iterator[tuple[World, str]]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, url, **settings))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


@pytest.fixture
def srv(tmp_path: Path, db_url: str) -> Iterator[tuple[World, str]]:
    """The world on SQLite and on PostgreSQL, served by uvicorn on loopback: (world, base URL)."""
    with _served(tmp_path, db_url) as out:
        yield out


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


def test_every_non_agent_route_refuses_agent_keys_where_the_principal_is_resolved() -> None:
    """Structural: a route that resolves a principal outside the agent protocol does it through
    ``get_principal`` (which refuses agent keys); only ``/v1/agent/*`` and whoami take any key."""
    from fastapi.routing import APIRoute

    from marketplace.api.app import ROUTERS
    from marketplace.api.deps import get_any_principal, get_principal

    def calls(dep: Any) -> set[Any]:
        out = {dep.call}
        for d in dep.dependencies:
            out |= calls(d)
        return out

    checked = 0
    for router in ROUTERS:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            direct = {d.call for d in route.dependant.dependencies}
            if get_any_principal not in calls(route.dependant):
                continue
            checked += 1
            if route.path.startswith("/v1/agent/") or route.path == "/v1/whoami":
                continue
            assert get_principal in direct, f"{route.path} takes a principal that may be an agent key"
    assert checked > 40


def _refusals(w: World, url: str) -> dict[str, str]:
    """A presented key of each kind that must be refused: name -> Authorization value."""
    from marketplace.db.base import utcnow
    from marketplace.db.models import ApiKey

    org = w.orgs["consumer"]
    revoked = w.admin.create_key(org, ["consumer"], name="revoked")  # type: ignore[attr-defined]
    expired = w.admin.create_key(org, ["consumer"], name="expired")  # type: ignore[attr-defined]
    with _http(url) as c:  # both were valid (and are in the verified-key cache)
        for k in (revoked, expired):
            assert c.get("/v1/whoami", headers={"Authorization": f"Bearer {k['key']}"}).status_code == 200
    w.admin.revoke_key(revoked["id"])  # type: ignore[attr-defined]
    with w.rt.tx() as s:  # type: ignore[attr-defined]
        s.get(ApiKey, expired["id"]).expires_at = utcnow() - timedelta(seconds=1)
    good = w.keys["consumer"]
    _, prefix, secret = good.split("_", 2)
    return {
        "unknown prefix": f"Bearer som_{secrets.token_hex(6)}_{secret}",
        "wrong secret": f"Bearer som_{prefix}_{secrets.token_urlsafe(32)}",
        "revoked": f"Bearer {revoked['key']}",
        "expired": f"Bearer {expired['key']}",
    }


def test_bad_keys_get_byte_identical_answers_in_the_same_time(tmp_path: Path, sqlite_url: str) -> None:
    """Unknown prefix, wrong secret, revoked and expired: same status, same headers, same body,
    and timings whose medians are within 3x of each other (all pay one argon2 verification)."""
    with _served(tmp_path, sqlite_url, auth_fail_max_per_client=1000, auth_fail_max_per_prefix=1000) as (w, url):
        bad = _refusals(w, url)
        answers: dict[str, set[tuple[int, str, bytes]]] = {k: set() for k in bad}
        times: dict[str, list[float]] = {k: [] for k in bad}
        with _http(url) as c:
            c.get("/v1/whoami", headers={"Authorization": bad["unknown prefix"]})  # warm the dummy hash
            for _ in range(7):
                for name, auth in bad.items():  # interleaved, so drift hits every kind alike
                    t0 = time.perf_counter()
                    r = c.get("/v1/whoami", headers={"Authorization": auth, "X-Request-Id": "req-same"})
                    times[name].append(time.perf_counter() - t0)
                    answers[name].add((r.status_code, r.headers["content-type"], r.content))
        distinct = set().union(*answers.values())
        assert len(distinct) == 1, answers
        status, _, body = distinct.pop()
        assert (
            status == 401
            and body == b'{"error":{"code":"unauthenticated","message":"invalid API key","request_id":"req-same"}}'
        )
        medians = {k: statistics.median(v) for k, v in times.items()}
        assert max(medians.values()) < 3 * min(medians.values()), medians
        # the real reason is on the record for the operator (the audit log), not in the answer
        from marketplace.services import auth_failures

        auth_failures.flush(w.rt, everything=True)  # failed authentications are summarised per window
        reasons = {r for e in w.compliance.audit(action="auth.failures") for r in e["detail"]["reasons"]}  # type: ignore[attr-defined]
        assert {"unknown", "wrong_secret", "revoked", "expired"} <= reasons, reasons


def _get(url: str, auth: str, *, source: str) -> httpx.Response:
    with _http(url, source=source) as c:
        return c.get("/v1/whoami", headers={"Authorization": auth})


def _throttled(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["code"] == "too_many_requests"
    assert 1 <= int(r.headers["retry-after"]) <= 60


def test_failed_attempts_are_throttled_per_client_and_per_prefix(tmp_path: Path, sqlite_url: str) -> None:
    """After N failures a client address gets 429 with Retry-After (even for a correct key), while
    a correct key from another address works; after M failures naming one prefix, from any number
    of addresses, that prefix gets 429, for a known and an unknown prefix alike."""
    with _served(
        tmp_path, sqlite_url, auth_fail_max_per_client=3, auth_fail_max_per_prefix=4, auth_fail_window_seconds=60
    ) as (w, url):
        good = f"Bearer {w.keys['consumer']}"
        attacker = "127.0.0.2"
        for _ in range(3):
            assert _get(url, f"Bearer som_{secrets.token_hex(6)}_x", source=attacker).status_code == 401
        _throttled(_get(url, f"Bearer som_{secrets.token_hex(6)}_x", source=attacker))
        _throttled(_get(url, good, source=attacker))
        assert _get(url, good, source="127.0.0.3").status_code == 200
        assert _get(url, "", source=attacker).status_code == 401  # no key presented: nothing to throttle
        # per prefix, from many addresses (two failures each, below the client limit)
        victim = w.keys["provider"].split("_", 2)[1]
        for prefix in (victim, secrets.token_hex(6)):
            sources = iter(f"127.0.{n}.{m}" for n in (10 if prefix == victim else 20,) for m in range(1, 9))
            for _ in range(2):
                src = next(sources)
                for _ in range(2):
                    assert _get(url, f"Bearer som_{prefix}_{secrets.token_urlsafe(8)}", source=src).status_code == 401
            _throttled(_get(url, f"Bearer som_{prefix}_{secrets.token_urlsafe(8)}", source=next(sources)))
        assert _get(url, good, source="127.0.0.4").status_code == 200  # other prefixes are unaffected
        # failures verified on different server threads at once count in one bucket
        from concurrent.futures import ThreadPoolExecutor

        burst = "127.0.30.1"
        with ThreadPoolExecutor(6) as pool:
            codes = list(
                pool.map(
                    lambda _: _get(url, f"Bearer som_{secrets.token_hex(6)}_x", source=burst).status_code, range(6)
                )
            )
        assert set(codes) <= {401, 429} and codes.count(401) >= 3, codes
        _throttled(_get(url, good, source=burst))


def test_child_keys_are_capped_and_revoked_with_their_parent(srv: tuple[World, str]) -> None:
    w, url = srv
    org = w.orgs["consumer"]
    parent = w.admin.create_key(org, ["consumer"], name="parent", ttl_days=2)  # type: ignore[attr-defined]
    with _http(url) as c:

        def create(key: str, **body: Any) -> dict[str, Any]:
            r = c.post(
                f"/v1/orgs/{org}/keys", json={"roles": ["consumer"], **body}, headers={"Authorization": f"Bearer {key}"}
            )
            assert r.status_code == 201, r.text
            return dict(r.json())

        child = create(parent["key"], ttl_days=3650)
        grandchild = create(child["key"], ttl_days=3650)
        sibling = create(w.keys["consumer"], name="unrelated")

        def exp(k: dict[str, Any]) -> datetime:
            return datetime.fromisoformat(str(k["expires_at"]).replace("Z", "+00:00"))

        assert exp(child) == exp(parent) and exp(grandchild) == exp(parent)  # not 10 years
        r = c.post(
            f"/v1/orgs/{org}/keys", json={"roles": ["admin"]}, headers={"Authorization": f"Bearer {child['key']}"}
        )
        assert r.status_code == 403  # nor more roles than the creator
        for k in (parent, child, grandchild, sibling):
            assert c.get("/v1/whoami", headers={"Authorization": f"Bearer {k['key']}"}).status_code == 200
        r = c.delete(f"/v1/keys/{parent['id']}", headers={"Authorization": f"Bearer {w.keys['admin']}"})
        assert r.status_code == 200
        for k in (parent, child, grandchild):
            assert c.get("/v1/whoami", headers={"Authorization": f"Bearer {k['key']}"}).status_code == 401, k["name"]
        assert c.get("/v1/whoami", headers={"Authorization": f"Bearer {sibling['key']}"}).status_code == 200
    listed = {k["id"]: k for k in w.consumer.list_keys()}  # type: ignore[attr-defined]
    assert listed[child["id"]]["revoked_at"] and listed[grandchild["id"]]["revoked_at"]
    events = w.compliance.audit(action="key.revoke")  # type: ignore[attr-defined]
    assert {e["target"] for e in events} >= {parent["id"], child["id"], grandchild["id"]}


def test_revoking_a_provider_key_revokes_its_agent_keys(srv: tuple[World, str]) -> None:
    w, url = srv
    org = w.orgs["provider"]
    pk = w.admin.create_key(org, ["provider"], name="p2")  # type: ignore[attr-defined]
    from marketplace.sdk import SomClient

    with _http(url) as raw:
        prov = SomClient(
            url, pk["key"], http=httpx.Client(base_url=url, headers={"Authorization": f"Bearer {pk['key']}"})
        )
        off = prov.create_offering(name="remote2", task="binary-classification", hosting="provider")
        agent = prov.create_agent_key([off["id"]])
        assert datetime.fromisoformat(agent["expires_at"].replace("Z", "+00:00")) <= datetime.fromisoformat(
            pk["expires_at"].replace("Z", "+00:00")
        )
        h = {"Authorization": f"Bearer {agent['key']}"}
        assert raw.get("/v1/whoami", headers=h).status_code == 200
        w.admin.revoke_key(pk["id"])  # type: ignore[attr-defined]
        assert raw.get("/v1/whoami", headers=h).status_code == 401


def test_inclusion_proof_by_a_foreign_leaf_hash_is_indistinguishable_from_a_missing_one(srv: tuple[World, str]) -> None:
    """BOLA on the ledger: another organisation's leaf hash and a hash that is in no leaf get the
    same status and body, and each is audited once (the log grows alike, so its size is no oracle)."""
    from tests.marketplace.test_ledger import seed_usage

    w, url = srv
    _, refs = seed_usage(w, 2)
    leaves = w.compliance.get_json("/v1/ledger/leaves", start=refs[0].index, end=refs[0].index + 1)  # type: ignore[attr-defined]
    theirs = base64.b64decode(leaves[0]["leaf_hash"])
    w.compliance.sign_ledger_checkpoint()  # type: ignore[attr-defined]
    mine = {"Authorization": f"Bearer {w.keys['consumer']}", "X-Request-Id": "req-same"}
    other = {"Authorization": f"Bearer {w.keys['other_consumer']}", "X-Request-Id": "req-same"}
    with _http(url) as c:
        ok = c.get("/v1/ledger/proof/inclusion", params={"leaf_hash": base64.b64encode(theirs).decode()}, headers=mine)
        assert ok.status_code == 200 and ok.json()["index"] == refs[0].index  # the consumer's own leaf

        def ask(h: bytes) -> tuple[int, bytes, int]:
            before = len(w.compliance.audit(action="authz.denied"))  # type: ignore[attr-defined]
            r = c.get("/v1/ledger/proof/inclusion", params={"leaf_hash": h.hex()}, headers=other)
            after = len(w.compliance.audit(action="authz.denied"))  # type: ignore[attr-defined]
            return r.status_code, r.content, after - before

        foreign = ask(theirs)
        missing = ask(secrets.token_bytes(32))
    assert foreign[0] == 404 and foreign == missing, (foreign, missing)
    assert foreign[2] == 1
