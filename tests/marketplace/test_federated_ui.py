"""The web UI's federation pages in real Chromium: a participant and the provider see the rounds,
the participants (a participant only itself) and the accuracy per round as a plot."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.federated_support import (
    breast_cancer_split,
    open_federation,
    run_participants,
    wait_finished,
    wait_joined,
)
from tests.marketplace.test_web_ui import browser, page, sign_in  # noqa: F401 - fixtures

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, dict[str, Any]]]:
    from marketplace.api.app import create_app

    tmp = tmp_path_factory.mktemp("fedui")
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'som.db'}"))
    w = build_world(app)
    try:
        with serve_in_thread(app) as url:
            split = breast_cancer_split(3)
            fed = open_federation(w, {"rounds": 3, "local_epochs": 2, "min_participants": 2}, split=split)
            threads = run_participants(url, fed, split)
            for t in threads:
                t.start()
            wait_joined(w, fed, 3)
            w.provider.start_federation(fed.id)
            assert wait_finished(w, fed)["status"] == "completed"
            for t in threads:
                t.join(30)
            yield w, url, {"fed": fed}
    finally:
        app.state.runtime.close()


def test_provider_sees_rounds_participants_and_the_accuracy_plot(page: Any, server: Any) -> None:  # noqa: F811
    w, base, seeded = server
    fed = seeded["fed"]
    sign_in(page, base, w.keys["provider"])
    page.wait_for_selector("#offerings")
    page.click("#nav >> text=Federations")
    page.click(f"a[href='#/federation/{fed.id}']")
    page.wait_for_selector("#accuracy-plot")
    assert "completed" in page.text_content("#federation-status")
    assert page.locator("#accuracy-plot circle.point").count() == 3
    assert page.locator("table.rounds tbody tr").count() == 3
    assert page.locator("table.participants tbody tr").count() == 3


def test_a_participant_sees_only_itself(page: Any, server: Any) -> None:  # noqa: F811
    w, base, seeded = server
    fed = seeded["fed"]
    sign_in(page, base, fed.orgs[0][1])
    page.wait_for_selector("#nav")
    page.goto(f"{base}/#/federation/{fed.id}")
    page.wait_for_selector("#accuracy-plot")
    rows = page.locator("table.participants tbody tr")
    assert rows.count() == 1 and fed.orgs[0][0] in rows.first.text_content()
