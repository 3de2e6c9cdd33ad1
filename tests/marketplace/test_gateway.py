"""The inference gateway through a real server (uvicorn on loopback), on SQLite and PostgreSQL.

Marketplace-hosted (ONNX Runtime in a worker process) and provider-hosted (a real ``som agent``
subprocess); JSON and CSV; exactly-once metering with Idempotency-Key replays; receipts that
verify offline; ``Server-Timing``; micro-batching gives the same predictions as none; answers
equal ONNX Runtime on the uploaded model and numpy.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marketplace.sdk import SomAPIError
from marketplace.sdk.ledger_api import verify_receipt
from tests.marketplace.test_gateway_support import (
    features,
    gw_offering,
    http_client,
    lr_numpy,
    mlp_numpy,
    mlp_onnx,
    onnx_reference,
    served,
    som_agent,
    to_csv,
    usage_states,
    used_units,
)

TIMING = ("queue", "model", "metering", "total")


@pytest.fixture
def gw(tmp_path: Path, db_url: str) -> Iterator[tuple[Any, str]]:
    with served(tmp_path, db_url) as out:
        yield out


def _post(url: str, key: str, off: str, body: bytes, ctype: str, *, idem: str | None = None, **headers: str) -> Any:
    import httpx

    h = {"Authorization": f"Bearer {key}", "Content-Type": ctype, **headers}
    if idem is not False:
        h["Idempotency-Key"] = idem or str(uuid.uuid4())
    return httpx.post(f"{url}/v1/offerings/{off}/predict", content=body, headers=h, timeout=30)


def _timing(r: Any) -> dict[str, float]:
    from marketplace.sdk.gateway_api import parse_server_timing

    return parse_server_timing(r.headers.get("server-timing"))


def _leaf(receipt: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(receipt["leaf"])))


def _read_csv(data: bytes) -> tuple[list[str], np.ndarray]:
    rows = list(csv.reader(io.StringIO(data.decode())))
    return rows[0], np.asarray([[float(v) for v in r] for r in rows[1:]])


# ---------------------------------------------------------------- marketplace-hosted


def test_marketplace_hosted_json_and_csv_metered_with_receipts(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    g = gw_offering(w, tmp_path)
    consumer = http_client(url, w.keys["consumer"])
    x = features(5)
    y = consumer.predict(g.offering_id, x)
    assert y.shape == (5, 1)
    np.testing.assert_allclose(y, lr_numpy(g.weight, g.bias, x), rtol=1e-12, atol=1e-15)
    assert set(consumer.last_timing or {}) == set(TIMING)
    assert all(v >= 0 for v in (consumer.last_timing or {}).values())
    vkey = consumer.ledger_key()
    receipt = consumer.last_receipt
    assert receipt is not None
    verify_receipt(receipt, vkey)
    leaf = _leaf(receipt)
    assert (leaf["mode"], leaf["units"], leaf["outcome"], leaf["contract_id"]) == (
        "gateway",
        5,
        "charged",
        g.contract_id,
    )
    assert leaf["usage_id"] == consumer.last_usage_id
    # CSV in (with a header line), CSV out
    r = _post(url, w.keys["consumer"], g.offering_id, to_csv(x[:3], header=True), "text/csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    head, vals = _read_csv(r.content)
    assert head == ["y0"]
    np.testing.assert_allclose(vals, lr_numpy(g.weight, g.bias, x[:3]), rtol=1e-12)
    assert set(_timing(r)) == set(TIMING) and r.headers["x-som-units"] == "3" and r.headers["x-som-version"] == "1"
    verify_receipt(json.loads(base64.urlsafe_b64decode(r.headers["x-som-receipt"] + "==")), vkey)
    # CSV in, JSON out when asked
    r = _post(url, w.keys["consumer"], g.offering_id, to_csv(x[:2]), "text/csv", Accept="application/json")
    assert r.status_code == 200 and r.json()["units"] == 2 and len(r.json()["outputs"]) == 2
    assert usage_states(w.rt, g.contract_id or "") == [("charged", 2), ("charged", 3), ("charged", 5)]
    assert used_units(w.rt, g.contract_id or "") == (10, 0)
    # the decrypt of the artifact into the worker's memory is audited once (warm session after)
    events = [
        e
        for e in w.admin.paginate("/v1/audit", action="artifact.decrypt")
        if e["detail"].get("purpose") == "gateway_load"
    ]
    assert len(events) == 1


def test_idempotency_key_replays_and_charges_once(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    g = gw_offering(w, tmp_path)
    key = w.keys["consumer"]
    body = json.dumps({"rows": features(4).tolist()}).encode()
    idem = str(uuid.uuid4())
    first = _post(url, key, g.offering_id, body, "application/json", idem=idem)
    again = _post(url, key, g.offering_id, body, "application/json", idem=idem)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["x-som-replay"] == "true"
    assert again.headers["x-som-usage-id"] == first.headers["x-som-usage-id"]
    assert again.headers["x-som-receipt"] == first.headers["x-som-receipt"]
    assert "server-timing" in again.headers
    # the same key with other rows is refused, nothing charged
    other = _post(
        url,
        key,
        g.offering_id,
        json.dumps({"rows": features(4, seed=9).tolist()}).encode(),
        "application/json",
        idem=idem,
    )
    assert other.status_code == 422 and "server-timing" in other.headers
    # missing key
    assert _post(url, key, g.offering_id, body, "application/json", idem=False).status_code == 422  # type: ignore[arg-type]
    assert usage_states(w.rt, g.contract_id or "") == [("charged", 4)]
    assert used_units(w.rt, g.contract_id or "") == (4, 0)


def test_inputs_and_predictions_are_not_stored_in_the_clear(tmp_path: Path, sqlite_url: str) -> None:
    """The rows are never stored (the usage record holds their digest); the answer kept for
    replays is sealed under a key derived from the Idempotency-Key (stored only as a digest)."""
    from tests.scan import find_bytes, float_patterns

    with served(tmp_path, sqlite_url) as (w, url):
        g = gw_offering(w, tmp_path)
        x = features(4, seed=77) * 0.3 + 0.123456789  # predictions well inside (0, 1)
        idem = str(uuid.uuid4())
        body = json.dumps({"rows": x.tolist()}).encode()
        r = _post(url, w.keys["consumer"], g.offering_id, body, "application/json", idem=idem)
        assert r.status_code == 200
        y = np.asarray(r.json()["outputs"])
        csv_r = _post(url, w.keys["consumer"], g.offering_id, to_csv(x), "text/csv")
        again = _post(url, w.keys["consumer"], g.offering_id, body, "application/json", idem=idem)
        assert again.content == r.content  # the replay opens with the key
        rt = w.rt
        paths = [rt.data_dir, Path(rt.engine.url.database or "")]
        assert find_bytes(float_patterns(x), paths=paths) == []
        assert find_bytes(float_patterns(y), paths=paths) == []
        assert find_bytes([r.content[:40], csv_r.content[:40], idem.encode()], paths=paths) == []


def test_onnx_upload_answers_equal_onnxruntime_and_numpy(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    data, params = mlp_onnx()
    g = gw_offering(w, tmp_path, artifact=(data, "onnx"))
    x = features(7, seed=5)
    y = http_client(url, w.keys["consumer"]).predict(g.offering_id, x)
    assert y.shape == (7, 3)
    np.testing.assert_allclose(y, onnx_reference(data, x), rtol=1e-5, atol=1e-6)  # ORT on the uploaded float32 graph
    np.testing.assert_allclose(y, mlp_numpy(params, x), rtol=1e-9, atol=1e-12)  # exact float64 math
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-12)


def test_new_version_is_served_at_once(gw: tuple[Any, str], tmp_path: Path) -> None:
    from tests.marketplace.test_gateway_support import lr_npz

    w, url = gw
    g = gw_offering(w, tmp_path)
    c = http_client(url, w.keys["consumer"])
    x = features(2)
    np.testing.assert_allclose(c.predict(g.offering_id, x), lr_numpy(g.weight, g.bias, x), rtol=1e-12)
    w2, b2 = -g.weight, g.bias + 1.0
    w.provider.upload_version(g.offering_id, lr_npz(w2, b2), format="npz")
    np.testing.assert_allclose(c.predict(g.offering_id, x), lr_numpy(w2, b2, x), rtol=1e-12)


def test_micro_batching_gives_the_same_predictions_metered_per_call(tmp_path: Path, sqlite_url: str) -> None:
    from marketplace.services.gateway import Batcher

    n = 16
    xs = [features(1 + i % 3, seed=100 + i) for i in range(n)]
    answers: dict[float, list[np.ndarray]] = {}
    for window in (0.0, 50.0):
        d = tmp_path / f"w{int(window)}"
        d.mkdir()
        with served(d, f"sqlite:///{d / 'som.db'}", gateway_batch_window_ms=window) as (w, url):
            g = gw_offering(w, d)
            clients = [http_client(url, w.keys["consumer"]) for _ in range(n)]
            clients[0].predict(g.offering_id, xs[0][:1])  # warm the worker before the burst
            out: list[Any] = [None] * n
            barrier = threading.Barrier(n)

            def call(i: int) -> None:
                barrier.wait()  # noqa: B023
                out[i] = clients[i].predict(g.offering_id, xs[i])  # noqa: B023

            ts = [threading.Thread(target=call, args=(i,)) for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join(timeout=60)
            answers[window] = out
            for i in range(n):
                np.testing.assert_allclose(out[i], lr_numpy(g.weight, g.bias, xs[i]), rtol=1e-12)
            states = usage_states(w.rt, g.contract_id or "")
            assert len(states) == n + 1 and all(s == "charged" for s, _ in states)
            assert sorted(u for _, u in states) == sorted([1] + [x.shape[0] for x in xs])
            batcher = w.rt.gateway_state[1]
            if window:
                assert isinstance(batcher, Batcher) and batcher.runs < n  # calls were stacked
            else:
                assert batcher is None
            for c in clients:
                c.close()
    for a, b in zip(answers[0.0], answers[50.0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- provider-hosted


def test_provider_hosted_through_a_real_som_agent(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    g = gw_offering(w, tmp_path, hosting="provider")
    consumer = http_client(url, w.keys["consumer"])
    with pytest.raises(SomAPIError) as e:  # no agent connected yet: prompt 503, nothing reserved
        consumer.predict(g.offering_id, features(1))
    assert e.value.status == 503 and "retry-after" in {k.lower() for k in e.value.headers}
    assert usage_states(w.rt, g.contract_id or "") == []
    with som_agent(w, url, g, tmp_path):
        x = features(6)
        y = consumer.predict(g.offering_id, x)
        np.testing.assert_allclose(y, lr_numpy(g.weight, g.bias, x), rtol=1e-12)
        assert set(consumer.last_timing or {}) == set(TIMING)
        receipt = consumer.last_receipt
        assert receipt is not None
        verify_receipt(receipt, consumer.ledger_key())
        assert _leaf(receipt)["mode"] == "gateway"
        r = _post(url, w.keys["consumer"], g.offering_id, to_csv(x[:2]), "text/csv")
        assert r.status_code == 200
        np.testing.assert_allclose(_read_csv(r.content)[1], lr_numpy(g.weight, g.bias, x[:2]), rtol=1e-12)
        # a replay is answered by the marketplace, not recomputed
        idem = str(uuid.uuid4())
        body = json.dumps({"rows": x[:1].tolist()}).encode()
        a = _post(url, w.keys["consumer"], g.offering_id, body, "application/json", idem=idem)
        b = _post(url, w.keys["consumer"], g.offering_id, body, "application/json", idem=idem)
        assert a.content == b.content and b.headers["x-som-replay"] == "true"
        # the width the agent announced is checked before anything is reserved
        bad = _post(
            url, w.keys["consumer"], g.offering_id, json.dumps({"rows": [[1.0, 2.0]]}).encode(), "application/json"
        )
        assert bad.status_code == 422 and "columns" in bad.json()["error"]["message"]
        # the weights never reached the marketplace
        assert w.provider.get_json(f"/v1/offerings/{g.offering_id}/versions") == []
        assert usage_states(w.rt, g.contract_id or "") == [("charged", 1), ("charged", 2), ("charged", 6)]
    # the agent is gone: the call waits at most gateway_agent_timeout_seconds, 503 + Retry-After,
    # and the reservation is released (recorded, uncharged)
    with pytest.raises(SomAPIError) as e:
        consumer.predict(g.offering_id, features(1))
    assert e.value.status == 503 and "retry-after" in {k.lower() for k in e.value.headers}
    assert usage_states(w.rt, g.contract_id or "") == [("charged", 1), ("charged", 2), ("charged", 6), ("released", 1)]
    assert used_units(w.rt, g.contract_id or "") == (9, 0)


def test_provider_and_marketplace_hosted_agree(gw: tuple[Any, str], tmp_path: Path) -> None:
    w, url = gw
    mk = gw_offering(w, tmp_path)
    st = gw_offering(w, tmp_path, hosting="provider")
    c = http_client(url, w.keys["consumer"])
    x = features(8, seed=21)
    with som_agent(w, url, st, tmp_path):
        np.testing.assert_allclose(c.predict(st.offering_id, x), c.predict(mk.offering_id, x), rtol=1e-12)


# ---------------------------------------------------------------- CLI


def test_som_predict_cli_csv_json_and_npy(tmp_path: Path, sqlite_url: str) -> None:
    import os
    import subprocess
    import sys

    with served(tmp_path, sqlite_url) as (w, url):
        g = gw_offering(w, tmp_path)
        x = features(3)
        want = lr_numpy(g.weight, g.bias, x)
        env = {**os.environ, "SOM_URL": url, "SOM_API_KEY": w.keys["consumer"]}
        (tmp_path / "rows.csv").write_bytes(to_csv(x, header=True))
        (tmp_path / "rows.json").write_text(json.dumps({"rows": x.tolist()}))
        np.save(tmp_path / "rows.npy", x)

        def som(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "marketplace.cli", *args],
                env=env,
                capture_output=True,  # noqa: S603
                text=True,
                timeout=120,
                check=False,
            )

        r = som("predict", g.offering_id, "--input", str(tmp_path / "rows.csv"))
        assert r.returncode == 0, r.stderr
        np.testing.assert_allclose(_read_csv(r.stdout.encode())[1], want, rtol=1e-12)
        for name in ("rows.json", "rows.npy"):
            r = som(
                "--json", "predict", g.offering_id, "--input", str(tmp_path / name), "--idempotency-key", f"k-{name}"
            )
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            np.testing.assert_allclose(doc["outputs"], want, rtol=1e-12)
            assert doc["usage_id"] and isinstance(doc["ledger_index"], int) and set(doc["timing_ms"]) == set(TIMING)
        r = som(
            "--json",
            "predict",
            g.offering_id,
            "--input",
            str(tmp_path / "rows.json"),
            "--idempotency-key",
            "k-rows.json",
        )
        assert json.loads(r.stdout)["replay"] is True
        assert usage_states(w.rt, g.contract_id or "") == [("charged", 3)] * 3
        (tmp_path / "bad.csv").write_text("1,2\n3\n")
        r = som("predict", g.offering_id, "--input", str(tmp_path / "bad.csv"))
        assert r.returncode != 0 and "line 2" in r.stderr
