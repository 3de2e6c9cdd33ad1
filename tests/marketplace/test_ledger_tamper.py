"""`som ledger verify` catches every tamper on an export from the real app, `som ledger witness`
refuses a rewritten history, `som receipt verify` checks receipts offline.

The CLI runs through typer's CliRunner; the server-facing commands get an SDK client bound to
the in-process app (the real routes and DB; only the HTTP transport is in-process).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from sqlalchemy import delete, update
from typer.testing import CliRunner

from crypto.checkpoint import Checkpoint, sign_checkpoint
from crypto.note import NoteSigner
from crypto.signing import SigningKey
from marketplace.cli import app as cli
from marketplace.db.models_ledger import LedgerCheckpoint, LedgerLeaf, LedgerNode, LedgerState
from marketplace.services import ledger
from tests.marketplace.test_ledger_support import contract_leaf, make_contract, usage

runner = CliRunner()


def som(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def as_client(monkeypatch):  # type: ignore[no-untyped-def]
    """Point the CLI's server commands at an SDK client of the in-process app."""
    import marketplace.cli.cmd_ledger as cmd

    def use(client):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(cmd, "client", lambda ctx, need_key=True: client)

    return use


def seed(world, n_batches: int = 3, per_batch: int = 7):  # type: ignore[no-untyped-def]
    rt = world.rt
    c = make_contract(consumer_org=world.orgs["consumer"], provider_org=world.orgs["provider"], quota=60)
    with rt.tx() as s:
        ledger.append(s, contract_leaf(c))
    for b in range(n_batches):
        with rt.tx() as s:
            ledger.append_many(
                s, [usage(c, b * per_batch + i, outcome="released" if i == 4 else "charged") for i in range(per_batch)]
            )
        ledger.sign_checkpoint(rt)
    return c


def export(tmp_path: Path, name: str = "export") -> Path:
    d = tmp_path / name
    r = som("ledger", "export", str(d))
    assert r.exit_code == 0, r.output
    return d


def lines(d: Path) -> list[str]:
    return (d / "leaves.jsonl").read_text().splitlines(keepends=True)


def rewrite_history(rt, mutate) -> None:  # type: ignore[no-untyped-def]
    """What a malicious operator with DB access and the log key could do: rebuild the tree from
    edited records and have the real key sign the new history. The service itself refuses to sign
    over a history that does not contain its kept last checkpoint (marketplace.services.logguard),
    so the operator also deletes that file from the key directory: what is left to catch it is
    offline verification and witnesses, as tested here."""
    from marketplace.services.logguard import kept_path

    kept_path(rt.key_dir, rt.settings.log_origin).unlink(missing_ok=True)
    recs = [json.loads(d) for _, d in ledger.iter_leaves(rt, 0, _size(rt))]
    with rt.tx() as s:
        for t in (LedgerCheckpoint, LedgerNode, LedgerLeaf):
            s.execute(delete(t))
        s.execute(update(LedgerState).values(size=0, frontier=b"", signed_size=-1))
        ledger.append_many(s, [mutate(i, r) for i, r in enumerate(recs)])
    ledger.sign_checkpoint(rt)


def _size(rt) -> int:  # type: ignore[no-untyped-def]
    with rt.tx() as s:
        return ledger.tree_size(s)


def fewer_units(k: int):  # type: ignore[no-untyped-def]
    """Rewrite the k-th charged usage leaf to 1 unit (still a valid, compliant record)."""
    seen = [0]

    def mutate(i, r):  # type: ignore[no-untyped-def]
        if r["schema"] == "som.usage/v1" and r["outcome"] == "charged":
            seen[0] += 1
            if seen[0] == k + 1:
                return {**r, "units": 1, "amount_minor": r["unit_price_minor"]}
        return r

    return mutate


