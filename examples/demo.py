"""The whole Share-of-Model story on one machine (embedded default: SQLite, local workers).

Run with `make demo`. It starts `som serve` on loopback with a fresh data directory, then:
a provider lists a model, a consumer finds it and accepts a contract, runs encrypted inference and
a remote job, and a compliance officer lists the audit trail, exports the ledger and verifies it.
Exit code 0 means every step did what it says.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.terms import JobLimits, Terms  # noqa: E402
from crypto.logverify import vkey_fingerprint  # noqa: E402
from crypto.signing import SigningKey  # noqa: E402
from marketplace.sdk import SomAPIError, SomClient  # noqa: E402
from marketplace.sdk.ledger_api import verify_receipt  # noqa: E402

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
    np.savez(
        buf,
        **{
            "layer0.weight": clf.coef_.astype(np.float64),
            "layer0.bias": clf.intercept_.astype(np.float64),
            "layer0.activation": np.array("sigmoid"),
        },
    )
    return Xtr, Xte, yte, clf.decision_function(Xte), buf.getvalue()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="som-demo-"))
    data_dir = work / "data"
    key_dir = work / "keys"  # the secret keys live outside the data directory (docs/crypto-at-rest.md)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(data_dir), "SOM_KEY_DIR": str(key_dir), "SOM_URL": f"http://127.0.0.1:{port}"})
    url = env["SOM_URL"]

    step("1. Operator starts the marketplace")
    boot = json.loads(som("--json", "admin", "bootstrap", env=env))
    ok(f"data dir {data_dir}, keys in {key_dir}; first admin key {boot['api_key'][:16]}… (shown once)")
    server = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
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
    # The log's verifier key, fetched once at setup (GET /v1/ledger/key) and kept: the officer and
    # the consumer check exports and receipts against it, never against a key shipped with them.
    # In real life compare its fingerprint with the one the operator publishes.
    log_vkey = compliance.ledger_key()
    (work / "log.vkey").write_text(log_vkey + "\n")
    ok(f"log key pinned at setup: {log_vkey.split('+')[0]} fingerprint {vkey_fingerprint(log_vkey)}")

    step("2. Provider lists a model")
    Xtr, Xte, yte, plain_logits, npz = train_model()
    off = provider.create_offering(
        name="breast-cancer-risk",
        task="binary-classification",
        tags=["medical", "tabular"],
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

    step("3b. A private listing, shared with one organisation, validated before it is published")
    private = provider.create_offering(
        name="triage-private",
        task="binary-classification",
        hosting="marketplace",
        visibility="shared",
        description="Shared with Beta Clinic only.",
    )
    provider.upload_version(private["id"], npz, format="npz", input_shape=[30])
    declared = float(np.mean((plain_logits > 0) == (yte > 0.5)))
    rep = provider.set_version_metadata(
        private["id"],
        1,
        metrics={"accuracy": round(declared, 4)},
        measured_on="breast-cancer test split",
        evaluation={"x": Xte.tolist(), "y": yte.astype(float).tolist()},
    )["validation"]
    ok(
        f"validation {rep['status']}: "
        + "; ".join(c["detail"] for c in rep["checks"] if c["name"].startswith("metric"))
    )
    provider.grant(private["id"], org_id=orgs["consumer"], permission="read")
    provider.publish(private["id"])
    gamma = admin.create_org("Gamma Labs")
    outsider = SomClient(url, admin.create_key(gamma["id"], ["consumer"], name="outsider")["key"])
    assert consumer.get_offering(private["id"])["visibility"] == "shared"
    assert private["id"] not in {o["id"] for o in outsider.search_offerings()}
    try:
        outsider.get_offering(private["id"])
        raise SystemExit("an organisation without a grant saw the private listing")
    except SomAPIError as e:
        assert e.status == 404
    ok(f"{private['id']}: Beta Clinic sees it; Gamma Labs gets 404 and does not find it in search")
    ok(
        "grant changes are in the owner's audit trail: "
        + ", ".join(sorted({e["action"] for e in provider.offering_audit(private["id"])}))
    )

    step("4. Provider compiles the HE plan and offers a signed contract")
    report = provider.compile_version(off["id"], v["number"], Xtr)
    card = report.get("he_report") or {}
    ok(f"HE model card: {json.dumps({k: card[k] for k in list(card)[:6]}, default=str)[:150]}…")
    p_key, c_key = SigningKey.generate(), SigningKey.generate()
    now = datetime.now(UTC)
    terms = Terms(
        modes=frozenset({"he_inference", "remote_job"}),
        quota_units=5_000,
        rate_units=10_000,
        rate_window_seconds=60,
        valid_from=now - timedelta(minutes=1),
        valid_until=now + timedelta(days=30),
        unit_price_minor=2,
        currency="EUR",
        max_batch=4096,
        job_limits=JobLimits(
            allowed_kinds=frozenset({"predict", "evaluate"}), cpu_seconds=30, memory_mb=512, wall_seconds=60
        ),
    )
    offer = provider.publish_offer(off["id"], terms, signing_key=p_key)
    offer_id = offer.get("offer_id") or offer["offer"]["offer_id"]
    ok(f"offer {offer_id}: 5,000 units at EUR 0.02, he_inference + remote_job, signed by the provider")

    step("5. Consumer accepts and runs encrypted inference")
    contract = consumer.accept_offer(offer_id, signing_key=c_key, provider_key=p_key.verify_key.to_text())
    cid = contract.get("contract_id") or contract["id"]
    ok(f"contract {cid} accepted (signed by the consumer over the offer's hash)")
    t0 = time.perf_counter()
    probs = np.asarray(
        consumer.infer_encrypted(off["id"], Xte, contract_id=cid, key_dir=work / "consumer-keys")
    ).reshape(-1)
    took = time.perf_counter() - t0
    plain = 1 / (1 + np.exp(-plain_logits))
    agree = float(np.mean((probs > 0.5) == (plain > 0.5)))
    ok(
        f"{len(Xte)} samples encrypted, computed on ciphertexts, decrypted in {took:.2f} s; "
        f"agreement with plaintext {agree:.1%}, max |Δp| {np.max(np.abs(probs - plain)):.2e}"
    )
    assert agree >= 0.99
    receipt = consumer.last_receipt
    verify_receipt(receipt, log_vkey)
    ok(
        f"usage receipt verified offline against the pinned log key: leaf #{receipt['index']} included in the signed checkpoint"
    )

    step("5b. A downstream application calls the inference gateway over plain HTTP")
    gw_terms = Terms(
        modes=frozenset({"gateway"}),
        quota_units=5_000,
        rate_units=10_000,
        rate_window_seconds=60,
        valid_from=now - timedelta(minutes=1),
        valid_until=now + timedelta(days=30),
        unit_price_minor=1,
        currency="EUR",
        max_batch=256,
    )
    gw_offer = provider.publish_offer(off["id"], gw_terms, signing_key=p_key)
    gw_contract = consumer.accept_offer(gw_offer.get("offer_id") or gw_offer["offer"]["offer_id"], signing_key=c_key)
    gw_cid = gw_contract.get("contract_id") or gw_contract["id"]
    ok(
        f"gateway contract {gw_cid}: plaintext rows, the marketplace's worker sees the inputs (the weights stay encrypted at rest)"
    )
    headers = {"Authorization": f"Bearer {keys['consumer']}", "X-Som-Contract": gw_cid}
    with httpx.Client(base_url=url, headers=headers) as app_http:  # what any language's HTTP client does (curl -d ...)
        for i in range(3):
            r = app_http.post(
                f"/v1/offerings/{off['id']}/predict",
                json={"rows": Xte[i : i + 1].tolist()},
                headers={"Idempotency-Key": f"demo-gateway-{i}"},
            )
            r.raise_for_status()
            ok(
                f"POST /v1/offerings/{off['id']}/predict -> {r.json()['outputs'][0][0]:.4f} "
                f"(plaintext {plain[i]:.4f}); Server-Timing: {r.headers['server-timing']}"
            )
        csv_rows = "\n".join(",".join(repr(float(x)) for x in row) for row in Xte[:20]) + "\n"
        r = app_http.post(
            f"/v1/offerings/{off['id']}/predict",
            content=csv_rows.encode(),
            headers={"Content-Type": "text/csv", "Idempotency-Key": "demo-gateway-csv"},
        )
        r.raise_for_status()
        got = np.loadtxt(io.StringIO(r.text), delimiter=",", skiprows=1).reshape(-1)
        assert np.allclose(got, plain[:20], atol=1e-9), "gateway predictions differ from the model"
        gw_receipt = json.loads(
            base64.urlsafe_b64decode(r.headers["x-som-receipt"] + "=" * (-len(r.headers["x-som-receipt"]) % 4))
        )
        verify_receipt(gw_receipt, consumer.ledger_key())
        ok(
            f"20 CSV rows -> 20 predictions equal to the model's; {r.headers['x-som-units']} units charged once, "
            f"receipt verified offline (leaf #{gw_receipt['index']})"
        )

    step("6. A provider-hosted model and a remote job: the weights never move")
    model_path = work / "provider-host" / "model.npz"
    model_path.parent.mkdir()
    model_path.write_bytes(npz)
    off2 = provider.create_offering(
        name="breast-cancer-risk-onprem",
        task="binary-classification",
        tags=["medical"],
        hosting="provider",
        description="Same model, kept on the provider's own machine behind `som agent`.",
    )
    agent_key = provider.create_agent_key([off2["id"]], name="demo agent")["key"]
    # the provider's offer-signing key, on the provider's machine (0600): the agent vouches for its
    # sealing key with it, and the consumer's SDK refuses to seal to a key it did not vouch for
    signing_file = model_path.parent / "provider-signing.key"
    fd = os.open(signing_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("ed25519-seed:" + base64.b64encode(p_key.unsafe_private_bytes()).decode() + "\n")
    agent = subprocess.Popen(
        [
            *SOM,
            "agent",
            "--offering",
            off2["id"],
            "--model",
            str(model_path),
            "--lease-wait",
            "2",
            "--signing-key",
            str(signing_file),
        ],
        env={**env, "SOM_API_KEY": agent_key},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not provider.get_offering(off2["id"]).get("agent_online"):
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit("the provider agent did not come online")
            time.sleep(0.3)
        ok(f"agent online for {off2['id']} (outbound long-poll only)")
        provider.publish(off2["id"])
        offer2 = provider.publish_offer(off2["id"], terms, signing_key=p_key)
        contract2 = consumer.accept_offer(offer2.get("offer_id") or offer2["offer"]["offer_id"], signing_key=c_key)
        cid2 = contract2.get("contract_id") or contract2["id"]
        rows = "\n".join(",".join(f"{x:.6f}" for x in row) for row in Xte[:50]) + "\n"
        sub = consumer.submit_job(off2["id"], "predict", rows.encode(), format="csv", contract_id=cid2)
        ok(
            f"job {sub.id}: 50 rows sealed (HPKE) to the agent's key, vouched for by the contract's provider key; "
            "the marketplace relays opaque bytes"
        )
        consumer.wait_job(sub.id, timeout=120)
        res = consumer.job_result(sub.id, sub.reply_key)
        preds = np.loadtxt(io.StringIO(res.body.decode()), delimiter=",").reshape(-1)
        match = (
            float(np.mean((preds > 0.5) == (plain[:50] > 0.5)))
            if preds.max() <= 1
            else float(np.mean(preds == (plain[:50] > 0.5)))
        )
        ok(f"result opened with the consumer's reply key: {len(preds)} predictions, {match:.0%} match the model")
    finally:
        agent.terminate()
        agent.wait(timeout=30)

    step("7. Compliance officer: audit trail, ledger export, offline verification, witness")
    events = compliance.audit()
    for e in events[-5:]:
        ok(f"{e['time'][:19]} {e['action']:<22} {e['target']:<28} {e['outcome']}")
    assert {"offering.publish", "key.create", "role.grant", "artifact.decrypt"} <= {e["action"] for e in events}
    ok(f"{len(events)} audit events")
    cenv = {**env, "SOM_API_KEY": keys["compliance"]}
    som("ledger", "checkpoint", "--sign", env=cenv)
    export = work / "ledger-export"
    som("ledger", "export", str(export), env=cenv)
    for line in som("ledger", "verify", str(export), "--vkey", str(work / "log.vkey"), env=cenv).strip().splitlines():
        ok(line)
    state = work / "witness.json"
    for line in som("ledger", "witness", "--state", str(state), env=cenv).strip().splitlines()[-2:]:
        ok("witness: " + line)
    for t in compliance.ledger_totals():
        ok(f"contract totals: {json.dumps(t, default=str)[:140]}")


if __name__ == "__main__":
    raise SystemExit(main())
