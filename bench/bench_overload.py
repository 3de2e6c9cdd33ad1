"""Benchmark: overload, with and without admission control (issue 17 item 9).

Prints a markdown section. A real `som serve` (subprocess, SQLite, metering + ledger on, the
local compute pool) takes a storm of HE inference requests (logistic regression on breast cancer,
a prebuilt one-sample frame in the single layout, a fresh Idempotency-Key each) from N concurrent closed-loop clients
(asyncio + httpx) for a fixed time, while one reader walks the catalog. A shed client waits its
``Retry-After`` before trying again, as the SDK does. Reported per N (50 and 200) and per setting
(``SOM_ADMISSION_CONTROL`` on with its defaults, on with a wider window, and off), in the same run: admitted requests/s,
admitted-request latency p50/p99, shed rate (503 / all answers), other failures (timeouts,
errors), and catalog-read latency p50/p99.

Run: ``.venv/bin/python bench/bench_overload.py [--seconds 15] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root (tests.conftest.build_world)


# One sample, one ciphertext (the single layout, ~87 KB a request): the storm saturates compute, not
# loopback. A batch-layout frame is ~5 MB whatever the sample count, and 200 clients uploading 5 MB
# each measure the network stack and the bench client more than admission control.
LAYOUT, SAMPLES = "single", 1


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(tmp: Path) -> tuple[dict[str, str], str, str, str, bytes]:
    """An LR offering compiled for HE, a contract, the consumer's key set and one request frame
    (all made in-process); returns (server env, consumer key, offering id, keyset id, frame)."""
    from marketplace.api.app import create_app
    from marketplace.settings import Settings
    from tests.conftest import build_world
    from tests.marketplace.test_he_service_support import (
        lr_breast_cancer,
        lr_offering,
        make_contract,
    )

    settings = Settings(data_dir=tmp / "data", key_dir=tmp / "keys")
    app = create_app(settings)
    try:
        world = build_world(app)
        off = lr_offering(world)
        make_contract(world, off)
        c = world.consumer
        sk = c.he_keys(off, key_dir=tmp / "he", layout=LAYOUT)
        ks = c._keyset_for(off, sk, contract_id=None, key_dir=tmp / "he")
        frame = sk.encrypt(lr_breast_cancer().x_test[:SAMPLES])
        key = world.keys["consumer"]
    finally:
        app.state.runtime.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(tmp / "data"), "SOM_KEY_DIR": str(tmp / "keys")})
    return env, key, off, ks, frame


#: (label, settings): the defaults, a wider window, and admission control off.
CONFIGS: list[tuple[str, dict[str, str]]] = [
    ("on (defaults: 4 in flight, 8 waiting)", {}),
    ("on (16 in flight, 16 waiting)", {"SOM_ADMISSION_COMPUTE_CONCURRENCY": "16", "SOM_ADMISSION_QUEUE": "16"}),
    ("off", {"SOM_ADMISSION_CONTROL": "false"}),
]


def serve(env: dict[str, str], overrides: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    e = {**env, **overrides}
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "marketplace.cli", "serve", "--port", str(port)],
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("som serve did not start")


async def storm(url: str, key: str, off: str, ks: str, frame: bytes, clients: int, seconds: float) -> dict[str, Any]:
    ok: list[float] = []
    reads: list[float] = []
    counts = {"shed": 0, "other": 0}
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as h:

        async def client() -> None:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    r = await h.post(
                        f"/v1/offerings/{off}/infer",
                        content=frame,
                        headers={
                            **auth,
                            "Content-Type": "application/octet-stream",
                            "X-Som-Keyset": ks,
                            "Idempotency-Key": str(uuid.uuid4()),
                        },
                    )
                except httpx.TransportError:
                    counts["other"] += 1
                    continue
                if r.status_code == 200:
                    ok.append(time.monotonic() - t0)
                elif r.status_code == 503:
                    counts["shed"] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                else:
                    counts["other"] += 1

        async def reader() -> None:
            while time.monotonic() < end:
                t0 = time.monotonic()
                try:
                    r = await h.get("/v1/offerings", headers=auth)
                    if r.status_code == 200:
                        reads.append(time.monotonic() - t0)
                except httpx.TransportError:
                    counts["other"] += 1
                await asyncio.sleep(0.1)

        t0 = time.monotonic()
        await asyncio.gather(reader(), *(client() for _ in range(clients)))
        took = time.monotonic() - t0
    return {"ok": ok, "reads": reads, "took": took, **counts}


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(xs)


def run(seconds: float, levels: list[int]) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="som-bench-overload-"))
    env, key, off, ks, frame = setup(tmp)
    rows = []
    for clients in levels:
        for label, overrides in CONFIGS:
            proc, url = serve(env, overrides)
            try:
                httpx.post(
                    f"{url}/v1/offerings/{off}/infer",
                    content=frame,
                    timeout=60,
                    headers={  # warm the pool
                        "Authorization": f"Bearer {key}",
                        "Content-Type": "application/octet-stream",
                        "X-Som-Keyset": ks,
                        "Idempotency-Key": str(uuid.uuid4()),
                    },
                )
                res = asyncio.run(storm(url, key, off, ks, frame, clients, seconds))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            ok, reads = res["ok"], res["reads"]
            answers = len(ok) + res["shed"]
            rows.append(
                f"| {clients} | {label} | {len(ok) / res['took']:.1f} | "
                f"{_q(ok, 50) * 1e3:,.0f} | {_q(ok, 99) * 1e3:,.0f} | "
                f"{(res['shed'] / answers if answers else 0) * 100:.0f}% | {res['other']} | "
                f"{_q(reads, 50) * 1e3:,.0f} | {_q(reads, 99) * 1e3:,.0f} |"
            )
    head = [
        "## Overload: admission control",
        "",
        f"`som serve` (subprocess, SQLite, metering + ledger on, 2 compute workers, a 2 s queue wait) "
        f"under N closed-loop clients for {seconds:g} s each, HE inference "
        f"of a {SAMPLES}-sample LR frame in the {LAYOUT} layout ({{frame_kb}} KB, fresh key each), a shed client "
        "waiting its Retry-After; one catalog reader "
        "(`GET /v1/offerings`, every 0.1 s) alongside. Same run, same data, each setting in turn.",
        "",
        "| clients | admission | admitted req/s | admitted p50 ms | admitted p99 ms | shed | other failures "
        "| catalog read p50 ms | catalog read p99 ms |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return "\n".join(head + rows).replace("{frame_kb}", f"{len(frame) / 1e3:,.0f}") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    sys.stdout.write(run(3.0 if a.quick else a.seconds, [50] if a.quick else [50, 200]))


if __name__ == "__main__":
    main()
