"""Fault tests over real processes: `som serve` (uvicorn on loopback) and `som agent` subprocesses.

Kill the agent mid-job (the job is re-leased after its lease and charged once); restart the
server mid-job (nothing is lost); drive the agent and job commands through the CLI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from crypto.signing import SigningKey
from marketplace.compute.payload import code_digest
from marketplace.sdk import SomClient
from tests.marketplace.test_cli_server import SOM, free_port, som
from tests.marketplace.test_jobs_support import (
    features,
    model_arrays,
    model_npz,
    terms,
    to_csv,
    write_signing_key,
)

pytestmark = pytest.mark.slow


class Server:
    def __init__(self, env: dict[str, str], port: int) -> None:
        self.env, self.port = env, port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - fixed argv
            [*SOM, "serve", "--port", str(self.port)],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update(
        {
            "SOM_DATA_DIR": str(tmp_path / "data"),
            "SOM_URL": f"http://127.0.0.1:{port}",
            "SOM_AGENT_LEASE_SECONDS": "2",
            "SOM_AGENT_OFFLINE_SECONDS": "4",
            "SOM_WORKERS": "1",
            "SOM_JOB_KEYS": str(tmp_path / "job-keys"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
        }
    )
    admin_key = json.loads(som("--json", "admin", "bootstrap", env=env).stdout)["api_key"]
    srv = Server(env, port)
    srv.start()
    url = env["SOM_URL"]
    admin = SomClient(url, admin_key)
    keys = {}
    for name, role in (("provider", "provider"), ("consumer", "consumer")):
        org = admin.create_org(f"{name}-org")
        keys[name] = admin.create_key(org["id"], [role], name=name)["key"]
    prov, cons = SomClient(url, keys["provider"]), SomClient(url, keys["consumer"])
    off = prov.create_offering(name="risk", task="binary-classification", hosting="provider")
    prov.publish(off["id"])
    p_key = SigningKey.generate()
    offer = prov.publish_offer(off["id"], terms(), signing_key=p_key)
    contract = cons.accept_offer(offer["id"], signing_key=SigningKey.generate())
    w, b = model_arrays()
    machine = tmp_path / "provider-machine"
    machine.mkdir()
    key_file = write_signing_key(machine / "provider.key", p_key)
    (machine / "model.npz").write_bytes(model_npz(w, b))
    agent_key = prov.create_agent_key([off["id"]])["key"]
    agents: list[subprocess.Popen[bytes]] = []

    def start_agent() -> subprocess.Popen[bytes]:
        p = subprocess.Popen(  # noqa: S603 - fixed argv
            [
                *SOM,
                "agent",
                "--offering",
                off["id"],
                "--model",
                str(machine / "model.npz"),
                "--lease-wait",
                "2",
                "--workdir",
                str(machine / "work"),
                "--signing-key",
                str(key_file),
            ],
            env={**env, "SOM_API_KEY": agent_key},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        agents.append(p)
        deadline = time.monotonic() + 30
        # online at hello; jobs can be sealed to it once the provider's statement is registered
        while not cons.get_offering(off["id"])["agent_online"] or not any(
            off["id"] in a.get("vouched", []) and a["online"] for a in prov.get_json("/v1/agents")
        ):
            if time.monotonic() > deadline or p.poll() is not None:
                raise AssertionError("agent did not come online with a vouched sealing key")
            time.sleep(0.1)
        return p

    try:
        yield {
            "env": env,
            "server": srv,
            "provider": prov,
            "consumer": cons,
            "offering": off["id"],
            "contract": contract["id"],
            "start_agent": start_agent,
            "w": w,
            "b": b,
            "admin": admin,
        }
    finally:
        for p in agents:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        srv.stop()


def _usage(stack: dict[str, Any]) -> list[tuple[str, int]]:
    """Usage rows of the contract, read straight from the server's SQLite file."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from marketplace.db.models_contracts import UsageRow

    engine = create_engine(f"sqlite:///{Path(stack['env']['SOM_DATA_DIR']) / 'som.db'}")
    try:
        with Session(engine) as s:
            rows = s.scalars(
                select(UsageRow).where(UsageRow.contract_id == stack["contract"]).order_by(UsageRow.reserved_at)
            )
            return [(u.state, u.units) for u in rows]
    finally:
        engine.dispose()


