"""Benchmark: encrypted inference as a service, over HTTP (uvicorn on loopback), metered.

Prints a markdown section. For the issue's models, logistic regression on breast cancer and the
64-32-10 MLP with square activation on digits (trained here), it measures the median wall time of
``POST /v1/offerings/{id}/infer`` (prebuilt request frame, fresh idempotency key, metering +
ledger on, the local worker pool computing) for a 4,096-sample batch (slot-per-sample layout) and
for a single sample (single layout), the same evaluation called directly on the engine
(``crypto.he.evaluate``) in this process, key-set sizes and bytes per sample. Client-side encryption and decryption
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


def _train_square_mlp(xtr: np.ndarray, ytr: np.ndarray) -> list[np.ndarray]:
    """64-32-10 with x^2 activation, full-batch Adam in numpy (as tests/crypto/he/conftest.py)."""
    rng = np.random.default_rng(0)
    params = [rng.normal(0, 0.15, (64, 32)), np.zeros(32), rng.normal(0, 0.15, (32, 10)), np.zeros(10)]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(10)[ytr]
    for t in range(1, 401):
        w1, b1, w2, b2 = params
        z1 = xtr @ w1 + b1
        h = z1 * z1
        z2 = h @ w2 + b2
        p = np.exp(z2 - z2.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g2 = (p - onehot) / len(xtr)
        g1 = (g2 @ w2.T) * 2 * z1
        grads = [xtr.T @ g1 + 1e-4 * w1, g1.sum(0), h.T @ g2 + 1e-4 * w2, g2.sum(0)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= 0.01 * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return params


def models() -> dict[str, tuple[bytes, np.ndarray, np.ndarray, np.ndarray]]:
    """The issue's models: {name: (npz, x_train (calibration), x_test, plaintext labels on x_test)}."""
    from sklearn.datasets import load_breast_cancer, load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    lr = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    xd, yd = load_digits(return_X_y=True)
    xd = xd / 16.0
    dtr, dte, ydtr, _ = train_test_split(xd, yd, test_size=0.3, random_state=0)
    w1, b1, w2, b2 = _train_square_mlp(dtr, ydtr)
    mlp_plain = ((dte @ w1 + b1) ** 2 @ w2 + b2).argmax(1)
    return {
        "lr": (_npz([(lr.coef_, lr.intercept_, "sigmoid")]), xtr, xte, lr.predict(xte)),
        "mlp": (_npz([(w1.T, b1, "square"), (w2.T, b2, "softmax")]), dtr, dte, mlp_plain),
    }


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
        modes=frozenset({"he_inference"}),
        quota_units=10**9,
        rate_units=10**9,
        rate_window_seconds=60,
        valid_from=now - timedelta(hours=1),
        valid_until=now + timedelta(days=1),
        unit_price_minor=1,
        currency="EUR",
        max_batch=BATCH,
    )
    offer = make_offer(
        offer_id="ofr_" + secrets.token_hex(8),
        offering_id=offering_id,
        provider_org=orgs["provider"],
        terms=terms,
        signing_key=SigningKey.generate(),
        now=now,
    )
    prov = Principal(key_id="key_bench_p", org_id=orgs["provider"], roles=frozenset({"provider"}))
    cons = Principal(key_id="key_bench_c", org_id=orgs["consumer"], roles=frozenset({"consumer"}))
    with rt.tx() as s:
        svc.publish_offer(s, prov, offering_id, offer.to_dict(), audit.Actor.system())
    c = accept_offer(offer, consumer_org=orgs["consumer"], signing_key=SigningKey.generate(), now=now)
    with rt.tx() as s:
        return str(svc.accept_offer(s, cons, offer.offer_id, c.acceptance.to_dict(), audit.Actor.system()).id)


