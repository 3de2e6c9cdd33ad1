"""crypto.logverify: a signed export built in tmp_path verifies, and every tamper is caught and
named (leaf index or checkpoint file)."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest

from crypto.checkpoint import Checkpoint, sign_checkpoint
from crypto.logverify import (
    LogVerificationError,
    UntrustedLogKey,
    verify_export_dir,
    verify_log,
    vkey_fingerprint,
)
from crypto.merkle import CompactRange, MerkleTree, leaf_hash
from crypto.note import NoteSigner
from crypto.signing import SigningKey

ORIGIN = "som.example/ledger"
N = 40
CHECKPOINT_SIZES = (5, 16, 29, 40)


def make_leaves(n: int, tag: str = "use") -> list[bytes]:
    return [json.dumps({"i": i, "kind": tag, "units": i % 7}).encode() for i in range(n)]


def write_export(path: Path, leaves: list[bytes], signer: NoteSigner, sizes=CHECKPOINT_SIZES):
    path.mkdir(parents=True, exist_ok=True)
    tree = MerkleTree(leaves)
    (path / "leaves.jsonl").write_text(
        "".join(json.dumps({"index": i, "leaf": base64.b64encode(d).decode()}) + "\n" for i, d in enumerate(leaves))
    )
    (path / "checkpoints").mkdir(exist_ok=True)
    for size in sizes:
        cp = Checkpoint(ORIGIN, size, tree.root(size))
        (path / "checkpoints" / f"{size:08d}.note").write_bytes(sign_checkpoint(cp, signer))
    (path / "log.vkey").write_text(signer.verifier.vkey() + "\n")
    (path / "README.txt").write_text("other files are ignored\n")
    return tree


@pytest.fixture
def signer():
    return NoteSigner(ORIGIN, SigningKey.generate())


@pytest.fixture
def export(tmp_path, signer):
    leaves = make_leaves(N)
    tree = write_export(tmp_path / "export", leaves, signer)
    return tmp_path / "export", leaves, tree


def read_lines(path: Path) -> list[str]:
    return (path / "leaves.jsonl").read_text().splitlines(keepends=True)


def test_valid_export_verifies(export, signer):
    path, leaves, tree = export
    seen = []
    summary = verify_export_dir(path, trusted_vkey=signer.verifier.vkey(), leaf_check=lambda i, d: seen.append((i, d)))
    assert (summary.leaves, summary.checkpoints, summary.latest_size) == (N, 4, N)
    assert summary.latest_root == tree.root()
    assert summary.origin == ORIGIN
    assert seen == list(enumerate(leaves))


def test_one_byte_of_a_leaf_changed(export, signer):
    path, leaves, _ = export
    lines = read_lines(path)
    tampered = bytearray(leaves[20])
    tampered[3] ^= 1
    lines[20] = json.dumps({"index": 20, "leaf": base64.b64encode(bytes(tampered)).decode()}) + "\n"
    (path / "leaves.jsonl").write_text("".join(lines))
    with pytest.raises(LogVerificationError, match=r"00000029\.note.*\[16, 29\)"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_leaf_dropped(export, signer):
    path, *_ = export
    lines = read_lines(path)
    del lines[7]
    (path / "leaves.jsonl").write_text("".join(lines))
    with pytest.raises(LogVerificationError, match=r"^leaf 7: found index 8"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_last_leaves_dropped(export, signer):
    path, *_ = export
    (path / "leaves.jsonl").write_text("".join(read_lines(path)[:35]))
    with pytest.raises(LogVerificationError, match=r"00000040\.note has size 40.*only 35"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_two_leaves_reordered(export, signer):
    path, *_ = export
    lines = read_lines(path)
    lines[10], lines[11] = lines[11], lines[10]
    (path / "leaves.jsonl").write_text("".join(lines))
    with pytest.raises(LogVerificationError, match=r"^leaf 10: found index 11"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_two_leaves_reordered_and_renumbered(export, signer):
    path, leaves, _ = export
    swapped = list(leaves)
    swapped[10], swapped[11] = swapped[11], swapped[10]
    lines = [json.dumps({"index": i, "leaf": base64.b64encode(d).decode()}) + "\n" for i, d in enumerate(swapped)]
    (path / "leaves.jsonl").write_text("".join(lines))
    with pytest.raises(LogVerificationError, match=r"00000016\.note.*\[5, 16\)"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_checkpoint_resigned_by_another_key(export, signer):
    path, _, tree = export
    impostor = NoteSigner(ORIGIN, SigningKey.generate())
    note = sign_checkpoint(Checkpoint(ORIGIN, 16, tree.root(16)), impostor)
    (path / "checkpoints" / "00000016.note").write_bytes(note)
    with pytest.raises(LogVerificationError, match=r"^checkpoints/00000016\.note: not a checkpoint"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_export_resigned_with_its_own_vkey_is_refused(tmp_path, signer):
    """The attack: drop leaves, re-sign everything under a new key (and even another origin),
    ship that key as log.vkey. It is self-consistent; only the pinned key can tell."""
    impostor = NoteSigner(ORIGIN, SigningKey.generate())
    path = tmp_path / "resigned"
    write_export(path, make_leaves(N)[:30], impostor, sizes=(5, 30))
    # The shipped key alone would verify it: the old behaviour.
    verify_export_dir(path, trusted_vkey=impostor.verifier.vkey())
    with pytest.raises(UntrustedLogKey, match="expected som.example/ledger .*fingerprint") as e:
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())
    assert vkey_fingerprint(signer.verifier.vkey()) in str(e.value)
    assert vkey_fingerprint(impostor.verifier.vkey()) in str(e.value)
    # The impostor's checkpoints with the real log.vkey: a signature failure (not a trust one).
    (path / "log.vkey").write_text(signer.verifier.vkey() + "\n")
    with pytest.raises(LogVerificationError, match="not a checkpoint signed by the trusted log key") as e2:
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())
    assert not isinstance(e2.value, UntrustedLogKey)


def test_other_origin_is_refused(tmp_path, signer):
    other = NoteSigner("evil.example/ledger", SigningKey.generate())
    path = tmp_path / "other"
    write_export(path, make_leaves(N), other)
    with pytest.raises(UntrustedLogKey, match="evil.example/ledger"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())
    # Checkpoints of another origin, signed by the trusted key itself, are refused too.
    leaves = make_leaves(5)
    note = sign_checkpoint(Checkpoint("som.example/other", 5, MerkleTree(leaves).root()), signer)
    with pytest.raises(UntrustedLogKey, match="expected 'som.example/ledger', got 'som.example/other'"):
        verify_log(enumerate(leaves), [note], signer.verifier.vkey())
    assert verify_log(enumerate(leaves), [note], signer.verifier.vkey(), origin="som.example/other").leaves == 5
    with pytest.raises(UntrustedLogKey, match="expected 'x.example'"):
        verify_log(enumerate(leaves), [note], signer.verifier.vkey(), origin="x.example")


def test_vkey_fingerprint(signer):
    import hashlib

    vk = signer.verifier.vkey()
    raw = base64.b64decode(vk.split("+", 2)[2])
    want = hashlib.sha256(raw).hexdigest()[:16]
    fp = vkey_fingerprint(vk)
    assert fp.replace(" ", "") == want and len(fp.split(" ")) == 4
    with pytest.raises(ValueError, match="C2SP"):
        vkey_fingerprint("nope")


def test_checkpoint_with_tampered_root(export, signer):
    path, *_ = export
    p = path / "checkpoints" / "00000029.note"
    lines = p.read_text().split("\n")
    root = bytearray(base64.b64decode(lines[2]))
    root[0] ^= 1
    lines[2] = base64.b64encode(bytes(root)).decode()
    p.write_text("\n".join(lines))
    with pytest.raises(LogVerificationError, match=r"^checkpoints/00000029\.note"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_history_rewritten_and_resigned_caught_by_trusted_checkpoint(tmp_path, signer):
    # The officer kept checkpoint 16 from an earlier export.
    old = tmp_path / "old"
    write_export(old, make_leaves(N), signer)
    kept = (old / "checkpoints" / "00000016.note").read_bytes()
    assert verify_export_dir(old, trusted_vkey=signer.verifier.vkey(), trusted_checkpoint=kept).trusted_size == 16

    # The operator rewrites leaf 3 and re-signs everything with the real log key.
    rewritten = make_leaves(N)
    rewritten[3] = b'{"i": 3, "kind": "use", "units": 0}'
    new = tmp_path / "new"
    write_export(new, rewritten, signer)
    verify_export_dir(new, trusted_vkey=signer.verifier.vkey())  # self-consistent: only the kept checkpoint can tell
    with pytest.raises(LogVerificationError, match=r"^trusted checkpoint \(size 16.*rewritten"):
        verify_export_dir(new, trusted_vkey=signer.verifier.vkey(), trusted_checkpoint=kept)


def test_trusted_checkpoint_newer_than_export(tmp_path, signer):
    leaves = make_leaves(60)
    full = MerkleTree(leaves)
    path = tmp_path / "e"
    write_export(path, leaves[:N], signer)
    newer = sign_checkpoint(Checkpoint(ORIGIN, 60, full.root()), signer)
    with pytest.raises(LogVerificationError, match="newer than the export"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey(), trusted_checkpoint=newer)
    proof = full.consistency_proof(N, 60)
    assert (
        verify_export_dir(
            path, trusted_vkey=signer.verifier.vkey(), trusted_checkpoint=newer, trusted_proof=proof
        ).trusted_size
        == 60
    )
    other = MerkleTree(make_leaves(60, tag="fork"))
    forked = sign_checkpoint(Checkpoint(ORIGIN, 60, other.root()), signer)
    with pytest.raises(LogVerificationError, match="not consistent"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey(), trusted_checkpoint=forked, trusted_proof=proof)


def test_forked_checkpoints_of_one_size(export, signer):
    path, *_ = export
    other = MerkleTree(make_leaves(16, tag="fork"))
    note = sign_checkpoint(Checkpoint(ORIGIN, 16, other.root()), signer)
    (path / "checkpoints" / "fork-16.note").write_bytes(note)
    with pytest.raises(LogVerificationError, match="forked"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())


def test_leaf_check_failure_names_leaf(export, signer):
    path, *_ = export

    def no_units_six(index: int, leaf: bytes) -> None:
        if json.loads(leaf)["units"] == 6:
            raise ValueError("units over contract quota")

    with pytest.raises(LogVerificationError, match=r"^leaf 6: units over contract quota"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey(), leaf_check=no_units_six)


def test_malformed_inputs(export, tmp_path, signer):
    path, *_ = export
    lines = read_lines(path)
    lines[4] = "{not json\n"
    (path / "leaves.jsonl").write_text("".join(lines))
    with pytest.raises(LogVerificationError, match=r"leaves\.jsonl line 5"):
        verify_export_dir(path, trusted_vkey=signer.verifier.vkey())
    with pytest.raises(LogVerificationError, match="missing"):
        verify_export_dir(tmp_path / "nowhere", trusted_vkey=signer.verifier.vkey())
    with pytest.raises(LogVerificationError, match="no checkpoints"):
        verify_log([], [], (path / "log.vkey").read_text())
    with pytest.raises(ValueError, match="trusted_vkey"):
        verify_log([], [b"x"], "not a vkey")


def test_empty_log_checkpoint(signer):
    note = sign_checkpoint(Checkpoint(ORIGIN, 0, CompactRange().root()), signer)
    summary = verify_log([], [note], signer.verifier.vkey())
    assert (summary.leaves, summary.latest_size) == (0, 0)


def test_million_leaves_is_fast(signer):
    n = 1_000_000
    leaves = [(i, i.to_bytes(8, "big")) for i in range(n)]
    sizes = (1, 999_983, 500_000, n)
    cr = CompactRange()
    roots = {}
    for _i, d in leaves:
        cr.append(leaf_hash(d))
        if cr.size in sizes:
            roots[cr.size] = cr.root()
    notes = [sign_checkpoint(Checkpoint(ORIGIN, s, roots[s]), signer) for s in sizes]
    start = time.perf_counter()
    summary = verify_log(leaves, notes, signer.verifier.vkey(), trusted_checkpoint=notes[2])
    elapsed = time.perf_counter() - start
    assert summary.leaves == n and summary.latest_size == n
    assert elapsed < 10, f"verify_log took {elapsed:.1f}s for {n} leaves"
