"""Attacks on SSO sign-in, against som on uvicorn and a real OpenID Provider on loopback.

The OP is panva's oidc-provider (tests/oidc/provider.mjs). Logins are driven with httpx through
the OP's own login and consent pages; for the ID-token attacks the OP's next token response carries
the doctored token (what a compromised path to the token endpoint, or a misbehaving OP, would
deliver to som's callback). Every refusal must leave no session, answer 4xx with the reason, and be
an audit event (``auth.login.refused``) with that reason.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from marketplace.db.models import AuditEvent
from marketplace.db.models_sso import WebSession
from tests.oidc.op import Stack, code_flow, reason_of, sign_in, sso_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sso-attacks")
    # one JWKS refetch an hour at most: a flood of unknown key ids cannot make som hammer the OP
    with sso_stack(tmp, f"sqlite:///{tmp / 'som.db'}", oidc_jwks_refetch_seconds=3600.0) as st:
        yield st


def refusals(st: Stack, reason: str) -> list[AuditEvent]:
    with st.world.rt.tx() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login.refused")).all()
        return [r for r in rows if r.detail.get("reason") == reason]


def assert_refused(st: Stack, r: httpx.Response, reason: str, status: int, http: httpx.Client) -> None:
    assert r.status_code == status, r.text
    assert reason_of(r) == reason, r.text
    assert "som_session" not in r.headers.get("set-cookie", "")
    assert http.get(st.url + "/v1/auth/me").status_code == 401
    assert refusals(st, reason), f"no auth.login.refused event with reason {reason}"


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("tamper", "bad_signature"),  # payload changed (alice -> admin group), signature kept
        ("wrong_aud", "wrong_audience"),  # a real signature, for another client
        ("expired", "expired"),  # a real signature, exp an hour ago
        ("alg_none", "bad_token"),  # unsigned
        ("unknown_key", "unknown_key"),  # signed by a key the issuer does not publish
    ],
)
def test_doctored_id_token_is_refused(stack: Stack, mode: str, reason: str) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        stack.op.next_token(mode)
        r = http.get(callback)
        assert_refused(stack, r, reason, 401, http)


def test_tampered_id_token_json_answer(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        stack.op.next_token("tamper")
        r = http.get(callback, headers={"Accept": "application/json"})
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthenticated" and r.json()["error"]["reason"] == "bad_signature"


def test_tampered_id_token_html_page(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        stack.op.next_token("tamper")
        r = http.get(callback, headers={"Accept": "text/html"})
        assert r.status_code == 401 and "Sign-in refused" in r.text and "bad_signature" in r.text
        assert "default-src 'none'" in r.headers["content-security-policy"]


def test_unknown_key_ids_refetch_the_jwks_at_most_once(stack: Stack) -> None:
    before = stack.op.jwks_fetches()
    for _ in range(3):
        with stack.browser_client() as http:
            callback = code_flow(http, stack.url, "alice")
            stack.op.next_token("unknown_key")
            assert reason_of(http.get(callback)) == "unknown_key"
    assert stack.op.jwks_fetches() - before <= 1


def test_replayed_nonce_is_refused(stack: Stack) -> None:
    with stack.browser_client() as http:
        assert sign_in(http, stack.url, "alice").status_code == 303  # a real login: its ID token is kept by the OP
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        stack.op.next_token("replay")  # the previous login's (valid, signed) ID token again
        assert_refused(stack, http.get(callback), "nonce_replayed", 401, http)


def test_missing_state_is_refused(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        without = httpx.URL(callback).copy_remove_param("state")
        assert_refused(stack, http.get(without), "missing_state", 400, http)


def test_state_from_another_browser_is_refused(stack: Stack) -> None:
    """Login CSRF / code injection: a callback URL (code + state) replayed in a victim's browser."""
    with stack.browser_client() as attacker:
        callback = code_flow(attacker, stack.url, "mallory")
    with stack.browser_client() as victim:
        assert_refused(stack, victim.get(callback), "state_mismatch", 400, victim)


