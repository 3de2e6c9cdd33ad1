"""The real thing: `som serve` (uvicorn on loopback) driven by the `som` CLI in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.marketplace.models import breast_cancer_lr, npz_bytes

SOM = [sys.executable, "-m", "marketplace.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def som(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*SOM, *args], env=env, capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"som {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def server(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    """`som serve` on loopback, on SQLite and on PostgreSQL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(tmp_path / "data"), "SOM_URL": f"http://127.0.0.1:{port}", "DATABASE_URL": db_url})
    boot = json.loads(som("--json", "admin", "bootstrap", env=env).stdout)
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise AssertionError(f"server did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.1)
        yield env, boot["api_key"]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    log = tmp_path / "data" / "logs" / "som.log"
    text = log.read_text() if log.exists() else ""
    assert "unhandled error" not in text, f"the server answered 500:\n{text[-3000:]}"


def test_cli_story_over_a_real_server(server, tmp_path: Path) -> None:
    env, admin_key = server
    admin = {**env, "SOM_API_KEY": admin_key}
    prov_org = json.loads(som("--json", "org", "create", "Acme Models", env=admin).stdout)["id"]
    cons_org = json.loads(som("--json", "org", "create", "Beta Clinic", env=admin).stdout)["id"]
    comp_org = json.loads(som("--json", "org", "create", "Audit Co", env=admin).stdout)["id"]
    pkey = json.loads(som("--json", "key", "create", "--org", prov_org, "--role", "provider", env=admin).stdout)["key"]
    ckey = json.loads(som("--json", "key", "create", "--org", cons_org, "--role", "consumer", env=admin).stdout)["key"]
    akey = json.loads(som("--json", "key", "create", "--org", comp_org, "--role", "compliance", env=admin).stdout)[
        "key"
    ]
    prov, cons, comp = ({**env, "SOM_API_KEY": k} for k in (pkey, ckey, akey))

    card = tmp_path / "card.md"
    card.write_text("# Breast cancer LR\nTrained on sklearn's data.")
    off = json.loads(
        som(
            "--json",
            "offering",
            "create",
            "--name",
            "cancer-lr",
            "--task",
            "binary-classification",
            "--tag",
            "medical",
            "--model-card",
            str(card),
            env=prov,
        ).stdout
    )
    _, _, _, w, b, _ = breast_cancer_lr()
    model = tmp_path / "model.npz"
    model.write_bytes(npz_bytes(w, b))
    v = json.loads(som("--json", "offering", "upload", off["id"], str(model), "--input-shape", "30", env=prov).stdout)
    assert v["number"] == 1 and v["digest"].startswith("sha256:")
    som("offering", "publish", off["id"], env=prov)
    listed = json.loads(som("--json", "offering", "list", "--q", "cancer", env=cons).stdout)
    assert [o["id"] for o in listed] == [off["id"]]
    human = som("offering", "list", env={**cons, "COLUMNS": "160"}).stdout
    assert "cancer-lr" in human and off["id"] in human
    events = json.loads(som("--json", "audit", "list", env=comp).stdout)
    assert {"offering.publish", "offering.version.add", "key.create"} <= {e["action"] for e in events}
    # every audit event, including the bootstrap done by the CLI before the server ran, is a ledger leaf
    from marketplace.sdk import SomClient

    leaves = SomClient(env["SOM_URL"], akey).ledger_leaves()
    audit_ids = {
        json.loads(__import__("base64").b64decode(x["leaf"]))["event_id"]
        for x in leaves
        if json.loads(__import__("base64").b64decode(x["leaf"]))["schema"] == "som.audit/v1"
    }
    assert {e["id"] for e in events} <= audit_ids

    # errors: clear message, non-zero exit, no traceback
    r = som("offering", "show", off["id"], env={**env, "SOM_API_KEY": "som_bad_key"}, check=False)
    assert r.returncode == 1 and "401" in r.stderr and "Traceback" not in r.stderr
    r = som("audit", "list", env=cons, check=False)
    assert r.returncode == 1 and "403" in r.stderr
    r = som("offering", "show", "off_nope", env=cons, check=False)
    assert r.returncode == 1 and "404" in r.stderr
    pickled = tmp_path / "evil.npz"
    pickled.write_bytes(b"\x80\x04\x95evil")
    r = som("offering", "upload", off["id"], str(pickled), env=prov, check=False)
    assert r.returncode == 1 and "415" in r.stderr and "pickle" in r.stderr


def test_cli_without_server_or_key_fails_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_")}
    env["SOM_URL"] = f"http://127.0.0.1:{free_port()}"
    r = som("offering", "list", env=env, check=False)
    assert r.returncode != 0 and "SOM_API_KEY" in r.stderr
    r = som("offering", "list", env={**env, "SOM_API_KEY": "som_x_y"}, check=False)
    assert r.returncode == 2 and "cannot reach" in r.stderr and "Traceback" not in r.stderr
    r = som("--help", env=env)
    for group in ("serve", "admin", "org", "key", "offering", "audit"):
        assert group in r.stdout
