"""Run the real OpenID Provider (tests/oidc/provider.mjs, panva's oidc-provider) on loopback, and
drive som's sign-in through it: in Chromium (tests/marketplace/test_sso.py) or, for the attack
cases, with httpx through the OP's own login and consent pages (:func:`code_flow`).

``make oidc`` installs the provider into tests/oidc/node_modules with ``npm ci``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

HERE = Path(__file__).resolve().parent
PROVIDER = HERE / "provider.mjs"
ACCOUNTS = json.loads((HERE / "accounts.json").read_text())
CLIENT_ID = "som-marketplace"
CLIENT_SECRET = "op-test-secret-" + "9f2c41d7"  # the test OP's registration of som

GROUP_MAP = {
    "groups": [
        {"group": "acme-ml-engineers", "org": "acme", "teams": ["ml-platform"], "roles": ["provider"]},
        {"group": "acme-analysts", "org": "acme", "teams": ["analytics"], "roles": ["consumer"]},
        {"group": "acme-admins", "org": "acme", "roles": ["admin"]},
        {"group": "globex-analysts", "org": "globex", "roles": ["consumer"]},
    ]
}


def op_missing() -> str | None:
    """Why the OP cannot run here, or None."""
    if shutil.which("node") is None:
        return "node is missing (Node 20 from Debian: apt-get install nodejs npm)"
    if not (HERE / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed: run `make oidc` (npm ci in tests/oidc)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OP:
    """The provider process: one issuer URL for its life, restartable (key rotation, new accounts)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    redirect_uris: list[str] = field(default_factory=list)
    accounts: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(ACCOUNTS)))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def jwks_path(self) -> Path:
        return self.workdir / "op-jwks.json"

    def start(self) -> None:
        env = {
            **os.environ,
            "OIDC_PORT": str(self.port),
            "OIDC_JWKS": str(self.jwks_path),
            "OIDC_ACCOUNTS_JSON": json.dumps(self.accounts),
            "OIDC_CLIENTS": json.dumps(
                [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": self.redirect_uris}]
            ),
        }
        log = open(self.workdir / "op.log", "ab")  # noqa: SIM115 (kept open for the process's life)
        self.proc = subprocess.Popen(["node", str(PROVIDER)], env=env, stdout=log, stderr=log, cwd=HERE)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.issuer + "/.well-known/openid-configuration", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the OP did not start: " + (self.workdir / "op.log").read_text()[-2000:])
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self, *, rotate_keys: bool = False) -> None:
        """Stop and start again on the same port (same issuer); with ``rotate_keys`` a new signing key."""
        self.stop()
        if rotate_keys:
            self.jwks_path.unlink()  # provider.mjs creates a new key (new kid) when the file is absent
        self.start()

    def kid(self) -> str:
        return str(json.loads(self.jwks_path.read_text())["keys"][0]["kid"])

    def next_token(self, mode: str) -> None:
        """The next token response carries a doctored ID token (see provider.mjs)."""
        r = httpx.post(self.issuer + "/__test/next-token", json={"mode": mode}, timeout=5)
        assert r.status_code == 200, r.text

    def jwks_fetches(self) -> int:
        return int(httpx.get(self.issuer + "/__test/stats", timeout=5).json()["jwks_fetches"])


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action") or "", "fields": {}})
        elif tag == "input" and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value") or ""


def code_flow(http: httpx.Client, som: str, login: str, *, next_url: str | None = None) -> str:
    """Sign ``login`` in at the OP through its login and consent pages, starting at som's
    ``/v1/auth/login``; return the callback URL the OP redirects to (not yet visited)."""
    params = {"next": next_url} if next_url else None
    r = http.get(som + "/v1/auth/login", params=params)
    assert r.status_code == 302, r.text
    url = r.headers["location"]
    for _ in range(20):
        if url.startswith(som):
            return url
        r = http.get(url)
        if r.status_code in (302, 303):
            url = urljoin(url, r.headers["location"])
            continue
        assert r.status_code == 200, f"{url}: {r.status_code} {r.text[:500]}"
        p = _Forms()
        p.feed(r.text)
        assert p.forms, f"no form on {url}: {r.text[:500]}"
        form = p.forms[0]
        data = dict(form["fields"])
        if data.get("prompt") == "login":
            data.update(login=login, password="any password")  # noqa: S105 (the dev OP's login page)
        r = http.post(urljoin(url, form["action"]), data=data)
        assert r.status_code in (302, 303), f"{r.status_code} {r.text[:500]}"
        url = urljoin(url, r.headers["location"])
    raise AssertionError("the OP never redirected back to som")


def sign_in(http: httpx.Client, som: str, login: str) -> httpx.Response:
    """The whole flow; returns som's answer to the callback."""
    return http.get(code_flow(http, som, login))


def reason_of(r: httpx.Response) -> str:
    if r.headers.get("content-type", "").startswith("application/json"):
        return str(r.json()["error"].get("reason", ""))
    m = re.search(r'id="refusal-reason"><code>([^<]*)<', r.text)
    return m.group(1) if m else ""


@dataclass
class Stack:
    """som (uvicorn on loopback) configured for SSO against a real OP, with the World's keys."""

    world: Any
    url: str
    op: OP
    group_map: Path

    def browser_client(self) -> httpx.Client:
        return httpx.Client(follow_redirects=False, timeout=20)


@contextmanager
def sso_stack(tmp_path: Path, db_url: str, **settings: Any) -> Iterator[Stack]:
    """An OP and som wired to each other; organisations ``acme`` and ``globex`` exist."""
    from marketplace.api.app import create_app
    from tests.conftest import build_world, make_settings, serve_in_thread

    reason = op_missing()
    if reason:
        pytest.skip(reason)
    op = OP(workdir=tmp_path)
    gm = tmp_path / "groups.json"
    gm.write_text(json.dumps(GROUP_MAP))
    s = make_settings(
        tmp_path,
        db_url,
        oidc_issuer=op.issuer,
        oidc_client_id=CLIENT_ID,
        oidc_client_secret=CLIENT_SECRET,
        oidc_group_map=gm,
        oidc_scopes="openid email profile groups",
        **settings,
    )
    app = create_app(s)
    try:
        world = build_world(app)
        world.admin.create_org("acme")
        world.admin.create_org("globex")
        with serve_in_thread(app) as url:
            op.redirect_uris = [url + "/v1/auth/callback"]
            op.start()
            try:
                yield Stack(world=world, url=url, op=op, group_map=gm)
            finally:
                op.stop()
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()