def _wait(cons: SomClient, job_id: str, pred: Any, timeout: float = 30) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        j = cons.job(job_id)
        if pred(j) or time.monotonic() > end:
            return j
        time.sleep(0.1)


def test_kill_agent_mid_job_releases_and_charges_once(stack: dict[str, Any]) -> None:
    cons, prov = stack["consumer"], stack["provider"]
    a1 = stack["start_agent"]()
    code = "import time\ntime.sleep(2)\nopen('outputs/done.txt','w').write('yes')\n"
    sub = cons.submit_job(stack["offering"], "custom", b"1\n", code=code, limits={"wall_seconds": 20})
    prov.approve_job(sub.id, code_digest(code))
    job = _wait(cons, sub.id, lambda j: j["status"] == "running")
    assert job["status"] == "running" and job["attempts"] == 1
    a1.kill()  # SIGKILL: no goodbye, no result
    a1.wait()
    stack["start_agent"]()
    job = _wait(cons, sub.id, lambda j: j["status"] in ("succeeded", "failed"), timeout=60)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["charged"]
    assert cons.job_result(sub.id, sub.reply_key).outputs == ("done.txt",)
    assert _usage(stack) == [("charged", 1)]


def test_restart_server_mid_job_loses_nothing(stack: dict[str, Any]) -> None:
    cons, srv = stack["consumer"], stack["server"]
    stack["start_agent"]()
    x = features(5)
    queued = cons.submit_job(stack["offering"], "predict", to_csv(x))
    assert _wait(cons, queued.id, lambda j: j["status"] == "succeeded")["status"] == "succeeded"
    code = "import time\ntime.sleep(3)\nprint('slept')\n"
    sub = cons.submit_job(stack["offering"], "custom", b"1\n", code=code, limits={"wall_seconds": 20})
    stack["provider"].approve_job(sub.id, code_digest(code))
    assert _wait(cons, sub.id, lambda j: j["status"] == "running")["status"] == "running"
    srv.stop()
    time.sleep(1.0)
    srv.start()
    job = _wait(cons, sub.id, lambda j: j["status"] in ("succeeded", "failed", "expired"), timeout=60)
    assert job["status"] == "succeeded" and job["charged"], job
    assert "slept" in cons.job_result(sub.id, sub.reply_key).stdout
    # the first job's result survived the restart too
    assert cons.job_result(queued.id, queued.reply_key).metrics["rows"] == 5
    assert sorted(_usage(stack)) == [("charged", 1), ("charged", 5)]


def test_cli_submit_status_result(stack: dict[str, Any], tmp_path: Path) -> None:
    stack["start_agent"]()
    env = {**stack["env"], "SOM_API_KEY": stack["consumer"].api_key}
    data = tmp_path / "data.csv"
    data.write_bytes(to_csv(features(4)))
    out = json.loads(
        som("--json", "job", "submit", stack["offering"], "--kind", "predict", "--input", str(data), env=env).stdout
    )
    assert out["status"] == "queued" and Path(out["reply_key"]).stat().st_mode & 0o077 == 0
    _wait(stack["consumer"], out["id"], lambda j: j["status"] == "succeeded")
    st = json.loads(som("--json", "job", "status", out["id"], env=env).stdout)
    assert st["status"] == "succeeded" and st["charged"] is True
    res = tmp_path / "pred.csv"
    som("--json", "job", "result", out["id"], "--out", str(res), env=env)
    assert len(res.read_text().splitlines()) == 4
    r = som("job", "cancel", out["id"], env=env, check=False)
    assert r.returncode != 0 and "409" in r.stderr
    # a provider key the agent's sealing key is not vouched for by: nothing is sealed or sent
    r = som(
        "job",
        "submit",
        stack["offering"],
        "--input",
        str(data),
        "--provider-key",
        SigningKey.generate().verify_key.to_text(),
        env=env,
        check=False,
    )
    assert r.returncode != 0 and "refusing to seal" in " ".join(r.stderr.split()), r.stderr
    # the organisation's own key file pins the acceptance: the contract was signed by another key here
    own = tmp_path / "config" / "som" / "consumer-org.key"
    write_signing_key(own, SigningKey.generate())
    r = som("job", "submit", stack["offering"], "--input", str(data), env=env, check=False)
    assert r.returncode != 0 and "does not verify" in " ".join(r.stderr.split()), r.stderr
