"""Federated training end to end: real uvicorn, real participants over HTTP (the SDK loop and a
`som agent --federation` process), real Flower (FedAvg, SecAgg+, LocalDpMod), SQLite and
PostgreSQL, on scikit-learn's breast-cancer data split non-IID across three hospitals."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from marketplace.federated.privacy import epsilon_after
from marketplace.sdk.ledger_api import verify_receipt
from tests.conftest import serve_in_thread
from tests.marketplace.federated_support import (
    breast_cancer_split,
    central_accuracy,
    local_accuracy,
    model_accuracy,
    open_federation,
    run_participants,
    to_csv,
    wait_finished,
    wait_joined,
)

pytestmark = pytest.mark.timeout(300)

PLAIN = {"rounds": 10, "local_epochs": 5, "lr": 0.1, "min_participants": 2, "secure_aggregation": True}


def _version_bytes(world: Any, version_id: str) -> tuple[bytes, dict[str, Any]]:
    from sqlalchemy import select

    from marketplace.db.models import Artifact, OfferingVersion
    from marketplace.services import catalog

    with world.rt.tx() as s:
        v = s.get(OfferingVersion, version_id)
        art = s.scalar(select(Artifact).where(Artifact.version_id == version_id, Artifact.purpose == "model"))
        return catalog.decrypt_artifact(world.rt, art), dict(v.info)


def _run(
    world: Any,
    url: str,
    recipe: dict[str, Any],
    *,
    terms: dict[str, Any] | None = None,
    stops: dict[int, Any] | None = None,
) -> tuple[Any, dict[str, Any], list[Any]]:
    split = breast_cancer_split(3)
    fed = open_federation(world, recipe, terms=terms, split=split)
    threads = run_participants(url, fed, split, stops=stops)
    for t in threads:
        t.start()
    wait_joined(world, fed, 3)
    world.provider.start_federation(fed.id)
    st = wait_finished(world, fed)
    for t in threads:
        t.join(30)
    return fed, st, threads


def test_three_hospitals_improve_the_shared_model(world: Any) -> None:
    split = breast_cancer_split(3)
    with serve_in_thread(world.app) as url:
        fed, st, threads = _run(world, url, PLAIN)
    assert st["status"] == "completed", st
    assert st["rounds_done"] == 10 and st["epsilon_spent"] == 0
    assert all(t.result["status"] == "completed" for t in threads)

    data, info = _version_bytes(world, st["result_version_id"])
    fed_acc = model_accuracy(data, split)
    central = central_accuracy(split)
    locals_ = [local_accuracy(split, i) for i in range(3)]
    print(f"federated {fed_acc:.4f} central {central:.4f} local-only {locals_}")
    assert fed_acc >= central - 0.01
    assert all(fed_acc > a for a in locals_)

    lineage = info["lineage"]
    assert lineage["parent_version_id"] == st["parent_version_id"] and lineage["rounds"] == 10
    assert sorted(lineage["participants"]) == sorted(o for o, _ in fed.orgs)
    versions = world.provider.list_versions(fed.offering_id)
    assert [v["number"] for v in versions][-1] == 2  # the parent was v1

    rounds = world.provider.federation_rounds(fed.id)
    assert [r["number"] for r in rounds] == list(range(1, 11))
    assert all(len(r["participants"]) == 3 and len(r["ledger_indexes"]) == 3 for r in rounds)
    assert all(0.5 < r["metrics"]["accuracy"] <= 1 for r in rounds)


def test_contributions_are_ledger_leaves_with_offline_receipts(world: Any) -> None:
    from marketplace.sdk import SomClient

    with serve_in_thread(world.app) as url:
        fed, st, _ = _run(world, url, {**PLAIN, "rounds": 3})
        org0, key0 = fed.orgs[0]
        vkey = SomClient(url, key0).request("GET", "/v1/ledger/key").text.strip()
        receipts = SomClient(url, key0).federation_receipts(fed.id)
    assert st["status"] == "completed"
    assert len(receipts) == 3  # one per round, only this organisation's
    split = breast_cancer_split(3)
    for i, r in enumerate(sorted(receipts, key=lambda r: r["index"]), start=1):
        verify_receipt(r, vkey)  # offline: crypto only
        leaf = json.loads(base64.b64decode(r["leaf"]))
        assert leaf["schema"] == "som.fl-contribution/v1" and leaf["federation_id"] == fed.id
        assert leaf["org"] == org0 and leaf["round"] == i and leaf["samples"] == len(split.parts[0][1])
        assert leaf["update_digest"].startswith("sha256:") and leaf["epsilon"] == "0"
    # the officer's totals: every leaf of the federation, per organisation
    from tests.marketplace.test_contracts_support import ledger_records

    leaves = [
        r for _, r in ledger_records(world) if r["schema"] == "som.fl-contribution/v1" and r["federation_id"] == fed.id
    ]
    per_org = {o: sum(leaf["samples"] for leaf in leaves if leaf["org"] == o) for o, _ in fed.orgs}
    parts = {p["org_id"]: p for p in world.provider.federation(fed.id)["participants"]}
    assert all(parts[o]["units"] == per_org[o] and parts[o]["rounds"] == 3 for o in per_org)


def test_dp_charges_each_round_and_reports_the_accuracy_cost(live: Any) -> None:
    world, url = live
    split = breast_cancer_split(3)
    z, rounds, delta = 2.0, 10, 1e-5
    budget = epsilon_after(z, rounds, delta) + 1e-6
    fed, st, _ = _run(
        world, url, {**PLAIN, "noise_multiplier": z, "clipping": 1.0}, terms={"epsilon": budget, "delta": delta}
    )
    assert st["status"] == "completed", st
    assert st["epsilon_spent"] == pytest.approx(epsilon_after(z, rounds, delta))
    eps = [r["epsilon"] for r in world.provider.federation_rounds(fed.id)]
    assert eps == pytest.approx([epsilon_after(z, k, delta) for k in range(1, rounds + 1)])
    data, info = _version_bytes(world, st["result_version_id"])
    acc = model_accuracy(data, split)
    print(
        f"DP (epsilon={st['epsilon_spent']:.2f}, delta={delta}): accuracy {acc:.4f} vs central {central_accuracy(split):.4f}"
    )
    assert info["lineage"]["epsilon"] == pytest.approx(st["epsilon_spent"])
    assert 0.0 <= acc <= 1.0  # fresh noise each run: the cost's distribution is the bench's (docs/benchmarks.md)


def test_a_round_survives_a_dropout_down_to_the_threshold(live: Any) -> None:
    world, url = live
    stop = threading.Event()
    split = breast_cancer_split(3)
    fed = open_federation(world, {**PLAIN, "rounds": 4, "round_timeout": 5.0}, split=split)
    threads = run_participants(url, fed, split, stops={2: stop})
    for t in threads:
        t.start()
    wait_joined(world, fed, 3)
    world.provider.start_federation(fed.id)
    import time

    while not world.provider.federation_rounds(fed.id):
        time.sleep(0.05)
    stop.set()  # hospital 2 goes away after round 1
    st = wait_finished(world, fed)
    assert st["status"] == "completed", st
    counts = [len(r["participants"]) for r in world.provider.federation_rounds(fed.id)]
    assert counts[0] == 3 and counts[-1] == 2 and st["rounds_done"] == 4


def test_the_coordinator_receives_only_masked_shares(live: Any) -> None:
    """Everything the coordinator receives in a round, from each participant: no plaintext
    update anywhere in it, and the masked vector is uniform mod 2^32 and uncorrelated with the
    participant's (reconstructed) plaintext update."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as PM

    from marketplace.federated import coordinator, learning

    world, url = live
    split = breast_cancer_split(3)
    fed = open_federation(world, {**PLAIN, "rounds": 1, "local_epochs": 5}, split=split)
    box = coordinator.mailbox_for(world.rt, fed.id)
    box.keep_view = True
    threads = run_participants(url, fed, split)
    for t in threads:
        t.start()
    wait_joined(world, fed, 3)
    world.provider.start_federation(fed.id)
    assert wait_finished(world, fed)["status"] == "completed"
    with world.rt.tx() as s:
        from marketplace.services import federations

        node_of = {
            p.node_id: i for i, p in enumerate(sorted(federations.participants(s, fed.id), key=lambda p: p.joined_at))
        }
    org_index = {o: i for i, (o, _) in enumerate(fed.orgs)}
    with world.rt.tx() as s:
        node_org = {p.node_id: org_index[p.org_id] for p in federations.participants(s, fed.id)}
    assert node_of  # the view is keyed by node
    masked: dict[int, np.ndarray] = {}
    for node, _rnd, data in box.view:
        i = node_org[node]
        x, y = split.parts[i]
        plain = learning.train(
            learning.init_params(30), (x - split.mean) / split.scale, y, epochs=5, lr=0.1, seed=i + 1
        )
        for arr in plain:  # no plaintext float in any byte the coordinator received
            for v in arr[np.abs(arr) > 1e-6]:
                assert np.float64(v).tobytes() not in data and np.float32(v).tobytes() not in data
        msg = message_from_proto(PM.FromString(data))
        cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.has_content() else None
        if cfg is not None and Key.MASKED_PARAMETERS in cfg:
            from flwr.common import bytes_to_ndarray

            vec = np.concatenate([bytes_to_ndarray(b).ravel() for b in cfg[Key.MASKED_PARAMETERS]])
            masked[i] = vec.astype(np.float64)
            flat = np.concatenate([p.ravel() for p in plain])
            # the masked vector: 1 weight factor + 31 parameters, each uniform in [0, 2^32)
            assert abs(np.corrcoef(vec[1:].astype(np.float64), flat)[0, 1]) < 0.6
    assert sorted(masked) == [0, 1, 2]
    allv = np.concatenate(list(masked.values())) / 2**32
    assert 0.35 < allv.mean() < 0.65 and 0.2 < allv.std() < 0.4  # uniform(0,1): mean 0.5, std 0.289
    assert Stage.COLLECT_MASKED_VECTORS  # the stage whose replies carry the vectors


