"""Benchmark: encrypted inference as a service, over HTTP (uvicorn on loopback), metered.

Prints a markdown section. For logistic regression and a small MLP (breast cancer), it measures
the median wall time of ``POST /v1/offerings/{id}/infer`` (prebuilt request frame, fresh
idempotency key, metering + ledger on, the local worker pool computing) for a 4,096-sample
batch (slot-per-sample layout) and for a single sample, and the same evaluation called directly
on the engine (``crypto.he.evaluate``) in this process. Client-side encryption and decryption
are not included in either number (they run on the consumer's machine).

Run: ``.venv/bin/python bench/bench_he_service.py [--repeat 7]``.
"""

from __future__ import annotations

import argparse
import functools
import io
import secrets
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (tests.conftest.build_world)

TARGETS = {"lr": (20_000.0, 0.050), "mlp": (1_500.0, 0.300)}  # samples/s (batch), seconds (single)
BATCH = 4096


def _npz(layers: list[tuple[np.ndarray, np.ndarray, str]]) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    for i, (w, b, act) in enumerate(layers):
        arrays[f"layer{i}.weight"] = np.asarray(w, dtype=np.float64)
        arrays[f"layer{i}.bias"] = np.asarray(b, dtype=np.float64)
        arrays[f"layer{i}.activation"] = np.array(act)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def models() -> tuple[np.ndarray, np.ndarray, dict[str, tuple[bytes, np.ndarray]]]:
    """(x_train, x_test, {name: (npz, plaintext predictions on x_test)})."""
    import warnings

    from sklearn.datasets import load_breast_cancer
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    lr = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(16,), activation="tanh", max_iter=600, random_state=0).fit(xtr, ytr)
    out = {
        "lr": (_npz([(lr.coef_, lr.intercept_, "sigmoid")]), lr.predict(xte)),
        "mlp": (
            _npz([(mlp.coefs_[0].T, mlp.intercepts_[0], "tanh"), (mlp.coefs_[1].T, mlp.intercepts_[1], "sigmoid")]),
            mlp.predict(xte),
        ),
    }
    return xtr, xte, out


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up (worker caches, connection)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _http_call(client: Any, off: str, req: bytes, keyset_id: str, cid: str) -> Callable[[], bytes]:
    def call() -> bytes:
        out: bytes = client.infer_raw(off, req, keyset_id=keyset_id, idempotency_key=str(uuid.uuid4()), contract_id=cid)
        return out

    return call


def contract(rt: Any, orgs: dict[str, str], offering_id: str) -> str:
    from contracts.offer import accept_offer, make_offer
    from contracts.terms import Terms
    from crypto.signing import SigningKey
    from marketplace.db.base import utcnow
    from marketplace.services import audit
    from marketplace.services import contracts as svc
    from marketplace.services.identity import Principal

    now = utcnow()
    terms = Terms(
        modes=frozenset({"he_inference"}), quota_units=10**9, rate_units=10**9, rate_window_seconds=60,
        valid_from=now - timedelta(hours=1), valid_until=now + timedelta(days=1),
        unit_price_minor=1, currency="EUR", max_batch=BATCH,
    )
    offer = make_offer(offer_id="ofr_" + secrets.token_hex(8), offering_id=offering_id, provider_org=orgs["provider"],
                       terms=terms, signing_key=SigningKey.generate(), now=now)
    prov = Principal(key_id="key_bench_p", org_id=orgs["provider"], roles=frozenset({"provider"}))
    cons = Principal(key_id="key_bench_c", org_id=orgs["consumer"], roles=frozenset({"consumer"}))
    with rt.tx() as s:
        svc.publish_offer(s, prov, offering_id, offer.to_dict(), audit.Actor.system())
    c = accept_offer(offer, consumer_org=orgs["consumer"], signing_key=SigningKey.generate(), now=now)
    with rt.tx() as s:
        return str(svc.accept_offer(s, cons, offer.offer_id, c.acceptance.to_dict(), audit.Actor.system()).id)


