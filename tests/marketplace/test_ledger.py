"""Ledger service and API on SQLite and PostgreSQL: one gapless order under concurrency, proofs
and receipts that verify with crypto alone, audit events as leaves, authorization, refusing to
sign over a tampered tree, the background signer."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from crypto.checkpoint import open_checkpoint
from crypto.errors import InvalidProof, InvalidSignature
from crypto.merkle import MerkleTree, NodeId, leaf_hash, verify_consistency, verify_inclusion
from crypto.note import NoteVerifier
from marketplace.db.models_ledger import NODE_LEVEL_SHIFT, NODE_MIN_LEVEL, LedgerLeaf, LedgerNode
from marketplace.runtime import Runtime
from marketplace.sdk import SomAPIError
from marketplace.sdk.ledger_api import verify_receipt
from marketplace.services import ledger
from tests.conftest import make_settings
from tests.marketplace.test_ledger_support import contract_leaf, make_contract, usage

b64d = base64.b64decode


def all_leaves(rt) -> list[bytes]:
    with rt.tx() as s:
        n = ledger.tree_size(s)
    got = list(ledger.iter_leaves(rt, 0, n))
    assert [i for i, _ in got] == list(range(n))
    return [d for _, d in got]


def seed_usage(world, n: int = 6):
    """A contract between the world's consumer and provider orgs and n usage leaves; return refs."""
    c = make_contract(consumer_org=world.orgs["consumer"], provider_org=world.orgs["provider"])
    with world.rt.tx() as s:
        ledger.append(s, contract_leaf(c))
        refs = ledger.append_many(s, [usage(c, i, outcome="released" if i == 3 else "charged") for i in range(n)])
    return c, refs


def test_audit_events_become_leaves_and_root_matches_reference(world):
    rt = world.rt
    leaves = all_leaves(rt)
    from marketplace.db.models import AuditEvent

    with rt.tx() as s:
        events = s.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
        ids = [e.id for e in events]
    import json

    recs = [json.loads(d) for d in leaves]
    assert [r["event_id"] for r in recs if r["schema"] == "som.audit/v1"] == ids
    assert len(ids) >= 11  # bootstrap + 5 orgs + 5 keys
    cp = ledger.sign_checkpoint(rt)
    assert cp.size == len(leaves)
    assert cp.root_hash == MerkleTree(leaves).root()