def test_wrong_state_is_refused(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        forged = httpx.URL(callback).copy_set_param("state", "forged-state")
        assert_refused(stack, http.get(forged), "state_mismatch", 400, http)


def test_completed_callback_cannot_be_replayed(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        state_cookie = http.cookies.get("som_oidc_state")
        assert http.get(callback).status_code == 303
        http.cookies.set("som_oidc_state", state_cookie or "", domain="127.0.0.1", path="/v1/auth")
        r = http.get(callback)
        assert r.status_code == 400 and reason_of(r) == "state_replayed"


def test_issuer_mix_up_is_refused(stack: Stack) -> None:
    with stack.browser_client() as http:
        callback = code_flow(http, stack.url, "alice")
        forged = httpx.URL(callback).copy_set_param("iss", "http://127.0.0.1:1/evil")
        assert reason_of(http.get(forged)) == "wrong_issuer"


def test_unmapped_group_is_refused_not_given_a_default_role(stack: Stack) -> None:
    with stack.browser_client() as http:
        r = sign_in(http, stack.url, "mallory")  # groups: everyone, contractors: in no rule
        assert_refused(stack, r, "unmapped_group", 403, http)
    ev = refusals(stack, "unmapped_group")[-1]
    assert ev.outcome == "denied" and ev.detail["sub"] == "mallory" and "contractors" in ev.detail["groups"]


def test_groups_in_two_organisations_are_refused(stack: Stack) -> None:
    with stack.browser_client() as http:
        assert_refused(stack, sign_in(http, stack.url, "erin"), "several_organisations", 403, http)


def test_refused_logins_are_ledger_leaves(stack: Stack) -> None:
    from marketplace.db.models_ledger import LedgerLeaf

    ev = refusals(stack, "unmapped_group") or refusals(stack, "state_mismatch")
    assert ev
    with stack.world.rt.tx() as s:
        leaves = s.scalars(select(LedgerLeaf)).all()
        assert any(ev[-1].id in bytes(leaf.data).decode("utf-8", "replace") for leaf in leaves)


@contextmanager
def _signed_in(stack: Stack, login: str = "alice") -> Iterator[tuple[httpx.Client, dict[str, Any]]]:
    with stack.browser_client() as http:
        assert sign_in(http, stack.url, login).status_code == 303
        yield http, http.get(stack.url + "/v1/auth/me").json()


def test_state_changing_requests_with_the_cookie_need_the_csrf_token(stack: Stack) -> None:
    with _signed_in(stack) as (http, me):
        assert me["via"] == "session" and me["csrf_token"]
        body = {"name": "laptop", "ttl_days": 7}
        r = http.post(stack.url + "/v1/auth/keys", json=body)  # a cross-site form or fetch sends no header
        assert r.status_code == 403 and "X-CSRF-Token" in r.json()["error"]["message"]
        r = http.post(stack.url + "/v1/auth/keys", json=body, headers={"X-CSRF-Token": "x" + me["csrf_token"][1:]})
        assert r.status_code == 403
        r = http.post(stack.url + "/v1/offerings", json={"name": "x", "task": "t", "hosting": "marketplace"})
        assert r.status_code == 403  # every state-changing route, not only /v1/auth
        assert http.post(stack.url + "/v1/auth/logout").status_code == 403
        assert http.get(stack.url + "/v1/auth/me").status_code == 200  # still signed in
        r = http.post(stack.url + "/v1/auth/keys", json=body, headers={"X-CSRF-Token": me["csrf_token"]})
        assert r.status_code == 201, r.text
    with stack.world.rt.tx() as s:
        assert s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.csrf_failed")).first() is not None


def test_bearer_requests_need_no_csrf_token(stack: Stack) -> None:
    r = httpx.post(
        stack.url + "/v1/orgs",
        json={"name": "no-csrf-needed"},
        headers={"Authorization": f"Bearer {stack.world.keys['admin']}"},
    )
    assert r.status_code == 201


def test_session_cookie_attributes_and_storage(stack: Stack) -> None:
    with stack.browser_client() as http:
        r = sign_in(http, stack.url, "alice")
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("som_session="))
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "path", "max-age", "samesite"} <= attrs and "secure" not in attrs  # loopback http
        assert "samesite=lax" in cookie.lower()
        value = cookie.split(";")[0].split("=", 1)[1]
        assert len(value) >= 40
        with stack.world.rt.tx() as s:
            rows = s.scalars(select(WebSession)).all()
            assert hashlib.sha256(value.encode()).hexdigest() in {w.token_hash for w in rows}
            assert all(value not in (w.token_hash, w.id) for w in rows)