def run(repeat: int, workers: int) -> str:
    import uvicorn

    from crypto.he import CompiledModel, PublicContext, evaluate
    from marketplace.api.app import create_app
    from marketplace.sdk import SomClient
    from marketplace.services import catalog
    from marketplace.services.he import _artifact
    from marketplace.settings import Settings
    from tests.conftest import build_world

    tmp = Path(tempfile.mkdtemp(prefix="som-bench-he-"))
    app = create_app(Settings(data_dir=tmp / "data", workers=workers))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    rows: list[str] = []
    try:
        w = build_world(app)
        provider = SomClient(url, w.keys["provider"])
        consumer = SomClient(url, w.keys["consumer"])
        xtr, xte, ms = models()
        for name, (npz, plain) in ms.items():
            off = provider.create_offering(name=f"bench-{name}", task="binary-classification")["id"]
            provider.upload_version(off, npz, format="npz", input_shape=[30])
            provider.compile_version(off, 1, xtr)
            provider.publish(off)
            cid = contract(w.rt, w.orgs, off)
            with w.rt.tx() as s:
                v = catalog.latest_version(s, off)
                model = CompiledModel.from_bytes(catalog.decrypt_artifact(w.rt, _artifact(s, v.id, "compiled")))
            xb = np.resize(xte, (BATCH, xte.shape[1]))
            results: dict[str, tuple[float, float]] = {}
            agreement = float("nan")
            for layout, x in (("batch", xb), ("single", xte[:1])):
                sk = consumer.he_keys(off, key_dir=tmp / "keys", layout=layout)
                ks = consumer.upload_keyset(sk.public_keyset_bytes(), contract_id=cid)
                pub = PublicContext.from_bytes(sk.public_keyset_bytes(), plan=sk.plan)
                req = sk.encrypt(x)

                over_http = _http_call(consumer, off, req, ks["id"], cid)
                direct = functools.partial(evaluate, model, pub, req)

                results[layout] = (median_time(over_http, repeat), median_time(direct, repeat))
                if layout == "batch":
                    out = sk.decrypt(over_http())[: len(xte), 0]
                    agreement = float(np.mean((out > 0.5) == (plain == 1)))
            sk = consumer.he_keys(off, key_dir=tmp / "keys", layout="batch")
            ks_b = consumer.list_keysets()
            ks_id = next(k["id"] for k in ks_b if k["offering_id"] == off and k["layouts"] == ["batch"])
            one = sk.encrypt(xte[:1])
            lat_batch1 = median_time(_http_call(consumer, off, one, ks_id, cid), repeat)
            tp_target, lat_target = TARGETS[name]
            http_b, eng_b = results["batch"]
            http_s, eng_s = results["single"]
            tput, tput_eng = BATCH / http_b, BATCH / eng_b
            latency = min(http_s, lat_batch1)
            rows.append(
                f"| {name} | {tput:,.0f} | {tput_eng:,.0f} | {tput / tput_eng:.2f} | {tp_target:,.0f} | "
                f"{'ok' if tput >= tp_target else 'MISS'} | {http_s * 1e3:.1f} / {lat_batch1 * 1e3:.1f} | "
                f"{eng_s * 1e3:.1f} | {lat_target * 1e3:.0f} | {'ok' if latency <= lat_target else 'MISS'} | "
                f"{agreement:.3f} |"
            )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.runtime.close()
    head = [
        "## HE inference service (HTTP, metered)",
        "",
        f"uvicorn on loopback, SQLite, metering + ledger on, {workers} compute worker(s); medians of {repeat} runs; "
        f"batch = {BATCH} samples, slot per sample; client encryption/decryption excluded.",
        "",
        "| model | HTTP samples/s | engine samples/s | ratio | target | | 1-sample latency ms (single / batch layout) "
        "| engine 1-sample ms | target ms | | HE vs plaintext agreement |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- | ---: |",
    ]
    return "\n".join(head + rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    sys.stdout.write(run(a.repeat, a.workers))


if __name__ == "__main__":
    main()
