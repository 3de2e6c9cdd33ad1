"""The offering view says plainly what the gateway mode reveals (Chromium via Playwright)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.marketplace.test_gateway_support import gw_offering, served
from tests.marketplace.test_web_ui import CHROMIUM, CHROMIUM_ARGS, sign_in


@pytest.fixture
def chromium() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) as root")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_offering_view_says_gateway_reveals_inputs_to_the_compute_site(
    chromium: Any, tmp_path: Path, sqlite_url: str
) -> None:
    from playwright.sync_api import expect

    with served(tmp_path, sqlite_url) as (w, url):
        mk = gw_offering(w, tmp_path, modes=frozenset({"gateway", "he_inference"}))
        st = gw_offering(w, tmp_path, hosting="provider")
        he = gw_offering(w, tmp_path, modes=frozenset({"he_inference"}))
        ctx = chromium.new_context(viewport={"width": 1280, "height": 900})
        ctx.set_default_timeout(15_000)
        page = ctx.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            sign_in(page, url, w.keys["consumer"])
            page.goto(f"{url}/ui/#/offering/{mk.offering_id}")
            notice = page.locator("#gateway-reveals")
            expect(notice).to_contain_text("reveals your inputs to the compute site")
            expect(notice).to_contain_text("the marketplace's compute worker")
            offers = page.locator("section.panel", has_text="Offers").text_content()
            assert "gateway (plaintext)" in offers and "encrypted inference (HE)" in offers
            page.goto(f"{url}/ui/#/offering/{st.offering_id}")
            expect(page.locator("#gateway-reveals")).to_contain_text("the provider's agent")
            page.goto(f"{url}/ui/#/offering/{he.offering_id}")
            page.wait_for_selector("#model-card")
            expect(page.locator("#gateway-reveals")).to_have_count(0)  # no gateway offer: no notice
            assert errors == [], errors
        finally:
            ctx.close()