def test_clean_export_verifies_with_totals(sqlite_world, as_client, tmp_path):
    c = seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    assert (d / "log.vkey").read_text().strip() == sqlite_world.compliance.ledger_key()
    assert sorted(p.name for p in (d / "checkpoints").iterdir())
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 0, r.output
    assert r.output.startswith("OK ")
    assert f"contract {c.contract_id}: 36 units charged, EUR 1.80," in r.output
    r = som("--json", "ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    summary = json.loads(r.output)
    assert summary["compliance"]["contracts"][c.contract_id]["released_records"] == 3
    assert summary["leaves"] == len(lines(d))


def test_one_changed_byte_in_a_leaf(sqlite_world, as_client, tmp_path):
    seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    ls = lines(d)
    k = len(ls) - 3
    obj = json.loads(ls[k])
    leaf = bytearray(base64.b64decode(obj["leaf"]))
    pos = leaf.index(b'"units":2') + len('"units":')
    leaf[pos] = ord("1")  # one byte: 2 units become 1
    ls[k] = json.dumps({"index": obj["index"], "leaf": base64.b64encode(bytes(leaf)).decode()}) + "\n"
    (d / "leaves.jsonl").write_text("".join(ls))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 3, r.output
    assert "does NOT verify" in r.output and "does not match the exported leaves" in r.output
    lo, hi = map(int, re.search(r"leaf is in \[(\d+), (\d+)\)", r.output.replace("\n", " ")).groups())
    assert lo <= k < hi and hi - lo <= 7  # the checkpoint interval that holds the changed leaf


def test_dropped_leaf(sqlite_world, as_client, tmp_path):
    seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    ls = lines(d)
    del ls[5]
    (d / "leaves.jsonl").write_text("".join(ls))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 3
    assert "leaf 5" in r.output and "missing" in r.output


def test_reordered_leaves(sqlite_world, as_client, tmp_path):
    seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    ls = lines(d)
    # Swap the bytes of two leaves, keeping the index fields in order...
    a, b = json.loads(ls[6]), json.loads(ls[9])
    ls[6] = json.dumps({"index": 6, "leaf": b["leaf"]}) + "\n"
    ls[9] = json.dumps({"index": 9, "leaf": a["leaf"]}) + "\n"
    (d / "leaves.jsonl").write_text("".join(ls))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 3 and "does not match the exported leaves" in r.output
    # ... or swap the lines themselves.
    ls = lines(export(tmp_path, "again"))
    ls[6], ls[9] = ls[9], ls[6]
    (tmp_path / "again" / "leaves.jsonl").write_text("".join(ls))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(tmp_path / "again"))
    assert r.exit_code == 3 and "leaf 6" in r.output


def test_replaced_checkpoint(sqlite_world, as_client, tmp_path):
    seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    notes = sorted((d / "checkpoints").iterdir(), key=lambda p: int(p.stem))
    victim = notes[1]
    cp = Checkpoint.parse(victim.read_text().split("\n\n")[0] + "\n")
    # A forger without the log key signs a checkpoint under the log's name.
    forger = NoteSigner(sqlite_world.rt.settings.log_origin, SigningKey.generate())
    victim.write_bytes(sign_checkpoint(Checkpoint(cp.origin, cp.size, bytes(32)), forger))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 3 and f"checkpoints/{victim.name}" in r.output
    # A correctly signed checkpoint of another log is refused too.
    other = NoteSigner("other.example/log", SigningKey.generate())
    victim.write_bytes(sign_checkpoint(Checkpoint("other.example/log", cp.size, cp.root_hash), other))
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d))
    assert r.exit_code == 3 and victim.name in r.output


def test_rewritten_history_signed_with_the_real_key_is_caught_by_a_kept_checkpoint(sqlite_world, as_client, tmp_path):
    rt = sqlite_world.rt
    seed(sqlite_world)
    as_client(sqlite_world.compliance)
    kept = tmp_path / "kept.note"
    r = som("ledger", "checkpoint", "--out", str(kept))
    assert r.exit_code == 0
    rewrite_history(rt, fewer_units(3))
    d = export(tmp_path)
    # The rewritten log is internally consistent and correctly signed...
    assert som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d)).exit_code == 0
    # ... but not the history the officer kept a checkpoint of.
    r = som(
        "ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(d), "--trusted-checkpoint", str(kept)
    )
    assert r.exit_code == 3
    assert "trusted checkpoint" in r.output and "rewritten" in r.output


def test_compliance_violation_names_the_leaf(sqlite_world, as_client, tmp_path):
    rt = sqlite_world.rt
    c = seed(sqlite_world)  # 36 units charged of a 60-unit quota
    with rt.tx() as s:
        refs = ledger.append_many(s, [usage(c, 100, units=20), usage(c, 101, units=20)])
    ledger.sign_checkpoint(rt)
    as_client(sqlite_world.compliance)
    r = som("ledger", "verify", "--vkey", sqlite_world.compliance.ledger_key(), str(export(tmp_path)))
    assert r.exit_code == 4
    assert f"leaf {refs[1].index}" in r.output and "quota" in r.output