def run(repeat: int, workers: int) -> str:
    import uvicorn

    from crypto.he import CompiledModel, PublicContext, choose_layout, evaluate
    from marketplace.api.app import create_app
    from marketplace.sdk import SomClient
    from marketplace.services import catalog
    from marketplace.services.he_plans import latest_artifact as _artifact
    from marketplace.settings import Settings
    from tests.conftest import build_world

    tmp = Path(tempfile.mkdtemp(prefix="som-bench-he-"))
    app = create_app(Settings(data_dir=tmp / "data", key_dir=tmp / "keys", workers=workers))
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
    size_rows: list[str] = []
    try:
        w = build_world(app)
        provider = SomClient(url, w.keys["provider"])
        consumer = SomClient(url, w.keys["consumer"])
        for name, (npz, xtr, xte, plain) in models().items():
            d = xtr.shape[1]
            off = provider.create_offering(name=f"bench-{name}", task="classification")["id"]
            provider.upload_version(off, npz, format="npz", input_shape=[d])
            provider.compile_version(off, 1, xtr)
            provider.publish(off)
            cid = contract(w.rt, w.orgs, off)
            with w.rt.tx() as s:
                v = catalog.latest_version(s, off)
                model = CompiledModel.from_bytes(catalog.decrypt_artifact(w.rt, _artifact(s, v.id, "compiled")))
            plan = model.public_plan
            xb = np.resize(xte, (BATCH, d))
            res: dict[str, tuple[float, float]] = {}
            sizes: dict[str, tuple[int, int, int]] = {}  # key set, request, response bytes
            agreement = float("nan")
            for layout, x in (("batch", xb), ("single", xte[:1])):
                sk = consumer.he_keys(off, key_dir=tmp / "keys", layout=layout)
                keyset = sk.public_keyset_bytes()
                ks = consumer.upload_keyset(keyset, contract_id=cid)
                pub = PublicContext.from_bytes(keyset, plan=sk.plan)
                req = sk.encrypt(x)
                over_http = _http_call(consumer, off, req, ks["id"], cid)
                direct = functools.partial(evaluate, model, pub, req)
                res[layout] = (median_time(over_http, repeat), median_time(direct, repeat))
                resp = over_http()
                sizes[layout] = (len(keyset), len(req), len(resp))
                if layout == "batch":
                    out = sk.decrypt(resp)[: len(xte)]
                    labels = (out[:, 0] > 0.5).astype(int) if out.shape[1] == 1 else out.argmax(1)
                    agreement = float(np.mean(labels == plain))
            tp_target, lat_target = TARGETS[name]
            http_b, eng_b = res["batch"]
            http_s, eng_s = res["single"]
            tput, tput_eng = BATCH / http_b, BATCH / eng_b
            auto = choose_layout(plan, 1)
            rows.append(
                f"| {name} | N={plan.poly_modulus_degree} {list(plan.coeff_mod_bit_sizes)} | {tput:,.0f} | "
                f"{tput_eng:,.0f} | {tput / tput_eng:.2f} | {'ok' if tput >= tp_target else 'MISS'} "
                f"({tp_target:,.0f}) | {http_s * 1e3:.1f} | {eng_s * 1e3:.1f} | "
                f"{'ok' if http_s <= lat_target else 'MISS'} ({lat_target * 1e3:.0f}) | {auto} | {agreement:.3f} |"
            )
            kb, rq, rp = sizes["batch"]
            ksing, rq1, rp1 = sizes["single"]
            size_rows.append(
                f"| {name} | {kb / 1e6:.1f} | {ksing / 1e6:.1f} | {rq / BATCH:,.0f} / {rp / BATCH:,.0f} | "
                f"{rq1:,} / {rp1:,} |"
            )
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.runtime.close()
    head = [
        "## HE inference service (HTTP, metered)",
        "",
        f"uvicorn on loopback, SQLite, metering + ledger on, {workers} compute worker(s); medians of {repeat} runs; "
        f"throughput: {BATCH}-sample requests, slot per sample; latency: one sample, one ciphertext (single "
        'layout, which `layout="auto"` picks for one sample); prebuilt request frames, client encryption and '
        "decryption excluded; engine = `crypto.he.evaluate` in the bench process on the same frames.",
        "",
        "| model | params | HTTP samples/s | engine samples/s | ratio | target | 1-sample HTTP ms | engine ms "
        "| target | auto layout (1 sample) | HE vs plaintext agreement |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | ---: |",
    ]
    sizes_head = [
        "",
        "| model | key set MB (batch) | key set MB (single) | bytes/sample batch (request / response) "
        "| bytes single sample (request / response) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(head + rows + sizes_head + size_rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    sys.stdout.write(run(a.repeat, a.workers))


if __name__ == "__main__":
    main()
