"""Issue 10 §3 in the browser: the ledger page shows the log key with its fingerprint, lets the
user pin it (localStorage), checks every checkpoint against the pinned key and shows a red
warning when the server presents another key or origin.

Real Chromium (Playwright) against the app under uvicorn on loopback (SQLite). The operator's
key swap is played by intercepting the key and checkpoint responses in the browser (the same
bytes a server with another key would serve: a note signed by a fresh Ed25519 key).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips
    expect = None

from crypto.checkpoint import Checkpoint, sign_checkpoint
from crypto.logverify import vkey_fingerprint
from crypto.note import NoteSigner
from crypto.signing import SigningKey
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_web_ui import browser, sign_in  # noqa: F401  (the module's Chromium fixture)

PINNED = "som.ledger.pinnedLogKey"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from marketplace.api.app import create_app

    tmp = tmp_path_factory.mktemp("pin-ui")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'som.db'}", checkpoint_interval_seconds=3600))
    w = build_world(app)  # its audit events are ledger leaves
    w.compliance.sign_ledger_checkpoint()
    try:
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500"
    finally:
        app.state.runtime.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:  # noqa: F811
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    try:
        yield pg
        assert errors == [], errors
    finally:
        ctx.close()


def open_ledger(page: Any, base: str, key: str) -> None:
    sign_in(page, base, key)
    page.wait_for_selector("#sign-out")
    page.goto(base + "/ui/#/ledger?start=0")
    page.wait_for_selector("#pin-status")


def swap_key(page: Any, note: str, origin: str, *, serve_key: bool = True) -> NoteSigner:
    """Serve a checkpoint of the same tree signed by a fresh key (and that key, if serve_key)."""
    body = note.split("\n\n")[0] + "\n"
    cp = Checkpoint.parse(body)
    impostor = NoteSigner(origin, SigningKey.generate())
    forged = sign_checkpoint(Checkpoint(origin, cp.size, cp.root_hash), impostor).decode()
    page.route("**/v1/ledger/checkpoint", lambda r: r.fulfill(status=200, content_type="text/plain", body=forged))
    if serve_key:
        page.route(
            "**/v1/ledger/key",
            lambda r: r.fulfill(status=200, content_type="text/plain", body=impostor.verifier.vkey() + "\n"),
        )
    return impostor


@pytest.mark.browser
def test_key_fingerprint_pin_and_first_pin_notice(page: Any, server: Any) -> None:
    w, base = server
    vkey = w.compliance.ledger_key()
    fp = vkey_fingerprint(vkey)
    open_ledger(page, base, w.keys["compliance"])
    # The key with its fingerprint (same digits as `som ledger key` and the CLI), not pinned yet.
    assert page.text_content("#log-key-fingerprint") == fp
    assert "not pinned" in page.text_content("#pin-status")
    assert page.text_content("#checkpoint-signature").startswith("✓ signed by")
    assert page.locator("#key-warning").count() == 0
    # Pin it: stored in localStorage, with a notice saying to check it out of band.
    page.click("#pin-key")
    notice = page.locator("#pin-notice")
    expect(notice).to_be_visible()
    assert fp in notice.text_content() and "out of band" in notice.text_content()
    stored = page.evaluate(f"JSON.parse(localStorage.getItem('{PINNED}'))")
    assert stored["vkey"] == vkey and stored["origin"] == w.rt.settings.log_origin
    expect(page.locator("#pin-status")).to_have_text(re.compile("matches the key you pinned"))
    expect(page.locator("#checkpoint-signature")).to_have_text(re.compile("^✓ signed by the pinned key"))
    # The notice is for the first pin only; the pin survives a reload.
    page.reload()
    page.wait_for_selector("#pin-status")
    expect(page.locator("#pin-status")).to_have_text(re.compile("matches the key you pinned"))
    assert page.locator("#pin-notice").count() == 0
    page.locator("button.verify").first.click()
    expect(page.locator(".verify-result").first).to_have_text(re.compile("^✓ included"))


@pytest.mark.browser
@pytest.mark.parametrize("attack", ["new-key", "new-key-new-origin", "forged-note-real-key"])
def test_a_different_key_or_origin_is_a_red_warning(page: Any, server: Any, attack: str) -> None:
    w, base = server
    vkey = w.compliance.ledger_key()
    open_ledger(page, base, w.keys["compliance"])
    page.click("#pin-key")
    expect(page.locator("#pin-notice")).to_be_visible()

    origin = "evil.example/ledger" if attack == "new-key-new-origin" else w.rt.settings.log_origin
    impostor = swap_key(
        page, w.compliance.ledger_checkpoint().decode(), origin, serve_key=attack != "forged-note-real-key"
    )
    page.reload()
    warning = page.locator("#key-warning")
    expect(warning).to_be_visible()
    text = warning.text_content()
    assert "Do not trust" in text
    assert page.text_content("#pinned-fingerprint") == vkey_fingerprint(vkey)
    if attack == "forged-note-real-key":
        assert "not signed by the pinned key" in text
    else:
        assert page.text_content("#served-fingerprint") == vkey_fingerprint(impostor.verifier.vkey())
        assert "different log key" in text
    if attack == "new-key-new-origin":
        assert "evil.example/ledger" in text
    color = page.evaluate("getComputedStyle(document.querySelector('#key-warning')).color")
    assert color in ("rgb(180, 35, 24)", "rgb(255, 139, 128)")  # --bad
    expect(page.locator("#pin-status")).to_have_text(re.compile("NOT the key you pinned"))
    expect(page.locator("#checkpoint-signature")).to_have_text(re.compile("^✗"))
    # An inclusion check against that checkpoint is refused too.
    page.locator("button.verify").first.click()
    expect(page.locator(".verify-result").first).to_have_text(re.compile("^✗ the checkpoint is not the pinned log's"))
    # The pin is unchanged; forgetting it is an explicit act.
    assert page.evaluate(f"JSON.parse(localStorage.getItem('{PINNED}')).vkey") == vkey
    page.click("#unpin-key")
    expect(page.locator("#pin-status")).to_have_text(re.compile("not pinned"))
    if attack == "forged-note-real-key":  # unpinned, the served key still does not sign it
        expect(page.locator("#checkpoint-signature")).to_have_text(re.compile("^✗ no valid signature"))
    assert page.evaluate(f"localStorage.getItem('{PINNED}')") is None
