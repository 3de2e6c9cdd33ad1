"""SSO sign-in flows against som on uvicorn and a real OpenID Provider on loopback.

The OP is panva's oidc-provider (tests/oidc/provider.mjs, installed by `make oidc`). The browser
test drives Debian's Chromium through the OP's real login and consent pages and ends signed in on
/ui; the others drive the same code flow with httpx (tests/oidc/op.py). Attacks are in
tests/security/test_sso.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from marketplace.db.models import ApiKey, AuditEvent
from marketplace.db.models_sso import User, UserTeam
from tests.marketplace.test_web_ui import browser  # noqa: F401, F811 - the one module-scoped Chromium fixture
from tests.oidc.op import Stack, reason_of, sign_in, sso_stack

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips
    expect = None


def events(st: Stack, action: str) -> list[AuditEvent]:
    with st.world.rt.tx() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def me_of(st: Stack, http: httpx.Client) -> dict[str, Any]:
    r = http.get(st.url + "/v1/auth/me")
    assert r.status_code == 200, r.text
    return dict(r.json())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sso-flows")
    with sso_stack(tmp, f"sqlite:///{tmp / 'som.db'}") as st:
        yield st


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
        assert not errors, errors
    finally:
        ctx.close()


def test_browser_login_through_the_op_pages(stack: Stack, page: Any) -> None:
    page.goto(stack.url + "/ui/")
    page.locator("#sso-login").click()
    # the OP's own login page, then its consent page
    page.wait_for_url(stack.op.issuer + "/interaction/**")
    page.locator("input[name=login]").fill("carol")
    page.locator("input[name=password]").fill("correct horse")
    page.locator("button[type=submit]").click()
    page.locator("button:has-text('Continue')").click()
    page.wait_for_url(stack.url + "/ui/**")
    expect(page.locator("#who")).to_contain_text("acme")
    expect(page.locator("#who .role", has_text="provider")).to_be_visible()
    expect(page.locator("#who .role", has_text="consumer")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "som_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]  # loopback http
    assert page.evaluate("document.cookie").find("som_session") == -1  # not readable by scripts

    page.goto(stack.url + "/ui/#/me")
    expect(page.locator("#whoami")).to_contain_text("carol@acme.example")
    expect(page.locator("#whoami")).to_contain_text("analytics, ml-platform")
    # a state-changing request from the UI: the personal key (with the CSRF token)
    page.locator("#pk-name").fill("laptop")
    page.locator("#pk-days").fill("7")
    page.locator("#personal-key-form button[type=submit]").click()
    key = page.locator("#personal-key-value").inner_text()
    assert key.startswith("som_")
    who = httpx.get(stack.url + "/v1/whoami", headers={"Authorization": f"Bearer {key}"}).json()
    assert who["user"]["email"] == "carol@acme.example" and who["roles"] == ["consumer", "provider"]

    page.locator("#sign-out").click()
    expect(page.locator("#signin")).to_be_visible()
    r = httpx.get(stack.url + "/v1/auth/me", cookies={"som_session": cookie["value"]})
    assert r.status_code == 401
    assert events(stack, "auth.logout")


def test_browser_unmapped_user_sees_the_refusal(stack: Stack, page: Any) -> None:
    page.goto(stack.url + "/ui/")
    page.locator("#sso-login").click()
    page.locator("input[name=login]").fill("mallory")
    page.locator("input[name=password]").fill("x")
    page.locator("button[type=submit]").click()
    page.locator("button:has-text('Continue')").click()
    expect(page.locator("#refusal-reason")).to_have_text("unmapped_group")
    assert not [c for c in page.context.cookies() if c["name"] == "som_session"]


def test_browser_api_key_sign_in_still_works(stack: Stack, page: Any) -> None:
    page.goto(stack.url + "/ui/")
    page.locator("#api-key").fill(stack.world.keys["consumer"])
    page.locator("#signin button[type=submit]").click()
    expect(page.locator("#who")).to_contain_text("consumer-org")


def test_login_me_and_audit(tmp_path: Path, db_url: str) -> None:
    with sso_stack(tmp_path, db_url) as st, st.browser_client() as http:
        r = sign_in(http, st.url, "alice")
        assert r.status_code == 303 and r.headers["location"] == "/ui/"
        me = me_of(st, http)
        assert me["via"] == "session" and me["org_name"] == "acme" and me["roles"] == ["provider"]
        assert me["user"]["email"] == "alice@acme.example" and me["user"]["teams"] == ["ml-platform"]
        # the cookie works on the whole API, like a key with the user's roles
        who = http.get(st.url + "/v1/whoami").json()
        assert who["key_id"] == me["key_id"] and who["user"]["id"] == me["user"]["id"]
        assert http.get(st.url + "/v1/audit").status_code == 403  # provider, not compliance
        login = events(st, "auth.login")[-1]
        assert login.actor == me["key_id"] and login.detail["sub"] == "alice" and login.detail["roles"] == ["provider"]
        with st.world.rt.tx() as s:
            user = s.get(User, me["key_id"])
            assert user is not None and user.groups == ["acme-ml-engineers", "everyone"]
            assert [t.team for t in s.scalars(select(UserTeam).where(UserTeam.user_id == user.id))] == ["ml-platform"]
        r = http.post(st.url + "/v1/auth/logout", headers={"X-CSRF-Token": me["csrf_token"]})
        assert r.status_code == 200 and 'som_session=""' in r.headers["set-cookie"]
        assert events(st, "auth.logout")[-1].actor == me["key_id"]


def test_roles_are_rederived_at_every_login(tmp_path: Path, sqlite_url: str) -> None:
    with sso_stack(tmp_path, sqlite_url) as st:
        with st.browser_client() as first:
            assert sign_in(first, st.url, "dave").status_code == 303
            me = me_of(st, first)
            assert me["roles"] == ["consumer"] and me["user"]["teams"] == ["analytics"]
            key = first.post(st.url + "/v1/auth/keys", json={"ttl_days": 5}, headers={"X-CSRF-Token": me["csrf_token"]})
            assert key.status_code == 201
            personal = {"Authorization": f"Bearer {key.json()['key']}"}
            assert httpx.get(st.url + "/v1/whoami", headers=personal).status_code == 200

            # the IdP moves dave to the ML engineers: the next login gives provider, not consumer
            st.op.accounts["dave"]["groups"] = ["acme-ml-engineers"]
            st.op.restart()
            with st.browser_client() as second:
                assert sign_in(second, st.url, "dave").status_code == 303
                again = me_of(st, second)
                assert again["roles"] == ["provider"] and again["user"]["teams"] == ["ml-platform"]
            change = events(st, "user.roles.change")[-1]
            assert change.detail["before"] == ["consumer"] and change.detail["after"] == ["provider"]
            assert change.detail["teams_after"] == ["ml-platform"]
            # the old session held the old roles: it is over; the consumer key no longer has its roles
            assert first.get(st.url + "/v1/auth/me").status_code == 401
            assert httpx.get(st.url + "/v1/whoami", headers=personal).status_code == 401

        # then out of every mapped group: refused, and nothing of the user keeps working
        st.op.accounts["dave"]["groups"] = ["contractors"]
        st.op.restart()
        with st.browser_client() as third:
            r = sign_in(third, st.url, "dave")
            assert r.status_code == 403 and reason_of(r) == "unmapped_group"
        assert events(st, "user.disable")[-1].detail["reason"] == "unmapped_group"
        with st.world.rt.tx() as s:
            user = s.scalar(select(User).where(User.subject == "dave"))
            assert user is not None and user.disabled_at is not None and user.roles == []


def test_key_rotation_at_the_op_needs_no_restart_of_som(tmp_path: Path, sqlite_url: str) -> None:
    with sso_stack(tmp_path, sqlite_url) as st:
        with st.browser_client() as http:
            assert sign_in(http, st.url, "bob").status_code == 303
        old_kid = st.op.kid()
        st.op.restart(rotate_keys=True)  # the OP now signs with a new key and no longer publishes the old one
        assert st.op.kid() != old_kid
        with st.browser_client() as http:
            r = sign_in(http, st.url, "bob")
            assert r.status_code == 303, r.text
            assert me_of(st, http)["roles"] == ["consumer"]
        assert st.op.jwks_fetches() == 1  # som fetched the new JWKS when it met the new kid


def test_som_whoami_shows_the_user(stack: Stack) -> None:
    from marketplace.cli import app as cli

    with stack.browser_client() as http:
        assert sign_in(http, stack.url, "bob").status_code == 303
        me = me_of(stack, http)
        k = http.post(stack.url + "/v1/auth/keys", json={"name": "cli"}, headers={"X-CSRF-Token": me["csrf_token"]})
        key = k.json()["key"]
    out = CliRunner().invoke(cli, ["--url", stack.url, "--api-key", key, "--json", "whoami"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["user"]["email"] == "bob@acme.example" and data["roles"] == ["consumer"]
    out = CliRunner().invoke(cli, ["--url", stack.url, "--api-key", key, "whoami"])
    assert out.exit_code == 0 and "bob@acme.example" in out.output
    out = CliRunner().invoke(cli, ["--url", stack.url, "--api-key", stack.world.keys["provider"], "--json", "whoami"])
    assert json.loads(out.output)["user"] is None
    with stack.world.rt.tx() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.id == k.json()["id"]))
        assert row is not None and row.user_id == me["key_id"] and row.created_by is None  # the user's, not a key's
        assert (row.expires_at - row.created_at).days == 30  # the personal key's default and maximum


def test_group_map_in_toml_applies_at_the_next_login(stack: Stack) -> None:
    toml = stack.group_map.with_suffix(".toml")
    toml.write_text(
        '[[groups]]\ngroup = "acme-analysts"\norg = "acme"\nteams = ["bi"]\nroles = ["consumer", "compliance"]\n'
    )
    from marketplace.services.sso_mapping import load_group_map, map_groups

    m = map_groups(load_group_map(toml), ["acme-analysts", "unknown"])
    assert m.org == "acme" and m.roles == ("compliance", "consumer") and m.teams == ("bi",)
    # the JSON file som runs with is re-read when it changes: bob gains a team at his next login
    gm = json.loads(stack.group_map.read_text())
    gm["groups"].append({"group": "acme-analysts", "org": "acme", "teams": ["reporting"]})
    stack.group_map.write_text(json.dumps(gm))
    with stack.browser_client() as http:
        assert sign_in(http, stack.url, "bob").status_code == 303
        assert me_of(stack, http)["user"]["teams"] == ["analytics", "reporting"]