def test_witness_cosigns_extensions_and_refuses_a_rewrite(sqlite_world, as_client, tmp_path):
    rt = sqlite_world.rt
    c = seed(sqlite_world, n_batches=1)
    as_client(sqlite_world.compliance)
    st = tmp_path / "witness.json"
    r = som("--json", "ledger", "witness", "--state", str(st), "--name", "officer")
    assert r.exit_code == 0, r.output
    first = json.loads(r.output)
    assert first["previous_size"] == 0 and first["cosigned_size"] == _size(rt)
    assert st.stat().st_mode & 0o777 == 0o600
    with rt.tx() as s:
        ledger.append_many(s, [usage(c, 50 + i) for i in range(5)])
    ledger.sign_checkpoint(rt)
    r = som("--json", "ledger", "witness", "--state", str(st), "--name", "officer")
    assert r.exit_code == 0, r.output
    second = json.loads(r.output)
    assert second["previous_size"] == first["cosigned_size"] and second["cosigned_size"] == _size(rt)
    saved = json.loads(st.read_text())
    from crypto.note import CosignatureVerifier, open_note

    open_note(saved["cosigned"].encode(), [CosignatureVerifier.from_vkey(saved["witness_vkey"])])
    before = st.read_text()
    # The operator rewrites history, then extends it: no consistency proof can exist.
    rewrite_history(rt, fewer_units(2))
    with rt.tx() as s:
        ledger.append(s, usage(c, 99))
    ledger.sign_checkpoint(rt)
    r = som("ledger", "witness", "--state", str(st), "--name", "officer")
    assert r.exit_code == 6 and "refusing to cosign" in r.output
    assert st.read_text() == before


def test_witness_fork_at_the_same_size(sqlite_world, as_client, tmp_path):
    rt = sqlite_world.rt
    seed(sqlite_world, n_batches=1)
    as_client(sqlite_world.compliance)
    st = tmp_path / "w.json"
    assert som("ledger", "witness", "--state", str(st)).exit_code == 0
    rewrite_history(rt, fewer_units(2))  # same number of leaves, other root
    r = som("ledger", "witness", "--state", str(st))
    assert r.exit_code == 6 and "FORK" in r.output


def test_receipt_verify_cli(sqlite_world, as_client, tmp_path):
    rt = sqlite_world.rt
    c = seed(sqlite_world, n_batches=1)
    with rt.tx() as s:
        ref = ledger.append(s, usage(c, 77))
    rc = sqlite_world.consumer.ledger_receipt(ref.index)
    f = tmp_path / "receipt.json"
    f.write_text(json.dumps(rc))
    vk = tmp_path / "log.vkey"
    vk.write_text(sqlite_world.consumer.ledger_key())
    r = som("--json", "receipt", "verify", str(f), "--vkey", str(vk))
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["ok"] is True and out["index"] == ref.index and out["record"]["usage_id"].endswith("_77")
    # A JSON response body with "receipt" inside is accepted too.
    f.write_text(json.dumps({"result": "...", "receipt": rc}))
    assert som("receipt", "verify", str(f), "--vkey", str(vk)).exit_code == 0
    bad = dict(rc)
    bad["index"] = ref.index - 1
    f.write_text(json.dumps(bad))
    r = som("receipt", "verify", str(f), "--vkey", str(vk))
    assert r.exit_code == 3 and "does NOT verify" in r.output
    f.write_text("{not json")
    assert som("receipt", "verify", str(f), "--vkey", str(vk)).exit_code == 2


def test_one_pass_gives_the_answers_of_separate_passes(sqlite_world, as_client, tmp_path):
    """`som ledger verify` hashes and checks each leaf in one pass; the answer is that of the
    Merkle pass and the compliance walk run on their own, and a log failure wins over a
    contract violation even when the violation comes first."""
    from contracts.compliance import check_records
    from contracts.errors import ComplianceViolation
    from crypto.logverify import LogVerificationError, read_export_leaves, verify_export_dir
    from marketplace.cli.cmd_ledger import verify_dir

    rt = sqlite_world.rt
    c = seed(sqlite_world)
    as_client(sqlite_world.compliance)
    d = export(tmp_path)
    vk = sqlite_world.compliance.ledger_key()
    got = verify_dir(d, trusted_vkey=vk)
    log = verify_export_dir(d, trusted_vkey=vk)
    comp = check_records((i, json.loads(leaf)) for i, leaf in read_export_leaves(d / "leaves.jsonl"))
    assert got["compliance"] == comp.to_dict() and got["log"] == str(log)
    assert got["leaves"] == log.leaves == comp.leaves > 0
    ls = lines(d)
    del ls[3]
    (d / "leaves.jsonl").write_text("".join(ls))
    with pytest.raises(LogVerificationError, match="leaf 3"):
        verify_dir(d, trusted_vkey=vk)
    with rt.tx() as s:
        refs = ledger.append_many(s, [usage(c, 100, units=30), usage(c, 101, units=30), usage(c, 102, units=1)])
    ledger.sign_checkpoint(rt)
    d2 = export(tmp_path, "over")
    with pytest.raises(ComplianceViolation, match="quota") as e:
        verify_dir(d2, trusted_vkey=vk)
    assert e.value.index == refs[0].index  # 36 + 30 units of a 60-unit quota
    ls = lines(d2)
    ls[-1], ls[-2] = ls[-2], ls[-1]  # after the violating leaf, the log breaks too
    (d2 / "leaves.jsonl").write_text("".join(ls))
    with pytest.raises(LogVerificationError, match=f"leaf {refs[1].index}: found index {refs[2].index}"):
        verify_dir(d2, trusted_vkey=vk)
