"""Monitoring through real servers: /metrics (Prometheus text, route templates, buckets from 100 us,
multiprocess mode across two `som serve` processes), and the adoption/latency store whose figures
must equal the usage records and the ledger, after a known sequence of jobs and HE inferences, on
SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from contracts.records import parse_record
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_cli_server import SOM, free_port, som
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract
from tests.marketplace.test_jobs_support import features, offering, to_csv, wait_usage

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def mw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    """The app on SQLite and PostgreSQL with one compute worker, served by uvicorn on loopback."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, workers=1))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def client(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def ledger_usage(url: str, key: str) -> list[tuple[int, dict[str, Any]]]:
    """Every som.usage/v1 leaf of the ledger export (compliance), parsed, with its index."""
    with client(url, key) as c:
        r = c.get("/v1/ledger/export")
        assert r.status_code == 200
    out = []
    for line in r.text.splitlines():
        d = json.loads(line)
        rec = parse_record(base64.b64decode(d["leaf"]))
        if rec["schema"] == "som.usage/v1":
            out.append((d["index"], rec))
    return out


# -- /metrics ----------------------------------------------------------------------------------------


def test_metrics_exposition_parses_route_is_the_template_buckets_start_at_100us(live: Any) -> None:
    from marketplace.services import monitoring

    w, url = live
    with client(url, w.keys["consumer"]) as c:
        assert c.get("/v1/offerings/off_doesnotexist42").status_code == 404
        assert c.get("/v1/no/such/route/xyz123").status_code == 404
        assert c.get("/v1/whoami").status_code == 200
        # answered before routing (the body limit): still the template
        big = c.post(
            "/v1/offerings/off_toolarge77/offers",
            content=b"{" + b" " * (2 << 20),
            headers={"Content-Type": "application/json"},
        )
        assert big.status_code == 413
    monitoring.record_inference("off_probe", 3, "he_inference", queue_s=0.0, model_s=2e-5, overhead_s=3e-4, ok=True)
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fam = families(r.text)
    http = fam["http_server_request_duration_seconds"]
    assert http.type == "histogram"
    counts = [s for s in http.samples if s.name.endswith("_count")]
    routes = {s.labels["http_route"] for s in counts}
    assert "/v1/offerings/{offering_id}" in routes and "/v1/whoami" in routes and "unmatched" in routes
    assert not any("off_doesnotexist42" in v or "xyz123" in v for s in http.samples for v in s.labels.values())
    assert {"http_route", "http_request_method", "http_response_status_code"} <= set(counts[0].labels)
    got = {
        (s.labels["http_route"], s.labels["http_request_method"], s.labels["http_response_status_code"]) for s in counts
    }
    assert ("/v1/offerings/{offering_id}", "GET", "404") in got and ("/v1/whoami", "GET", "200") in got
    assert ("/v1/offerings/{offering_id}/offers", "POST", "413") in got
    assert not any("off_toolarge77" in v for s in http.samples for v in s.labels.values())
    inf = fam["som_inference_duration_seconds"]
    buckets = [s for s in inf.samples if s.name.endswith("_bucket") and s.labels["offering"] == "off_probe"]
    assert {s.labels["phase"] for s in buckets} == {"queue", "model", "overhead"}
    les = sorted({float(s.labels["le"]) for s in buckets})
    assert les[0] == 1e-4 and les[-2] == 60.0 and les[-1] == float("inf")
    assert tuple(les[:-1]) == monitoring.BUCKETS
    model_le_1e4 = [s.value for s in buckets if s.labels["phase"] == "model" and s.labels["le"] in ("0.0001", "1e-04")]
    assert model_le_1e4 and model_le_1e4[0] >= 1  # the 20 us model call is resolved in the first bucket
    http_les = sorted({float(s.labels["le"]) for s in http.samples if s.name.endswith("_bucket")})
    assert http_les[0] == 1e-4


def _serve(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 40
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.stdout.read() if proc.stdout else ''!r}")
        time.sleep(0.1)


