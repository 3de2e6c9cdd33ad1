"""The Access Control Dashboard in Chromium (Playwright, Debian's /usr/bin/chromium) against
uvicorn on loopback: the validation report, publish, visibility and grants, teams. Setup as in
tests/marketplace/test_web_ui.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips
    expect = None

from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.sharing_support import lr_offering, status_of
from tests.marketplace.test_sharing import _eval_at
from tests.marketplace.test_web_ui import browser, sign_in  # noqa: F401, F811 - browser: the one Chromium fixture


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    from marketplace.api.app import create_app

    tmp = tmp_path_factory.mktemp("sharing-ui")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'som.db'}", checkpoint_interval_seconds=3600))
    w = build_world(app)
    try:
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500"
    finally:
        app.state.runtime.close()


@pytest.fixture
def page(browser: Any, server: Any) -> Iterator[Any]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" and "status of 4" not in m.text else None)
    try:
        yield pg
        assert errors == [], errors
    finally:
        ctx.close()


@pytest.mark.browser
def test_provider_reads_the_report_publishes_and_shares_from_the_browser(page: Any, server: Any) -> None:
    w, base = server
    off = lr_offering(w.provider, publish=False)
    x, y = _eval_at(0.9)
    w.provider.set_version_metadata(off, 1, metrics={"accuracy": 0.99}, evaluation={"x": x, "y": y})
    sign_in(page, base, w.keys["provider"])
    page.wait_for_selector("#offerings")
    page.goto(f"{base}/ui/#/offering/{off}")
    # the failed report, and the refusal with its reason
    expect(page.locator("#validation h3")).to_contain_text("failed")
    expect(page.locator("#validation-reason")).to_contain_text("declared 0.99, measured 0.9")
    page.click("#publish")
    expect(page.locator("#message")).to_contain_text("failed validation")
    assert w.provider.get_offering(off)["status"] == "draft"
    # an honest declaration, then publish from the browser
    w.provider.set_version_metadata(off, 1, metrics={"accuracy": 0.9}, evaluation={"x": x, "y": y})
    page.reload()
    expect(page.locator("#validation h3")).to_contain_text("passed")
    page.click("#publish")
    expect(page.locator("#withdraw")).to_be_visible()
    assert w.provider.get_offering(off)["status"] == "published"
    # visibility shared and a grant to one organisation
    page.select_option("#visibility", "shared")
    page.click("#set-visibility")
    expect(page.locator("#message")).to_contain_text("visibility: shared")
    assert status_of(w.consumer.get_offering, off) == 404
    page.fill("#grant-grantee", w.orgs["consumer"])
    page.select_option("#grant-permission", "read")
    page.click("#grant")
    expect(page.locator("#access table.grants tbody tr")).to_have_count(1)
    assert w.consumer.get_offering(off)["id"] == off
    assert status_of(w.other_consumer.get_offering, off) == 404
    # revoke from the browser: the grantee's next request is a 404
    page.click("#access table.grants .revoke")
    expect(page.locator("#no-grants")).to_be_visible()
    assert status_of(w.consumer.get_offering, off) == 404
    # withdraw
    page.click("#withdraw")
    expect(page.locator("#publish")).to_be_visible()
    assert w.provider.get_offering(off)["status"] == "withdrawn"
    actions = {e["action"] for e in w.provider.offering_audit(off)}
    assert {
        "offering.grant",
        "offering.revoke",
        "offering.visibility",
        "offering.publish",
        "offering.withdraw",
    } <= actions


@pytest.mark.browser
def test_root_key_manages_teams_from_the_browser(page: Any, server: Any) -> None:
    w, base = server
    child = w.provider.create_key(w.orgs["provider"], ["provider"], name="ml engineer")
    sign_in(page, base, w.keys["provider"])
    page.wait_for_selector("#offerings")
    page.click("#nav >> text=Teams")
    page.fill("#team-name", "credit-ml")
    page.click("#create-team")
    row = page.locator("table.teams tr[data-team='credit-ml']")
    expect(row).to_be_visible()
    row.locator(".member-key").fill(child["id"])
    row.locator(".add-member").click()
    expect(page.locator("table.teams tr[data-team='credit-ml']")).to_contain_text(child["id"])
    assert w.provider.get_team("credit-ml")["members"] == [child["id"]]
    page.locator("table.teams tr[data-team='credit-ml'] .remove-member").click()
    expect(page.locator("table.teams tr[data-team='credit-ml'] .member")).to_have_count(0)
    assert w.provider.get_team("credit-ml")["members"] == []
    # the consumer organisation does not see the provider's teams
    assert w.consumer.list_teams() == []


@pytest.mark.browser
def test_provider_uploads_a_version_with_metrics_from_the_browser(page: Any, server: Any, tmp_path: Any) -> None:
    from tests.marketplace.sharing_support import lr_npz

    w, base = server
    off = lr_offering(w.provider, publish=False)
    model = tmp_path / "v2.npz"
    model.write_bytes(lr_npz())
    x, y = _eval_at(0.9)
    ev = tmp_path / "eval.csv"
    ev.write_text("\n".join(",".join(map(str, [*r, lab])) for r, lab in zip(x, y, strict=True)) + "\n")
    sign_in(page, base, w.keys["provider"])
    page.wait_for_selector("#offerings")
    # a new draft offering from the catalog page, shared
    page.fill("#new-name", "browser-made")
    page.select_option("#new-visibility", "shared")
    page.click("#create-offering")
    expect(page.locator("h2")).to_contain_text("browser-made")
    made = page.url.rsplit("/", 1)[-1]
    assert w.provider.get_offering(made)["visibility"] == "shared"
    assert status_of(w.consumer.get_offering, made) == 404
    page.goto(f"{base}/ui/#/offering/{off}")
    expect(page.locator("h2")).to_contain_text("cancer-lr")
    page.set_input_files("#version-file", str(model))
    page.fill("#metric-value", "0.99")
    page.set_input_files("#eval-file", str(ev))
    page.click("#upload-version")
    expect(page.locator("#message")).to_contain_text("version uploaded and validated")
    expect(page.locator("#validation h3")).to_contain_text("Validation of version 2")
    expect(page.locator("#validation-reason")).to_contain_text("declared 0.99, measured 0.9")
    rep = w.provider.validation_report(off, 2)
    assert rep["status"] == "failed" and rep["metrics"]["accuracy"]["measured"] == 0.9