def test_proofs_from_the_api_verify_with_crypto(world):
    rt = world.rt
    seed_usage(world, 20)
    vkey = world.compliance.ledger_key()
    note1 = world.compliance.ledger_checkpoint()
    cp1 = open_checkpoint(note1, NoteVerifier.from_vkey(vkey), origin=rt.settings.log_origin)
    c = make_contract(consumer_org=world.orgs["consumer"], provider_org=world.orgs["provider"], offer_id="offer-2")
    with rt.tx() as s:
        ledger.append_many(s, [contract_leaf(c)] + [usage(c, i) for i in range(9)])
    signed = world.compliance.sign_ledger_checkpoint()
    cp2 = open_checkpoint(signed["note"].encode(), NoteVerifier.from_vkey(vkey))
    assert cp2.size == cp1.size + 10
    leaves = world.compliance.ledger_leaves(0, cp2.size)
    assert [x["index"] for x in leaves] == list(range(cp2.size))
    for x in leaves[:: max(1, cp2.size // 12)]:
        h = leaf_hash(b64d(x["leaf"]))
        assert b64d(x["leaf_hash"]) == h
        pr = world.compliance.inclusion_proof(index=x["index"], size=cp2.size)
        verify_inclusion(h, x["index"], cp2.size, [b64d(p) for p in pr["proof"]], cp2.root_hash)
        with pytest.raises(InvalidProof):
            verify_inclusion(h, x["index"], cp2.size, [b64d(p) for p in pr["proof"]], cp1.root_hash)
    by_hash = world.compliance.inclusion_proof(leaf_hash=leaves[5]["leaf_hash"], size=cp2.size)
    assert by_hash["index"] == 5
    cons = world.compliance.consistency_proof(cp1.size, cp2.size)
    verify_consistency(cp1.size, cp2.size, [b64d(p) for p in cons["proof"]], cp1.root_hash, cp2.root_hash)
    # The whole log through the export stream gives the signed root.
    lines = list(world.compliance.ledger_export_lines())
    import json

    exported = [b64d(json.loads(line)["leaf"]) for line in lines]
    assert MerkleTree(exported).root(cp2.size) == cp2.root_hash
    cps = world.compliance.ledger_checkpoints()
    assert [c["size"] for c in cps] == sorted({cp1.size, cp2.size})


def test_receipts_verify_offline_and_tampering_is_caught(world):
    rt = world.rt
    _, refs = seed_usage(world, 4)
    vkey = world.consumer.ledger_key()
    r = world.consumer.ledger_receipt(refs[2].index)
    assert r == ledger.receipt(rt, refs[2].index)
    cp = verify_receipt(r, vkey)
    assert cp.size > refs[2].index
    assert b64d(r["leaf_hash"]) == refs[2].leaf_hash
    # One changed byte in the leaf, the proof, or the checkpoint: refused.
    leaf = bytearray(b64d(r["leaf"]))
    leaf[10] ^= 1
    with pytest.raises(InvalidProof):
        verify_receipt({**r, "leaf": base64.b64encode(bytes(leaf)).decode()}, vkey)
    proof = list(r["inclusion_proof"])
    proof[0] = base64.b64encode(bytes(32)).decode()
    with pytest.raises(InvalidProof):
        verify_receipt({**r, "inclusion_proof": proof}, vkey)
    with pytest.raises(InvalidProof):
        verify_receipt({**r, "index": r["index"] + 1}, vkey)
    with pytest.raises(InvalidSignature):
        verify_receipt({**r, "checkpoint": r["checkpoint"].replace("\n", "\n\n", 1)}, vkey)
    other = NoteVerifier.from_vkey(vkey)  # a different key with the same name refuses
    from crypto.signing import SigningKey

    wrong = NoteVerifier(other.name, SigningKey.generate().verify_key).vkey()
    with pytest.raises(InvalidSignature):
        verify_receipt(r, wrong)
    with pytest.raises(ValueError):
        verify_receipt({"index": 1}, vkey)


def test_authorization(world):
    _, refs = seed_usage(world, 3)
    for client in (world.consumer, world.provider, world.other_consumer):
        for call in (
            lambda c: c.ledger_leaves(0, 5),
            lambda c: c.ledger_checkpoints(),
            lambda c: c.sign_ledger_checkpoint(),
            lambda c: list(c.ledger_export_lines()),
            lambda c: c.ledger_usage(),
            lambda c: c.ledger_totals(),
        ):
            with pytest.raises(SomAPIError) as e:
                call(client)
            assert e.value.status == 403
    # Own usage: consumer and provider of the contract get proofs and receipts.
    i = refs[1].index
    assert world.consumer.ledger_receipt(i)["index"] == i
    assert world.provider.inclusion_proof(index=i)["index"] == i
    # Others' usage and audit leaves: 404, and the denial is audited.
    for client, idx in ((world.other_consumer, i), (world.other_provider, i), (world.consumer, 0)):
        with pytest.raises(SomAPIError) as e:
            client.ledger_receipt(idx)
        assert e.value.status == 404
        with pytest.raises(SomAPIError) as e:
            client.inclusion_proof(index=idx)
        assert e.value.status == 404
    denials = world.compliance.get_json("/v1/audit", action="authz.denied")
    assert denials["total"] >= 6
    # Everyone authenticated may read the key, the checkpoint and consistency proofs.
    assert world.other_consumer.ledger_key().startswith(world.rt.settings.log_origin + "+")
    assert world.other_consumer.ledger_checkpoint()
    assert world.other_consumer.consistency_proof(0)["proof"] == []
    with pytest.raises(SomAPIError) as e:
        world.client(None).ledger_checkpoint()
    assert e.value.status == 401
    # Bad arguments are 422/404, never 500.
    for kw, status in (
        (dict(index=10**6), 404),
        (dict(leaf_hash="zz"), 422),
        (dict(leaf_hash=base64.b64encode(bytes(32)).decode()), 404),
    ):
        with pytest.raises(SomAPIError) as e:
            world.compliance.inclusion_proof(**kw)
        assert e.value.status == status, kw
    with pytest.raises(SomAPIError) as e:
        world.compliance.consistency_proof(5, 10**6)
    assert e.value.status == 404
    with pytest.raises(SomAPIError) as e:
        world.compliance.ledger_leaves(5, 2)
    assert e.value.status == 422


def test_usage_filters_and_totals(world):
    c, _ = seed_usage(world, 6)  # 5 charged x 2 units, 1 released
    rows = world.compliance.ledger_usage(contract_id=c.contract_id)
    assert len(rows) == 6 and all(r["record"]["contract_id"] == c.contract_id for r in rows)
    assert len(world.compliance.ledger_usage(contract_id=c.contract_id, outcome="released")) == 1
    assert world.compliance.ledger_usage(consumer_org=world.orgs["other_consumer"]) == []
    since = "2026-01-01T00:00:30Z"
    assert [r["record"]["usage_id"][-1] for r in world.compliance.ledger_usage(since=since)] == ["3", "4", "5"]
    # the same instant with an offset (found by the API fuzzer: a 500), and an out-of-range one
    since = "2026-01-01T01:00:30+01:00"
    assert [r["record"]["usage_id"][-1] for r in world.compliance.ledger_usage(since=since)] == ["3", "4", "5"]
    with pytest.raises(SomAPIError) as ei:
        world.compliance.ledger_usage(until="0001-01-01T00:00:00+01:00")
    assert (ei.value.status, ei.value.code) == (422, "invalid")
    totals = {t["contract_id"]: t for t in world.admin.ledger_totals()}
    t = totals[c.contract_id]
    assert (t["charged_units"], t["amount_minor"], t["usage_records"], t["released_records"]) == (10, 50, 6, 1)


def test_indexes_and_sizes_beyond_64_bits_are_422_not_500(world):
    """Found by the API fuzzer: a leaf index over 2**63-1 reached the database and failed there."""
    huge = 2**64
    auth = {"Authorization": f"Bearer {world.keys['compliance']}"}
    for path in (
        f"/v1/ledger/receipts/{huge}",
        f"/v1/ledger/proof/consistency?size1={huge}",
        f"/v1/ledger/proof/inclusion?index={huge}",
        f"/v1/ledger/leaves?start={huge}",
        f"/v1/ledger/export?size={huge}",
        f"/v1/ledger/usage?offset={huge}",
        f"/v1/audit?offset={huge}",
    ):
        r = world.http.get(path, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid"), (path, r.text)
    r = world.http.get(f"/v1/ledger/receipts/{2**63 - 1}", headers=auth)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found")


def test_export_is_jsonl_as_documented(world):
    """Found by the API fuzzer: the document said application/json for the JSONL export."""
    doc = world.http.get("/openapi.json").json()
    assert list(doc["paths"]["/v1/ledger/export"]["get"]["responses"]["200"]["content"]) == ["application/jsonl"]
    r = world.http.get("/v1/ledger/export", headers={"Authorization": f"Bearer {world.keys['compliance']}"})
    assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == "application/jsonl"
    assert [json.loads(line)["index"] for line in r.text.splitlines()] == list(range(int(r.headers["x-som-tree-size"])))


def _append_threads(runtimes: list[Runtime], n_threads: int, per_thread: int, c) -> None:
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            rt = runtimes[k % len(runtimes)]
            for j in range(per_thread):
                with rt.tx() as s:
                    ledger.append(s, usage(c, 1000 * k + j))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


def test_gapless_under_concurrent_appends_and_two_replicas(world, tmp_path, db_url):
    rt = world.rt
    c = make_contract(consumer_org=world.orgs["consumer"], provider_org=world.orgs["provider"])
    with rt.tx() as s:
        ledger.append(s, contract_leaf(c))
    start = ledger.sign_checkpoint(rt)
    # A second Runtime on the same database stands in for a second API replica.
    replica = Runtime(make_settings(tmp_path, db_url), migrate=False)
    try:
        _append_threads([rt, replica], 6, 8, c)
        cp = ledger.sign_checkpoint(replica)
    finally:
        replica.close()
    leaves = all_leaves(rt)  # contiguous 0..n-1 (asserted inside)
    assert len(leaves) == start.size + 48 and cp.size == len(leaves)
    assert cp.root_hash == MerkleTree(leaves).root()
    # Every stored node equals the reference tree's.
    ref = MerkleTree(leaves)
    with rt.tx() as s:
        for key, h in s.execute(select(LedgerNode.id, LedgerNode.hash)):
            from crypto.merkle import NodeId

            node = NodeId(key >> NODE_LEVEL_SHIFT, key & ((1 << NODE_LEVEL_SHIFT) - 1))
            assert ref.node(node) == h
        # usage ids in the leaves are exactly the ones the threads wrote (none lost, none doubled)
    import json

    ids = sorted(json.loads(d)["usage_id"] for d in leaves if b'"som.usage/v1"' in d)
    assert len(ids) == len(set(ids)) == 48


def ref_node(rt, level: int, index: int) -> bytes:
    from crypto.merkle import NodeId

    return MerkleTree(all_leaves(rt)).node(NodeId(level, index))


def test_refuses_to_sign_over_a_tampered_tree(world):
    rt = world.rt
    c, _ = seed_usage(world, 40)
    signed = ledger.sign_checkpoint(rt)
    assert signed.size >= 48  # (4, 1) = leaves [16, 32) lies under (5, 0), off the frontier
    with rt.tx() as s:
        ledger.append_many(s, [usage(c, 100 + i) for i in range(5)])
    # 0. A node off every path the signer checks (O(log n)) is changed: the log may still sign,
    #    but any inclusion proof through it fails against the signed root, offline. The same
    #    for a leaf hash under an unstored small subtree (its hash is recomputed from them).
    key4 = (NODE_MIN_LEVEL << NODE_LEVEL_SHIFT) | 1
    with rt.tx() as s:
        s.execute(update(LedgerNode).where(LedgerNode.id == key4).values(hash=bytes(32)))
        bad = ledger.inclusion_proof(s, 2, signed.size)
        leaf2 = s.execute(select(LedgerLeaf.leaf_hash).where(LedgerLeaf.idx == 2)).scalar_one()
    with pytest.raises(InvalidProof):
        verify_inclusion(leaf2, 2, signed.size, bad, signed.root_hash)
    ref = MerkleTree(all_leaves(rt))
    with rt.tx() as s:
        s.execute(update(LedgerNode).where(LedgerNode.id == key4).values(hash=ref.node(NodeId(NODE_MIN_LEVEL, 1))))
        assert ledger.inclusion_proof(s, 2, signed.size) == ref.inclusion_proof(2, signed.size)
    for j in (3, 5, 9):  # the level-0, level-2 and level-3 siblings of leaf 2
        with rt.tx() as s:
            h = s.execute(select(LedgerLeaf.leaf_hash).where(LedgerLeaf.idx == j)).scalar_one()
            s.execute(update(LedgerLeaf).where(LedgerLeaf.idx == j).values(leaf_hash=bytes(32)))
            bad = ledger.inclusion_proof(s, 2, signed.size)
            s.execute(update(LedgerLeaf).where(LedgerLeaf.idx == j).values(leaf_hash=h))
        with pytest.raises(InvalidProof):
            verify_inclusion(leaf2, 2, signed.size, bad, signed.root_hash)
    # 1. A stored node on the signed tree's frontier is changed.
    from crypto.merkle import root_plan

    node = next(n for n in root_plan(signed.size).ids if n.level >= NODE_MIN_LEVEL)
    key = (node.level << NODE_LEVEL_SHIFT) | node.index
    with rt.tx() as s:
        h = s.execute(select(LedgerNode.hash).where(LedgerNode.id == key)).scalar_one()
        s.execute(update(LedgerNode).where(LedgerNode.id == key).values(hash=bytes(32)))
    with pytest.raises(ledger.LedgerIntegrityError):
        ledger.sign_checkpoint(rt)
    with pytest.raises(SomAPIError) as e:
        world.compliance.sign_ledger_checkpoint()
    assert (e.value.status, e.value.code) == (503, "ledger_integrity")
    with rt.tx() as s:
        s.execute(update(LedgerNode).where(LedgerNode.id == key).values(hash=h))
    # 2. An unsigned leaf's bytes are changed (its hash left alone).
    i = signed.size + 2
    with rt.tx() as s:
        data = s.execute(select(LedgerLeaf.data).where(LedgerLeaf.idx == i)).scalar_one()
        s.execute(update(LedgerLeaf).where(LedgerLeaf.idx == i).values(data=data.replace(b'"units":2', b'"units":1')))
    with pytest.raises(ledger.LedgerIntegrityError, match=f"leaf {i}"):
        ledger.sign_checkpoint(rt)
    # 3. ... and its stored hash too: the stored nodes above it no longer match.
    with rt.tx() as s:
        new = s.execute(select(LedgerLeaf.data).where(LedgerLeaf.idx == i)).scalar_one()
        s.execute(update(LedgerLeaf).where(LedgerLeaf.idx == i).values(leaf_hash=leaf_hash(new)))
    with pytest.raises(ledger.LedgerIntegrityError):
        ledger.sign_checkpoint(rt)
    with rt.tx() as s:
        s.execute(update(LedgerLeaf).where(LedgerLeaf.idx == i).values(data=data, leaf_hash=leaf_hash(data)))
    # Restored: it signs again, consistent with the earlier checkpoint.
    cp = ledger.sign_checkpoint(rt)
    assert cp.size == signed.size + 5
    with rt.tx() as s:
        proof = ledger.consistency_proof(s, signed.size, cp.size)
    verify_consistency(signed.size, cp.size, proof, signed.root_hash, cp.root_hash)


def test_log_key_file_is_private_and_shared_by_replicas(world, tmp_path, db_url):
    rt = world.rt
    path = rt.key_dir / "log.key"
    assert rt.data_dir not in path.parents  # the key is kept outside the data directory
    ledger.sign_checkpoint(rt)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_text().startswith("PRIVATE+KEY+" + rt.settings.log_origin + "+")
    # A replica with another data dir (hence another key) refuses to sign this ledger.
    other = Runtime(make_settings(tmp_path / "elsewhere", db_url), migrate=False)
    try:
        with other.tx() as s:
            ledger.append(s, usage(make_contract(consumer_org="a", provider_org="b"), 1))
        with pytest.raises(ledger.LedgerIntegrityError, match="log key"):
            ledger.sign_checkpoint(other)
    finally:
        other.close()


def test_background_signer_after_checkpoint_every_leaves(sqlite_url, tmp_path):
    from fastapi.testclient import TestClient

    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, checkpoint_every=5, checkpoint_interval_seconds=3600))
    rt = app.state.runtime
    try:
        with TestClient(app):  # runs on_start / on_stop (the background signer)
            c = make_contract(consumer_org="a", provider_org="b")
            with rt.tx() as s:
                ledger.append_many(s, [contract_leaf(c)] + [usage(c, i) for i in range(5)])
            deadline = time.monotonic() + 10
            cp = None
            while time.monotonic() < deadline:
                with rt.tx() as s:
                    cp = ledger.latest_checkpoint(s)
                    n = ledger.tree_size(s)
                if cp is not None and cp.size == n:
                    break
                time.sleep(0.05)
            assert cp is not None and cp.size == n
    finally:
        rt.close()


def test_background_signer_on_interval(sqlite_url, tmp_path):
    from fastapi.testclient import TestClient

    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, checkpoint_every=10**6, checkpoint_interval_seconds=0.1))
    rt = app.state.runtime
    try:
        with TestClient(app):
            with rt.tx() as s:
                ledger.append(s, contract_leaf(make_contract(consumer_org="a", provider_org="b")))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                with rt.tx() as s:
                    cp = ledger.latest_checkpoint(s)
                if cp is not None and cp.size == 1:
                    break
                time.sleep(0.05)
            assert cp is not None and cp.size == 1
    finally:
        rt.close()


