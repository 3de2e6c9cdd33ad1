"""Attacks on monitoring: scraping /metrics from elsewhere, reading another organisation's
figures, and blowing up label cardinality with raw paths, odd methods and error classes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from marketplace.api.middleware_metrics import route_templates
from marketplace.services import metering
from tests.conftest import make_settings, serve_in_thread
from tests.marketplace.test_contracts_support import make_deal

TOKEN = "scrape-" + secrets.token_hex(16)


def _http_samples(text: str) -> list[Any]:
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    return [s for s in fam["http_server_request_duration_seconds"].samples if s.name.endswith("_count")]


@pytest.fixture
def guarded(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Any, str]]:
    """A server whose /metrics needs SOM_METRICS_TOKEN."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, metrics_token=TOKEN))
    try:
        with serve_in_thread(app) as url:
            yield app, url
    finally:
        app.state.runtime.close()


def test_non_loopback_scrape_without_token_is_refused(sqlite_world: Any) -> None:
    app = sqlite_world.app
    remote = TestClient(app, client=("203.0.113.7", 40000), raise_server_exceptions=False)
    r = remote.get("/metrics")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert "http_server_request_duration_seconds" not in r.text
    # an IPv4-mapped or spoofed-looking header changes nothing: the client address decides
    r = remote.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1", "Host": "localhost"})
    assert r.status_code == 403
    assert (
        TestClient(app, client=("::ffff:10.1.2.3", 1), raise_server_exceptions=False).get("/metrics").status_code == 403
    )
    for host in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert TestClient(app, client=(host, 40000)).get("/metrics").status_code == 200, host


def test_metrics_token_is_required_when_set(guarded: Any) -> None:
    app, url = guarded
    assert httpx.get(f"{url}/metrics").status_code == 401  # loopback is not enough once a token is set
    r = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    ok = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and "http_server_request_duration_seconds" in ok.text
    remote = TestClient(app, client=("198.51.100.9", 5000), raise_server_exceptions=False)
    assert remote.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert remote.get("/metrics").status_code == 401


def test_consumer_cannot_read_another_orgs_or_a_providers_offering_monitoring(live: Any) -> None:
    w, url = live
    deal = make_deal(w)
    r = metering.begin(
        w.rt,
        deal.consumer,
        offering_id=deal.offering_id,
        mode="remote_job",
        job_kind="predict",
        units=4,
        idempotency_key="sec-1",
        request_digest=metering.request_digest("sec-1"),
    )
    metering.commit(w.rt, r, result=b"x", media_type="application/octet-stream")
    path = f"/v1/monitoring/offerings/{deal.offering_id}"

    def get(who: str, p: str) -> httpx.Response:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {w.keys[who]}"}) as c:
            return c.get(p, params={"step": "day"})

    own = get("provider", path)
    assert own.status_code == 200 and own.json()["totals"]["units"] == 4
    missing = get("consumer", "/v1/monitoring/offerings/off_doesnotexist")
    for who in ("consumer", "other_consumer", "other_provider", "compliance"):
        r = get(who, path)
        assert r.status_code == 404, who
        assert r.json()["error"]["message"].replace(deal.offering_id, "X") == missing.json()["error"][
            "message"
        ].replace("off_doesnotexist", "X")  # indistinguishable from an offering that does not exist
    assert get("consumer", "/v1/monitoring/marketplace").status_code == 403
    assert get("other_provider", "/v1/monitoring/marketplace").status_code == 403
    assert get("compliance", "/v1/monitoring/marketplace").json()["totals"]["units"] == 4
    mine = get("consumer", "/v1/monitoring/contracts").json()["contracts"]
    assert [c["contract_id"] for c in mine] == [deal.contract_id] and mine[0]["totals"]["units"] == 4
    assert get("other_consumer", "/v1/monitoring/contracts").json()["contracts"] == []
    assert get("provider", "/v1/monitoring/contracts").json()["contracts"] == []  # it is nobody's consumer
    assert httpx.get(f"{url}{path}").status_code == 401


def test_raw_paths_cannot_explode_label_cardinality(live: Any) -> None:
    from marketplace.services import monitoring

    w, url = live
    junk = [secrets.token_hex(6) for _ in range(60)]
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {w.keys['consumer']}"}) as c:
        for j in junk:
            c.get(f"/v1/offerings/{j}")
            c.get(f"/v1/contracts/{j}/statement")
            c.get(f"/{j}/{j}")
            c.get(f"/ui/{j}.js")
            c.request(f"X{j[:4].upper()}", "/v1/whoami")
    known = set(monitoring._error_classes)  # the process-wide cap this attack fills; restored below
    for j in junk[:40]:  # hostile label values and error classes through the inference recorder
        monitoring.record_inference(
            f"off\n{j}" * 5, 1, "mode " + j, queue_s=0, model_s=0, overhead_s=0, ok=False, error_class=f"Err{j}"
        )
    text = httpx.get(f"{url}/metrics").text
    monitoring._error_classes.intersection_update(known)  # later tests in this process see real classes
    samples = _http_samples(text)
    routes = {s.labels["http_route"] for s in samples}
    templates = {t for _, t in route_templates(w.app)}
    assert "/v1/offerings/{offering_id}" in templates and "/ui/{path}" in templates
    assert routes <= templates | {"unmatched"}
    assert {s.labels["http_request_method"] for s in samples} <= monitoring.HTTP_METHODS | {"_OTHER"}
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    labelled = [*fam["http_server_request_duration_seconds"].samples, *fam["som_inference_duration_seconds"].samples]
    assert not any(j in v for s in labelled for v in s.labels.values() for j in junk)
    assert "other" in {s.labels["offering"] for s in fam["som_inference_duration_seconds"].samples}
    classes = {s.labels["error_class"] for s in fam["som_inference_errors"].samples}
    assert len(classes) <= monitoring.MAX_ERROR_CLASSES + 1


@pytest.mark.parametrize("token", ["", "changeme", "secret", "short-token"])
def test_a_placeholder_or_short_metrics_token_refuses_to_start(tmp_path: Path, sqlite_url: str, token: str) -> None:
    from marketplace.api.app import create_app
    from marketplace.settings import SettingsError

    with pytest.raises(SettingsError, match="SOM_METRICS_TOKEN"):
        create_app(make_settings(tmp_path, sqlite_url, metrics_token=token))