def test_multiprocess_mode_aggregates_two_som_serve_processes(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SOM_") and k not in ("DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    env.update({"SOM_DATA_DIR": str(tmp_path / "data"), "PROMETHEUS_MULTIPROC_DIR": str(prom)})
    admin = json.loads(som("--json", "admin", "bootstrap", env=env).stdout)["api_key"]
    ports = [free_port(), free_port()]
    procs = [_serve(env, p) for p in ports]
    try:
        for port, n in zip(ports, (3, 5), strict=True):
            with client(f"http://127.0.0.1:{port}", admin) as c:
                for _ in range(n):
                    assert c.get("/v1/whoami").status_code == 200
        assert len(list(prom.glob("*.db"))) >= 2  # each process writes its own files
        for port in ports:  # either process answers for both
            fam = families(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
            counts = {
                (s.labels["http_route"], s.labels["http_response_status_code"]): s.value
                for s in fam["http_server_request_duration_seconds"].samples
                if s.name.endswith("_count")
            }
            assert counts[("/v1/whoami", "200")] == 8
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


# -- adoption and latency ----------------------------------------------------------------------------


def _usage_rows(w: Any) -> list[Any]:
    from marketplace.db.models_contracts import UsageRow

    with w.rt.tx() as s:
        return list(
            s.execute(
                select(
                    UsageRow.offering_id,
                    UsageRow.contract_id,
                    UsageRow.state,
                    UsageRow.units,
                    UsageRow.ledger_index,
                    UsageRow.mode,
                    UsageRow.record,
                )
            )
        )


def test_adoption_equals_usage_records_and_the_ledger(mw: Any, tmp_path: Path) -> None:
    w, url = mw
    # a known sequence: two predict jobs (5 and 7 rows), one that fails (released), three HE calls
    job = offering(w, tmp_path, hosting="marketplace")
    for n in (5, 7):
        sub = w.consumer.submit_job(job.offering_id, "predict", to_csv(features(n)))
        assert w.consumer.wait_job(sub.id, timeout=60)["status"] == "succeeded"
    bad = w.consumer.submit_job(job.offering_id, "predict", to_csv(features(10)), units=3)
    failed = w.consumer.wait_job(bad.id, timeout=60)
    assert failed["status"] == "failed" and failed["error_reason"]
    assert wait_usage(w, job.contract_id, [("charged", 5), ("charged", 7), ("released", 3)])[-1] == ("released", 3)
    d = lr_breast_cancer()
    he_off = lr_offering(w)
    cid = make_contract(w, he_off)
    for rows in (d.x_test[:3], d.x_test[3:5], d.x_test[5:9]):
        w.consumer.infer_encrypted(he_off, rows, contract_id=cid, key_dir=tmp_path / "keys")
    frm = (datetime.now(UTC) - timedelta(hours=1)).isoformat()

    usage = _usage_rows(w)
    leaves = ledger_usage(url, w.keys["compliance"])
    with client(url, w.keys["provider"]) as c:
        reports = {}
        for off in (job.offering_id, he_off):
            for step in ("minute", "hour", "day"):
                r = c.get(f"/v1/monitoring/offerings/{off}", params={"from": frm, "step": step})
                assert r.status_code == 200, r.text
                reports[off, step] = r.json()
    for off in (job.offering_id, he_off):
        charged = [u for u in usage if u.offering_id == off and u.state == "charged"]
        charged_leaves = [(i, rec) for i, rec in leaves if rec["offering_id"] == off and rec["outcome"] == "charged"]
        assert sorted(i for i, _ in charged_leaves) == sorted(u.ledger_index for u in charged)
        for step in ("minute", "hour", "day"):
            rep = reports[off, step]
            a, tot = rep["adoption"], rep["totals"]
            # adoption = the usage records = the ledger's usage leaves
            assert tot["calls"] == sum(a["calls"]) == len(charged) == len(charged_leaves)
            assert (
                tot["units"]
                == sum(a["units"])
                == sum(u.units for u in charged)
                == sum(r["units"] for _, r in charged_leaves)
            )
            assert tot["revenue"] == {"EUR": sum(r["amount_minor"] for _, r in charged_leaves)}
            assert sum(a["leaves"]["count"]) == tot["leaf_count"] == len(charged_leaves)
            assert min(a["leaves"]["first"]) == min(i for i, _ in charged_leaves)
            assert max(a["leaves"]["last"]) == max(i for i, _ in charged_leaves)
            assert tot["consumers"] == 1 and tot["contracts"] == 1 and rep["active_contracts"] == 1
    assert reports[job.offering_id, "minute"]["totals"]["units"] == 12
    assert reports[job.offering_id, "minute"]["totals"]["released"] == 1
    assert reports[he_off, "day"]["totals"]["units"] == 9
    assert reports[he_off, "day"]["adoption"]["calls_by_mode"] == {"he_inference": [3]}
    assert reports[he_off, "day"]["versions"] == [1]
    # latency, from record_inference in the job and HE paths (flushed before the read)
    jl = reports[job.offering_id, "day"]["latency"]["by_mode"]["remote_job"]
    assert sum(jl["calls"]) == 3 and sum(jl["errors"]) == 1
    assert reports[job.offering_id, "day"]["latency"]["errors_by_class"] == {failed["error_reason"]: 1}
    hl = reports[he_off, "minute"]["latency"]["by_mode"]["he_inference"]
    assert sum(hl["calls"]) == 3 and sum(hl["errors"]) == 0
    assert all(
        p50 is not None and 0 < p50 <= p95 <= p99 for p50, p95, p99 in zip(hl["p50"], hl["p95"], hl["p99"], strict=True)
    )
    # the consumer sees its own two contracts; compliance sees the marketplace
    with client(url, w.keys["consumer"]) as c:
        mine = c.get("/v1/monitoring/contracts", params={"from": frm, "step": "minute"}).json()
    by_id = {x["contract_id"]: x for x in mine["contracts"]}
    assert set(by_id) == {job.contract_id, cid}
    assert by_id[job.contract_id]["totals"]["units"] == 12 and by_id[cid]["totals"]["units"] == 9
    assert by_id[cid]["totals"]["calls"] == 3 and all(v is not None for v in by_id[cid]["series"]["p99"])
    with client(url, w.keys["compliance"]) as c:
        mk = c.get("/v1/monitoring/marketplace", params={"from": frm, "step": "hour"}).json()
    assert mk["totals"]["units"] == 21 == sum(u.units for u in usage if u.state == "charged")
    assert mk["totals"]["calls"] == 5 and {o["offering_id"] for o in mk["offerings"]} == {job.offering_id, he_off}
    assert set(mk["latency"]["by_mode"]) == {"remote_job", "he_inference"}


def test_latency_rows_of_several_writers_add_up(mw: Any) -> None:
    """Replicas (or processes) write their own rows for the same minute; readers add them."""
    from marketplace.services import monitoring, monitoring_store

    w, url = mw
    off = w.provider.create_offering(name="latency", task="binary-classification", hosting="provider")["id"]
    for _ in range(3):
        monitoring.record_inference(off, 1, "he_inference", queue_s=0.001, model_s=0.002, overhead_s=0.001, ok=True)
    assert monitoring_store.flush(w.rt) == 1
    monitoring.record_inference(
        off, 1, "he_inference", queue_s=0.0, model_s=0.5, overhead_s=0.0, ok=False, error_class="Unavailable"
    )
    assert monitoring_store.flush(w.rt) == 1  # the same row again, cumulative: 4 calls
    first = monitoring.writer_id()
    monitoring._writer = "replica-b:1:test"  # what a second process would be called
    try:
        for _ in range(2):
            monitoring.record_inference(off, 1, "he_inference", queue_s=0.0, model_s=0.003, overhead_s=0.0, ok=True)
        monitoring._aggs.clear()  # a second process has its own aggregates: start from nothing
        monitoring.record_inference(off, 1, "he_inference", queue_s=0.0, model_s=0.003, overhead_s=0.0, ok=True)
        assert monitoring_store.flush(w.rt) == 1
    finally:
        monitoring._writer = first
    from marketplace.db.models_monitoring import MonitoringLatency

    with w.rt.tx() as s:
        writers = sorted(
            r.writer for r in s.scalars(select(MonitoringLatency).where(MonitoringLatency.offering_id == off))
        )
    assert writers == sorted([first, "replica-b:1:test"])
    with client(url, w.keys["provider"]) as c:
        rep = c.get(f"/v1/monitoring/offerings/{off}", params={"step": "hour"}).json()
    lat = rep["latency"]["by_mode"]["he_inference"]
    assert sum(lat["calls"]) == 5 and rep["latency"]["errors_by_class"] == {"Unavailable": 1}
    assert max(lat["p99"]) > 0.25  # the 0.5 s call is in the tail


def test_bad_parameters_are_422(live: Any) -> None:
    w, url = live
    off = w.provider.create_offering(name="x", task="binary-classification", hosting="provider")["id"]
    now = datetime.now(UTC)
    with client(url, w.keys["provider"]) as c:
        base = f"/v1/monitoring/offerings/{off}"
        assert c.get(base, params={"step": "minute"}).status_code == 200
        for params in (
            {"step": "week"},
            {"step": "minute", "from": (now - timedelta(days=32)).isoformat()},
            {"from": now.isoformat(), "to": (now - timedelta(hours=1)).isoformat()},
            {"from": "yesterday"},
            {"version": "-1"},
            {"from": "0001-01-01T00:00:00Z", "step": "day"},
        ):
            r = c.get(base, params=params)
            assert r.status_code == 422 and r.json()["error"]["code"] in ("invalid", "validation_error"), (
                params,
                r.text,
            )
        assert c.get(base, params={"step": "hour", "from": (now - timedelta(days=32)).isoformat()}).status_code == 200


def test_concurrent_rollups_count_every_leaf_once(tmp_path: Path, db_url: str) -> None:
    """Several replicas rolling up at once (threads with their own sessions, PostgreSQL row lock
    or SQLite's single writer): every charged leaf is summarised exactly once."""
    import threading

    from marketplace.api.app import create_app
    from marketplace.db.models_monitoring import MonitoringUsage
    from marketplace.services import metering, monitoring_store
    from tests.marketplace.test_contracts_support import make_deal

    app = create_app(make_settings(tmp_path, db_url))
    try:
        w = build_world(app)
        deal = make_deal(w)
        total = 0
        errors: list[BaseException] = []

        def roll() -> None:
            try:
                monitoring_store.rollup(w.rt, batch=3)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        for i in range(24):
            units = 1 + i % 5
            r = metering.begin(
                w.rt,
                deal.consumer,
                offering_id=deal.offering_id,
                mode="remote_job",
                job_kind="predict",
                units=units,
                idempotency_key=f"k{i}",
                request_digest=metering.request_digest(f"k{i}"),
            )
            if i % 7 == 3:
                metering.release(w.rt, r, reason="test")
            else:
                metering.commit(w.rt, r, result=b"r", media_type="application/octet-stream")
                total += units
            if i % 6 == 5:  # interleave: replicas roll up while uses are still being charged
                errors.clear()
                threads = [threading.Thread(target=roll) for _ in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert not errors, errors
        monitoring_store.rollup(w.rt)
        with w.rt.tx() as s:
            rows = list(s.scalars(select(MonitoringUsage).where(MonitoringUsage.offering_id == deal.offering_id)))
        assert sum(r.units for r in rows) == total
        assert sum(r.leaf_count for r in rows) == 24 - 3 and sum(r.released for r in rows) == 3
        assert monitoring_store.rollup(w.rt) == 0  # nothing new: nothing counted twice
    finally:
        app.state.runtime.close()
