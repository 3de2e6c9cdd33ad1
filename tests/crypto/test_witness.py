"""crypto.witness: the add-checkpoint state machine of c2sp.org/tlog-witness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crypto.checkpoint import Checkpoint, sign_checkpoint
from crypto.errors import InvalidProof, InvalidSignature
from crypto.merkle import MerkleTree
from crypto.note import NoteSigner, open_note, verify_cosignature
from crypto.signing import SigningKey
from crypto.witness import (
    ForkDetected,
    MalformedRequest,
    RollbackRefused,
    UnknownLog,
    Witness,
    WitnessConflict,
    WitnessState,
    parse_add_checkpoint,
)

ORIGIN = "som.example/ledger"
NOW = 1_700_000_000


@pytest.fixture
def log():
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    tree = MerkleTree([f"use {i}".encode() for i in range(20)])
    return signer, tree


@pytest.fixture
def witness(log):
    signer, _ = log
    return Witness("officer.example/w1", SigningKey.generate(), signer.verifier.vkey())


def checkpoint(signer, tree, size, root=None):
    return sign_checkpoint(Checkpoint(ORIGIN, size, root or tree.root(size)), signer)


def test_happy_path_chain(log, witness):
    signer, tree = log
    state = None
    old = 0
    for size in (3, 3, 8, 13, 20):
        note = checkpoint(signer, tree, size)
        proof = tree.consistency_proof(old, size) if 0 < old < size else []
        state, line = witness.update(state, note, old, proof, now=NOW + size)
        assert (state.size, state.root_hash) == (size, tree.root(size))
        # The cosignature verifies against the witness key and is timestamped with `now`.
        cp = Checkpoint(ORIGIN, size, tree.root(size))
        verifier = witness._signer.verifier
        verify_cosignature(cp.body(), line, verifier)
        assert verifier.vkey() == witness.vkey
        opened = open_note(note + line.encode(), [verifier, signer.verifier])
        assert len(opened.signatures) == 2
        # State survives JSON.
        state = WitnessState.from_json(json.loads(json.dumps(state.to_json())))
        old = size


def test_old_size_zero_needs_empty_proof(log, witness):
    signer, tree = log
    note = checkpoint(signer, tree, 8)
    with pytest.raises(InvalidProof):
        witness.update(None, note, 0, [tree.root(8)], now=NOW)
    state, _ = witness.update(None, note, 0, [], now=NOW)
    assert state.size == 8


def test_conflict_carries_known_size(log, witness):
    signer, tree = log
    state, _ = witness.update(None, checkpoint(signer, tree, 8), 0, [], now=NOW)
    with pytest.raises(WitnessConflict) as exc:
        witness.update(state, checkpoint(signer, tree, 13), 5, tree.consistency_proof(5, 13))
    assert exc.value.known_size == 8
    assert "8" in str(exc.value)
    # A client that thinks the witness is fresh is told the size too.
    with pytest.raises(WitnessConflict) as exc:
        witness.update(state, checkpoint(signer, tree, 13), 0, [])
    assert exc.value.known_size == 8


def test_fork_detected(log, witness):
    signer, tree = log
    state, _ = witness.update(None, checkpoint(signer, tree, 8), 0, [], now=NOW)
    other = MerkleTree([f"rewritten {i}".encode() for i in range(8)])
    with pytest.raises(ForkDetected) as exc:
        witness.update(state, checkpoint(signer, other, 8), 8, [], now=NOW)
    assert exc.value.size == 8
    assert exc.value.known_root == tree.root(8)


def test_rollback_refused(log, witness):
    signer, tree = log
    state, _ = witness.update(None, checkpoint(signer, tree, 13), 0, [], now=NOW)
    with pytest.raises(RollbackRefused):
        witness.update(state, checkpoint(signer, tree, 8), 13, [], now=NOW)
    # Lying about the old size is a conflict, not a way around it.
    with pytest.raises(WitnessConflict):
        witness.update(state, checkpoint(signer, tree, 8), 8, [], now=NOW)


def test_bad_proof_refused(log, witness):
    signer, tree = log
    state, _ = witness.update(None, checkpoint(signer, tree, 8), 0, [], now=NOW)
    proof = tree.consistency_proof(8, 13)
    bad = [bytes([proof[0][0] ^ 1]) + proof[0][1:], *proof[1:]]
    with pytest.raises(InvalidProof):
        witness.update(state, checkpoint(signer, tree, 13), 8, bad, now=NOW)
    # A different history of size 13 that extends a different size-8 tree.
    other = MerkleTree([f"rewritten {i}".encode() for i in range(13)])
    with pytest.raises(InvalidProof):
        witness.update(state, checkpoint(signer, other, 13), 8, other.consistency_proof(8, 13), now=NOW)
    # Equal sizes with a non-empty proof.
    with pytest.raises(InvalidProof):
        witness.update(state, checkpoint(signer, tree, 8), 8, [tree.root(8)], now=NOW)
    state2, _ = witness.update(state, checkpoint(signer, tree, 13), 8, proof, now=NOW)
    assert state2.size == 13


def test_signature_and_origin_checks(log, witness):
    signer, tree = log
    impostor = NoteSigner(ORIGIN, SigningKey.generate())
    with pytest.raises(InvalidSignature):
        witness.update(None, checkpoint(impostor, tree, 8), 0, [], now=NOW)
    state, _ = witness.update(None, checkpoint(signer, tree, 8), 0, [], now=NOW)
    moved = WitnessState("other.example/log", state.size, state.root_hash, state.note)
    with pytest.raises(UnknownLog):
        witness.update(moved, checkpoint(signer, tree, 13), 8, tree.consistency_proof(8, 13))


def test_parse_add_checkpoint_c2sp_example():
    vectors = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "transparency-log.json").read_text())
    ex = next(e for e in vectors["checkpoint_examples"] if e["id"] == "c2sp-tlog-witness-add-checkpoint-request")
    req = parse_add_checkpoint(ex["request_body"].encode())
    assert req.old_size == 20852014
    assert len(req.proof) == 4
    assert req.checkpoint_note.startswith(b"example.com/behind-the-sofa\n20852163\n")
    body = req.checkpoint_note.split(b"\n\n")[0] + b"\n"
    assert Checkpoint.parse(body).size == 20852163


@pytest.mark.parametrize(
    "body",
    [
        b"old 1\nAAAA\n\ncp\n",  # proof line is not 32 bytes
        b"old 01\n\ncp\n",
        b"old -1\n\ncp\n",
        b"new 1\n\ncp\n",
        b"old 1\n",
    ],
)
def test_parse_add_checkpoint_rejects(body):
    with pytest.raises(MalformedRequest):
        parse_add_checkpoint(body)


def test_parse_add_checkpoint_limits_proof_lines():
    line = b"A" * 43 + b"=\n"
    assert len(parse_add_checkpoint(b"old 5\n" + line * 63 + b"\ncp\n").proof) == 63
    with pytest.raises(MalformedRequest):
        parse_add_checkpoint(b"old 5\n" + line * 64 + b"\ncp\n")