@pytest.fixture(scope="module")
def bare_rt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ledger_prop")
    rt = Runtime(make_settings(d, f"sqlite:///{d / 'som.db'}"))
    yield rt, MerkleTree()
    rt.close()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=4), data=st.data())
def test_db_tree_equals_reference_for_any_batches(bare_rt, batches, data):
    rt, ref = bare_rt
    c = make_contract(consumer_org="a", provider_org="b")
    for b in batches:
        recs = [usage(c, ref.size + k) for k in range(b)]
        with rt.tx() as s:
            refs = ledger.append_many(s, recs)
        from crypto.canonical import canonicalize

        for r, rec in zip(refs, recs, strict=True):
            assert r.index == ref.append(canonicalize(rec))
    n = ref.size
    with rt.tx() as s:
        assert ledger.root_at(s, n) == ref.root()
        # Fixed-range draws mapped onto the (growing) tree, so the strategy stays deterministic.
        i = data.draw(st.integers(0, 2**20)) % n
        size = i + 1 + data.draw(st.integers(0, 2**20)) % (n - i)
        assert ledger.inclusion_proof(s, i, size) == ref.inclusion_proof(i, size)
        m = 1 + data.draw(st.integers(0, 2**20)) % n
        assert ledger.consistency_proof(s, m, n) == ref.consistency_proof(m, n)