def test_som_agent_federation_process_takes_part(live: Any, tmp_path: Path) -> None:
    world, url = live
    split = breast_cancer_split(3)
    fed = open_federation(world, {**PLAIN, "rounds": 3}, split=split)
    threads = run_participants(url, fed, split)[:2]
    for t in threads:
        t.start()
    csv = tmp_path / "hospital2.csv"
    csv.write_text(to_csv(*split.parts[2]))
    som = Path(sys.executable).with_name("som")
    env = {**os.environ, "SOM_URL": url, "SOM_API_KEY": fed.orgs[2][1]}
    proc = subprocess.Popen(
        [str(som), "--json", "agent", "--federation", fed.id, "--data", str(csv), "--lease-wait", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            wait_joined(world, fed, 3, timeout=60)
        except AssertionError:
            proc.kill()
            raise AssertionError(proc.communicate()) from None
        world.provider.start_federation(fed.id)
        st = wait_finished(world, fed)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert st["status"] == "completed", (st, err)
    assert proc.returncode == 0, err
    res = json.loads(out)
    assert res["status"] == "completed" and res["answered"] > 0
    assert all(len(r["participants"]) == 3 for r in world.provider.federation_rounds(fed.id))
    # the provider's CLI view of the run
    penv = {**env, "SOM_API_KEY": world.keys["provider"]}
    status = json.loads(
        subprocess.run(
            [str(som), "--json", "federation", "status", fed.id],
            env=penv,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert status["status"] == "completed" and status["participants"] == 3 and status["result_version_id"]
    rounds = json.loads(
        subprocess.run(
            [str(som), "--json", "federation", "rounds", fed.id],
            env=penv,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert [r["round"] for r in rounds] == [1, 2, 3] and all(r["participants"] == 3 for r in rounds)
    # a participant's receipts over the CLI: its own three leaves
    receipts = json.loads(
        subprocess.run(
            [str(som), "--json", "federation", "receipts", fed.id],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    )
    assert len(receipts) == 3
