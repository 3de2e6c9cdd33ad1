"""Share back: three hospitals improve a shared model without sharing their data.

Run with `make demo` (after the main demo). It starts `som serve` on loopback with a fresh data
directory, then: a provider lists a tumour classifier (a logistic regression, version 1) and
offers contracts in mode `federated`; three hospitals, each holding a disjoint, skewed part of
scikit-learn's breast-cancer data, accept and run `som agent --federation ID --data FILE.csv`;
the provider starts 10 rounds of FedAvg with Flower's SecAgg+ (the marketplace only learns the
sum of the updates); the new version 2 passes the upload validation and is the offering's latest.
Exit code 0 means every step did what it says.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.terms import JobLimits, Terms  # noqa: E402
from crypto.signing import SigningKey  # noqa: E402
from examples.demo import SOM, free_port, ok, som, step  # noqa: E402
from marketplace.db.base import utcnow  # noqa: E402
from marketplace.federated import learning  # noqa: E402
from marketplace.sdk import SomClient  # noqa: E402


def split_data() -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    y = y.astype(np.float64)
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:170], order[170:]
    pos, neg = train[y[train] == 1], train[y[train] == 0]
    parts = [np.concatenate([pos[:150], neg[:30]]), np.concatenate([pos[150:], neg[30:90]]), neg[90:]]
    return [(x[p], y[p]) for p in parts], x[test], y[test]


def accuracy(npz: bytes, x: np.ndarray, y: np.ndarray) -> float:
    z = np.load(io.BytesIO(npz), allow_pickle=False)
    return learning.accuracy([z["layer0.weight"][0], z["layer0.bias"]], x, y)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="som-fl-demo-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update(
        {"SOM_DATA_DIR": str(work / "data"), "SOM_KEY_DIR": str(work / "keys"), "SOM_URL": f"http://127.0.0.1:{port}"}
    )
    url = env["SOM_URL"]
    step("1. The marketplace starts")
    boot = json.loads(som("--json", "admin", "bootstrap", env=env))
    server = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    agents: list[subprocess.Popen[str]] = []
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
        ok(f"server up at {url}")
        admin = SomClient(url, boot["api_key"])
        prov_org = admin.create_org("Oncology Models")
        provider_key = admin.create_key(prov_org["id"], ["provider"])["key"]
        provider = SomClient(url, provider_key)

        step("2. A provider lists a tumour classifier and offers federated contracts")
        parts, x_test, y_test = split_data()
        mean, scale = x_test.mean(0), x_test.std(0) + 1e-12  # the provider's published scaler
        off = provider.create_offering(name="tumour-lr", task="binary-classification", hosting="marketplace")
        provider.upload_version(
            off["id"],
            learning.to_npz(learning.init_params(30), np.zeros(30), np.ones(30)),
            format="npz",
            input_shape=[30],
        )
        provider.publish(off["id"])
        now = utcnow()
        terms = Terms(
            modes=frozenset({"federated", "he_inference"}),
            quota_units=1000,
            rate_units=100,
            rate_window_seconds=60,
            valid_from=now - timedelta(minutes=1),
            valid_until=now + timedelta(days=30),
            unit_price_minor=0,
            currency="EUR",
            max_batch=64,
            job_limits=JobLimits(frozenset({"predict"}), 60, 512, 60),
        )
        offer = provider.publish_offer(off["id"], terms, signing_key=SigningKey.generate())
        ok(f"offering {off['id']} v1 (an untrained logistic regression); offer {offer['id']} allows mode 'federated'")

        step("3. Three hospitals accept; each keeps its own patients")
        hospitals = []
        for i, name in enumerate(["St. Anne", "Northside", "Harbour"]):
            org = admin.create_org(name)
            key = admin.create_key(org["id"], ["consumer"])["key"]
            SomClient(url, key).accept_offer(offer["id"], signing_key=SigningKey.generate())
            csv = work / f"hospital{i}.csv"
            x, y = parts[i]
            csv.write_text(
                ",".join(f"f{j}" for j in range(30))
                + ",label\n"
                + "".join(",".join(repr(float(v)) for v in r) + f",{int(t)}\n" for r, t in zip(x, y))
            )
            hospitals.append((name, key, csv))
            local = learning.train(learning.init_params(30), (x - mean) / scale, y, epochs=50, lr=0.1)
            ok(
                f"{name}: {len(y)} rows ({int(y.mean() * 100)}% benign) in {csv.name}; a model on its own data alone: "
                f"{learning.accuracy(local, (x_test - mean) / scale, y_test):.3f} accuracy"
            )

        step("4. The provider opens a federation: 10 rounds, FedAvg, SecAgg+")
        recipe = {
            "dim": 30,
            "rounds": 10,
            "local_epochs": 5,
            "lr": 0.1,
            "min_participants": 2,
            "mean": mean.tolist(),
            "scale": scale.tolist(),
        }
        fed = json.loads(
            som(
                "--json",
                "federation",
                "create",
                "--offering",
                off["id"],
                "--recipe",
                json.dumps(recipe),
                "--terms",
                json.dumps({"counting": "samples"}),
                env={**env, "SOM_API_KEY": provider_key},
            )
        )
        ok(f"federation {fed['id']} on v1")
        for name, key, csv in hospitals:
            agents.append(
                subprocess.Popen(
                    [*SOM, "--json", "agent", "--federation", fed["id"], "--data", str(csv), "--lease-wait", "2"],
                    env={**env, "SOM_API_KEY": key},
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            ok(f"{name} runs `som agent --federation {fed['id']} --data {csv.name}` (the file never leaves)")
        deadline = time.monotonic() + 120
        while len(provider.federation(fed["id"])["participants"]) < 3:
            if time.monotonic() > deadline:
                raise SystemExit("the hospitals did not join")
            time.sleep(0.2)
        provider.start_federation(fed["id"])
        deadline = time.monotonic() + 300
        while (st := provider.federation(fed["id"]))["status"] in ("open", "running"):
            if time.monotonic() > deadline:
                raise SystemExit("the federation did not finish")
            time.sleep(0.3)
        if st["status"] != "completed":
            raise SystemExit(f"federation {st['status']}: {st['error']}")
        for r in provider.federation_rounds(fed["id"]):
            ok(
                f"round {r['number']}: {len(r['participants'])} masked updates summed; accuracy on the hospitals' data "
                f"{r['metrics']['accuracy']:.3f}; ledger leaves {r['ledger_indexes']}"
            )

        step("5. The new version, validated like any upload, is the offering's latest")
        versions = provider.list_versions(off["id"])
        v2 = versions[-1]
        assert v2["number"] == 2 and v2["id"] == st["result_version_id"]
        ok(
            f"v{v2['number']} {v2['digest'][:23]}… (validated, stored envelope-encrypted); lineage: parent v1, 10 rounds, 3 hospitals"
        )
        for name, key, _ in hospitals:
            rs = SomClient(url, key).federation_receipts(fed["id"])
            ok(f"{name} holds {len(rs)} ledger receipts of its contributions")
        for a in agents:
            a.wait(timeout=60)
        print("federated demo finished: three hospitals improved the shared model")
        return 0
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