def test_session_cookie_is_secure_over_https(stack: Stack) -> None:
    """Behind a TLS-terminating proxy on loopback (uvicorn trusts X-Forwarded-Proto from 127.0.0.1)."""
    with stack.browser_client() as http:
        http.headers["X-Forwarded-Proto"] = "https"
        r = http.get(stack.url + "/v1/auth/login")
        assert "secure" in r.headers["set-cookie"].lower()


def test_logged_out_cookie_is_dead(stack: Stack) -> None:
    with _signed_in(stack) as (http, me):
        stolen = http.cookies.get("som_session")
        assert http.post(stack.url + "/v1/auth/logout", headers={"X-CSRF-Token": me["csrf_token"]}).status_code == 200
    r = httpx.get(stack.url + "/v1/auth/me", cookies={"som_session": stolen or ""})
    assert r.status_code == 401
    r = httpx.get(stack.url + "/v1/auth/me", cookies={"som_session": "guessed-session-id"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"


def test_login_redirect_stays_on_this_origin(stack: Stack) -> None:
    with stack.browser_client() as http:
        r = http.get(code_flow(http, stack.url, "alice", next_url="https://evil.example/phish"))
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
    with stack.browser_client() as http:
        r = http.get(code_flow(http, stack.url, "alice", next_url="//evil.example/"))
        assert r.headers["location"] == "/ui/"


def test_personal_key_cannot_exceed_the_users_roles_or_lifetime(stack: Stack) -> None:
    with _signed_in(stack) as (http, me):  # alice: provider
        h = {"X-CSRF-Token": me["csrf_token"]}
        r = http.post(stack.url + "/v1/auth/keys", json={"roles": ["admin"]}, headers=h)
        assert r.status_code == 403
        r = http.post(stack.url + "/v1/auth/keys", json={"ttl_days": 365}, headers=h)
        assert r.status_code == 422
        key = http.post(stack.url + "/v1/auth/keys", json={"ttl_days": 30}, headers=h).json()
        assert key["roles"] == ["provider"]
        # the key cannot mint a broader key either
        r = httpx.post(
            stack.url + f"/v1/orgs/{me['org_id']}/keys",
            json={"roles": ["admin"]},
            headers={"Authorization": f"Bearer {key['key']}"},
        )
        assert r.status_code == 403
        # and a personal key is not a session: it cannot mint personal keys
        r = httpx.post(stack.url + "/v1/auth/keys", json={}, headers={"Authorization": f"Bearer {key['key']}"})
        assert r.status_code == 409


def test_forged_session_and_bearer_together_use_the_bearer(stack: Stack) -> None:
    """An Authorization header wins; a cookie never upgrades a bad key."""
    with _signed_in(stack) as (http, _):
        r = http.get(stack.url + "/v1/whoami", headers={"Authorization": "Bearer som_bad_key"})
        assert r.status_code == 401


def test_sso_off_by_default(tmp_path: Path, sqlite_url: str) -> None:
    from marketplace.api.app import create_app
    from tests.conftest import make_settings, serve_in_thread

    app = create_app(make_settings(tmp_path, sqlite_url))
    try:
        with serve_in_thread(app) as url:
            assert httpx.get(url + "/v1/auth/config").json() == {"sso": False, "login_url": None}
            r = httpx.get(url + "/v1/auth/login")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            assert httpx.get(url + "/v1/auth/callback?state=x&code=y").status_code == 404
    finally:
        app.state.runtime.close()


def test_broken_group_map_stops_the_server(tmp_path: Path, sqlite_url: str) -> None:
    from marketplace.api.app import create_app
    from marketplace.settings import SettingsError
    from tests.conftest import make_settings

    bad = tmp_path / "groups.toml"
    bad.write_text('[[groups]]\ngroup = "x"\norg = "acme"\nroles = ["root"]\n')
    s = make_settings(
        tmp_path,
        sqlite_url,
        oidc_issuer="http://127.0.0.1:1",
        oidc_client_id="som",
        oidc_client_secret="a-real-secret-1",
        oidc_group_map=bad,
    )
    with pytest.raises(SettingsError, match="unknown roles"):
        create_app(s)
    with pytest.raises(SettingsError, match="CLIENT_SECRET"):
        create_app(
            make_settings(
                tmp_path,
                sqlite_url,
                oidc_issuer="http://127.0.0.1:1",
                oidc_client_id="som",
                oidc_client_secret="changeme",
                oidc_group_map=bad,
            )
        )


def test_unreachable_or_impostor_op_is_a_502_not_a_500(tmp_path: Path, sqlite_url: str) -> None:
    """An issuer that does not answer, and one whose discovery document names another issuer."""
    from marketplace.api.app import create_app
    from tests.conftest import make_settings, serve_in_thread
    from tests.oidc.op import GROUP_MAP, OP, free_port, op_missing

    gm = tmp_path / "groups.json"
    gm.write_text(json.dumps(GROUP_MAP))
    down = f"http://127.0.0.1:{free_port()}"
    app = create_app(
        make_settings(
            tmp_path,
            sqlite_url,
            oidc_issuer=down,
            oidc_client_id="som",
            oidc_client_secret="a-real-secret-1",
            oidc_group_map=gm,
        )
    )
    try:
        with serve_in_thread(app) as url:
            r = httpx.get(url + "/v1/auth/login", headers={"Accept": "application/json"})
            assert r.status_code == 502 and r.json()["error"]["reason"] == "op_unreachable"
        assert getattr(app.state, "internal_errors", 0) == 0
    finally:
        app.state.runtime.close()
    if op_missing():
        return
    real = OP(workdir=tmp_path)
    real.start()
    try:
        impostor = f"http://localhost:{real.port}"  # serves a discovery document naming 127.0.0.1
        app = create_app(
            make_settings(
                tmp_path,
                sqlite_url,
                oidc_issuer=impostor,
                oidc_client_id="som",
                oidc_client_secret="a-real-secret-1",
                oidc_group_map=gm,
            )
        )
        try:
            with serve_in_thread(app) as url:
                r = httpx.get(url + "/v1/auth/login", headers={"Accept": "application/json"})
                assert r.status_code == 502 and r.json()["error"]["reason"] == "wrong_issuer"
        finally:
            app.state.runtime.close()
    finally:
        real.stop()


def test_authorization_request_uses_pkce_state_and_nonce(stack: Stack) -> None:
    with stack.browser_client() as http:
        r = http.get(stack.url + "/v1/auth/login")
        q = httpx.URL(r.headers["location"]).params
        assert q["response_type"] == "code" and q["code_challenge_method"] == "S256"
        assert len(q["code_challenge"]) == 43 and len(q["state"]) >= 43 and len(q["nonce"]) >= 43
        assert q["client_id"] == "som-marketplace" and q["redirect_uri"] == stack.url + "/v1/auth/callback"
        again = httpx.URL(http.get(stack.url + "/v1/auth/login").headers["location"]).params
        assert {again["state"], again["nonce"], again["code_challenge"]}.isdisjoint(
            {q["state"], q["nonce"], q["code_challenge"]}
        )


def test_login_flood_is_bounded(tmp_path: Path, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/auth/login needs no credentials: logins in flight are capped (503 busy), unaudited."""
    from marketplace.api.app import create_app
    from marketplace.services import sso
    from tests.conftest import make_settings, serve_in_thread
    from tests.oidc.op import GROUP_MAP, free_port

    monkeypatch.setattr(sso, "MAX_PENDING_LOGINS", 3)
    gm = tmp_path / "groups.json"
    gm.write_text(json.dumps(GROUP_MAP))
    app = create_app(
        make_settings(
            tmp_path,
            sqlite_url,
            oidc_issuer=f"http://127.0.0.1:{free_port()}",
            oidc_client_id="som",
            oidc_client_secret="a-real-secret-1",
            oidc_group_map=gm,
        )
    )
    try:
        with serve_in_thread(app) as url:
            codes = [httpx.get(url + "/v1/auth/login", headers={"Accept": "application/json"}) for _ in range(5)]
            assert [r.status_code for r in codes] == [502, 502, 502, 503, 503]
            assert codes[-1].json()["error"]["reason"] == "busy"
        with app.state.runtime.tx() as s:
            rows = s.scalars(select(AuditEvent).where(AuditEvent.action == "auth.login.refused")).all()
            assert [r.detail["reason"] for r in rows] == ["op_unreachable"] * 3
    finally:
        app.state.runtime.close()
