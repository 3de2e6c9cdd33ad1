"""Issue 17 item 3: clients retry idempotently.

A real uvicorn server is wrapped in a fault injector that computes and charges a request but holds
its answer past the client's timeout the first time it sees an Idempotency-Key (a lost response).
The SDK retries with the same key and gets the first answer: every request is charged exactly
once, and every answer received is the charged one. `som infer --idempotency-key` killed after
the charge fetches the stored answers when run again, without a second charge. SQLite and
PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import serve_in_thread
from tests.marketplace.test_cli_server import SOM
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract
from tests.marketplace.test_jobs_support import features, offering, to_csv


class LoseFirstAnswer:
    """ASGI wrapper: the first request with a given Idempotency-Key runs to the end (charged), but
    its answer is held ``hold`` seconds (past the client's timeout) before it is sent."""

    def __init__(self, app: Any, hold: float) -> None:
        self.app, self.hold = app, hold
        self.seen: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        key = ""
        if scope["type"] == "http" and scope["method"] == "POST":
            key = dict(scope["headers"]).get(b"idempotency-key", b"").decode()
        if not key:
            await self.app(scope, receive, send)
            return
        self.seen[key] += 1
        if self.seen[key] > 1:
            await self.app(scope, receive, send)
            return
        held: list[dict[str, Any]] = []

        async def keep(message: dict[str, Any]) -> None:
            held.append(message)

        await self.app(scope, receive, keep)
        await asyncio.sleep(self.hold)
        try:
            for m in held:
                await send(m)
        except Exception:  # noqa: BLE001 - the client is long gone: that is the point
            pass


def _charged(rt: Any, contract_id: str, *, settled: bool = True) -> dict[str, bytes]:
    """Charged usage rows (id -> stored result); with ``settled``, none may be left reserved."""
    from marketplace.db.models_contracts import UsageRow

    with rt.tx() as s:
        rows = list(s.scalars(select(UsageRow).where(UsageRow.contract_id == contract_id)))
        out = {}
        for u in rows:
            if not settled and u.state != "charged":
                continue
            assert u.state == "charged", (u.id, u.state)
            out[u.id] = (
                u.result_inline
                if u.result_inline is not None
                else (rt.blobs.get(u.result_blob) if u.result_blob else b"")
            )
        return out


def test_sdk_retries_lost_answers_with_the_same_key_and_is_charged_once(world: Any, tmp_path: Path) -> None:
    from marketplace.sdk import SomClient

    off = lr_offering(world)
    contract = make_contract(world, off)
    job = offering(world, tmp_path, hosting="marketplace")
    d = lr_breast_cancer()
    faulty = LoseFirstAnswer(world.app, hold=4.0)
    with serve_in_thread(faulty) as url:
        c = SomClient(url, world.keys["consumer"], timeout=2.0)
        kd = tmp_path / "he-keys"
        info = c.he_plan(off)
        sk = c.he_keys(off, key_dir=kd, layout="batch", plan_info=info)
        ks = c._keyset_for(off, sk, contract_id=None, key_dir=kd)
        received: dict[str, bytes] = {}
        for i in range(3):
            frame = sk.encrypt(d.x_test[i * 4 : i * 4 + 4])
            body = c.infer_raw(off, frame, keyset_id=ks, idempotency_key=f"lost-{i}")
            assert c.last_usage_id is not None
            received[c.last_usage_id] = body
            np.testing.assert_allclose(sk.decrypt(body)[:, 0], d.plain_proba[i * 4 : i * 4 + 4], atol=1e-3)
        out = c.infer_encrypted(off, d.x_test[:6], key_dir=kd, layout="batch", idempotency_key="lost-sdk")
        np.testing.assert_allclose(out[:, 0], d.plain_proba[:6], atol=1e-3)
        assert c.last_usage_id is not None
        charged = _charged(world.rt, contract)
        assert len(charged) == 4  # usage rows == logical requests: no retry was a second charge
        for uid, body in received.items():
            assert charged[uid] == body  # the answer received is the one charged
        assert all(faulty.seen[k] >= 2 for k in ("lost-0", "lost-1", "lost-2", "lost-sdk/0"))

        # Job submission: the lost answer of POST /v1/jobs is retried into the same job, charged once.
        sub = c.submit_job(job.offering_id, "predict", to_csv(features(7)), idempotency_key="lost-job")
        assert c.wait_job(sub.id, timeout=60)["status"] == "succeeded"
        assert faulty.seen["lost-job"] >= 2
        assert [j["id"] for j in c.jobs()] == [sub.id]
        assert list(_charged(world.rt, job.contract_id)) == [c.job(sub.id)["usage_id"]]


def test_cli_killed_after_the_charge_fetches_the_stored_answer(sqlite_world: Any, tmp_path: Path) -> None:
    world = sqlite_world
    off = lr_offering(world)
    contract = make_contract(world, off)
    d = lr_breast_cancer()
    csv = tmp_path / "x.csv"
    csv.write_text("\n".join(",".join(f"{v:.17g}" for v in row) for row in d.x_test[:5]) + "\n")
    faulty = LoseFirstAnswer(world.app, hold=60.0)
    with serve_in_thread(faulty) as url:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_")}
        env.update({"SOM_URL": url, "SOM_API_KEY": world.keys["consumer"], "SOM_KEY_DIR": str(tmp_path / "he-keys")})
        cmd = [
            *SOM,
            "infer",
            off,
            "--input",
            str(csv),
            "--encrypted",
            "--layout",
            "batch",
            "--idempotency-key",
            "nightly-42",
        ]
        first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # noqa: S603
        deadline = time.monotonic() + 120
        while not _charged(world.rt, contract, settled=False):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run was never charged"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)  # charged, answer never received
        first.wait(timeout=20)
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # noqa: S603
        assert again.returncode == 0, again.stderr
        lines = again.stdout.strip().splitlines()
        assert lines[0] == "probability,label"
        got = np.array([float(ln.split(",")[0]) for ln in lines[1:]])
        np.testing.assert_allclose(got, d.plain_proba[:5], atol=1e-3)
        assert len(_charged(world.rt, contract)) == 1  # the stored answer, not a second charge
        assert faulty.seen["nightly-42/0"] == 2


@pytest.mark.parametrize("status", [503, 409])
def test_retry_policy_honours_retry_after_and_gives_up(status: int) -> None:
    """Unit-level: bounded attempts, Retry-After honoured (capped), the same request resent."""
    import httpx

    from marketplace.sdk.retry import RetryPolicy, send_with_retries

    sent: list[int] = []
    waits: list[float] = []

    def send() -> httpx.Response:
        sent.append(1)
        return httpx.Response(status, headers={"Retry-After": "3"}, json={"error": {"code": "x", "message": "m"}})

    r = send_with_retries(send, RetryPolicy(attempts=4, base_delay=0.0, max_delay=2.0), sleep=waits.append)
    assert r.status_code == status and len(sent) == 4 and waits == [2.0, 2.0, 2.0]
    sent.clear()

    def permanent() -> httpx.Response:
        sent.append(1)
        return httpx.Response(
            503, json={"error": {"code": "unavailable", "message": "m", "reason": "jail_unavailable"}}
        )

    assert send_with_retries(permanent, RetryPolicy(attempts=4), sleep=waits.append).status_code == 503
    assert len(sent) == 1
