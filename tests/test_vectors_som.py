"""Golden vectors for our own formats (tests/vectors/som-formats.json, docs/vectors.md).

1. The checked-in generator reproduces the committed file byte for byte (the HPKE blobs are
   fixed constants in the generator; everything else is recomputed from fixed seeds and times).
2. Every case runs through our public APIs: happy cases pass and match the expected values,
   ``want_error`` cases raise the documented error type. Where a check can be made without our
   code (Ed25519 with ``cryptography``, SHA-256 with ``hashlib``, RFC 8785 with ``rfc8785``), it
   is made that way too.
3. Every case has ``desc``, ``want_error`` and a ``source``; every section with a happy case has
   tampered siblings.
4. The real ledger service, given the vectors' log key and records, returns the same receipts.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from contracts.errors import ChainError, ComplianceViolation, SchemaError
from contracts.offer import Contract, ContractEvent, contract_status, verify_chain, verify_contract
from contracts.records import parse_record, parse_time
from crypto.canonical import canonicalize
from crypto.errors import DecryptionError, InvalidProof, InvalidSignature
from crypto.logverify import LogVerificationError, UntrustedLogKey
from crypto.merkle import MerkleTree, leaf_hash, verify_consistency
from crypto.note import CosignatureVerifier, NoteVerifier, open_note, verify_cosignature
from crypto.sealing import DEFAULT_MAX_SIZE, SealKeyPair, open_sealed
from crypto.signing import SigningKey
from crypto.witness import (
    ForkDetected,
    RollbackRefused,
    Witness,
    WitnessConflict,
    WitnessState,
)

HERE = Path(__file__).resolve().parent
VECTORS = HERE / "vectors" / "som-formats.json"
GENERATOR = HERE / "vectors" / "generate.py"
DOC: dict[str, Any] = json.loads(VECTORS.read_text(encoding="utf-8"))
KEYS = DOC["keys"]
SECTIONS = [k for k, v in DOC.items() if isinstance(v, dict) and "cases" in v]

ERRORS: dict[str, type[Exception]] = {
    "SchemaError": SchemaError,
    "ChainError": ChainError,
    "ComplianceViolation": ComplianceViolation,
    "InvalidSignature": InvalidSignature,
    "InvalidProof": InvalidProof,
    "DecryptionError": DecryptionError,
    "LogVerificationError": LogVerificationError,
    "UntrustedLogKey": UntrustedLogKey,
    "ForkDetected": ForkDetected,
    "RollbackRefused": RollbackRefused,
    "WitnessConflict": WitnessConflict,
    "ValueError": ValueError,
}


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("som_vectors_generate", GENERATOR)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cases() -> list[Any]:
    return [
        pytest.param(section, c, id=f"{section}-{i}-{c['op']}")
        for section in SECTIONS
        for i, c in enumerate(DOC[section]["cases"])
    ]


def b64d(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def ed25519_raw(public_text: str) -> Ed25519PublicKey:
    assert public_text.startswith("ed25519:")
    return Ed25519PublicKey.from_public_bytes(b64d(public_text[len("ed25519:") :]))


# -- 1. regeneration ---------------------------------------------------------------------------


def test_generator_reproduces_the_committed_file_byte_for_byte(tmp_path: Path) -> None:
    out = tmp_path / "som-formats.json"
    assert _generator().main(["--out", str(out)]) == 0
    assert out.read_bytes() == VECTORS.read_bytes(), (
        "tests/vectors/som-formats.json is stale or the formats changed: run "
        "`.venv/bin/python tests/vectors/generate.py` and review the diff"
    )


# -- 3. shape ------------------------------------------------------------------------------------


def test_every_case_states_desc_want_error_and_source() -> None:
    assert SECTIONS, "no sections"
    descs: set[tuple[str, str]] = set()
    for section in SECTIONS:
        cases = DOC[section]["cases"]
        assert isinstance(DOC[section].get("about"), str) and DOC[section]["about"]
        for c in cases:
            assert isinstance(c.get("desc"), str) and c["desc"], c
            assert "want_error" in c, c["desc"]
            assert c["want_error"] is None or c["want_error"] in ERRORS, c["desc"]
            src = c.get("source")
            assert isinstance(src, list) and src and all(isinstance(s, str) and s for s in src)
            assert (section, c["desc"]) not in descs, f"duplicate desc {c['desc']!r}"
            descs.add((section, c["desc"]))
        happy = [c for c in cases if c["want_error"] is None]
        bad = [c for c in cases if c["want_error"] is not None]
        assert happy and bad, f"{section}: needs happy cases and tampered siblings"
        assert len(bad) >= len(happy) or section == "ledger", section


def test_keys_are_what_the_seeds_give() -> None:
    for name in ("provider", "consumer", "stranger", "log", "impostor_log", "witness"):
        k = KEYS[name]
        pub = SigningKey.from_private_bytes(bytes.fromhex(k["seed_hex"])).verify_key.to_text()
        assert pub == k["public"], name
    for name in ("x25519_compute", "x25519_reply", "x25519_other"):
        k = KEYS[name]
        assert SealKeyPair.from_private_bytes(bytes.fromhex(k["private_hex"])).public_text() == k["public"]
    assert NoteVerifier.from_vkey(KEYS["log"]["vkey"]).key.to_text() == KEYS["log"]["public"]
    assert CosignatureVerifier.from_vkey(KEYS["witness"]["vkey"]).key.to_text() == KEYS["witness"]["public"]


def test_ledger_fixture_is_one_consistent_tree() -> None:
    led = DOC["ledger"]
    leaves = [b64d(x) for x in led["leaves_b64"]]
    tree = MerkleTree(leaves)
    for n, root in led["roots_b64"].items():
        assert tree.root(int(n)) == b64d(root)
    for x, h in zip(leaves, led["leaf_hashes_b64"], strict=True):
        assert hashlib.sha256(b"\x00" + x).digest() == b64d(h)
        parse_record(x)
    verifier = NoteVerifier.from_vkey(led["vkey"])
    from crypto.checkpoint import open_checkpoint

    for n, note in led["checkpoints"].items():
        cp = open_checkpoint(note.encode(), verifier, origin=led["origin"])
        assert (cp.size, cp.root_hash) == (int(n), b64d(led["roots_b64"][n]))
        # Independently: Ed25519 over the note text, signature after the 4-byte key id.
        text, sigline = note.split("\n\n")
        sig = b64d(sigline.split(" ")[-1].strip())
        ed25519_raw(KEYS["log"]["public"]).verify(sig[4:], (text + "\n").encode())
    verify_consistency(
        3,
        7,
        [b64d(p) for p in led["consistency_3_7_b64"]],
        b64d(led["roots_b64"]["3"]),
        b64d(led["roots_b64"]["7"]),
    )


# -- 2. every case through the public APIs ----------------------------------------------------------


def run_canonical_record(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    data = c["canonical"].encode()
    assert canonicalize(c["record"]) == data
    assert rfc8785.dumps(c["record"]) == data  # the reference implementation, no fast path
    assert canonicalize(json.loads(c["input_text"])) == data
    assert c["input_text"].encode() != data
    assert parse_record(data) == c["record"]
    assert leaf_hash(data).hex() == c["leaf_hash_hex"]
    assert hashlib.sha256(b"\x00" + data).hexdigest() == c["leaf_hash_hex"]


def run_parse_leaf(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    parse_record(b64d(c["leaf_b64"]))


def run_verify_contract(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    contract = Contract.from_dict(c["contract"])
    verify_contract(contract, provider_key=c.get("pin_provider_key"), consumer_key=c.get("pin_consumer_key"))
    if c["want_error"] is not None:
        return
    offer, acc = c["contract"]["offer"], c["contract"]["acceptance"]
    assert canonicalize(contract.offer.body()).decode() == c["offer_signed_text"]
    assert canonicalize(contract.acceptance.body()).decode() == c["acceptance_signed_text"]
    # Independently of contracts/: RFC 8032 signatures over the stated texts, JCS digests.
    ed25519_raw(offer["provider_key"]).verify(b64d(offer["signature"]), c["offer_signed_text"].encode())
    ed25519_raw(acc["consumer_key"]).verify(b64d(acc["signature"]), c["acceptance_signed_text"].encode())
    offer_digest = "sha256:" + hashlib.sha256(rfc8785.dumps(offer)).hexdigest()
    assert offer_digest == c["offer_digest"] == acc["offer_digest"] == contract.offer.digest()
    acc_hex = hashlib.sha256(rfc8785.dumps(acc)).hexdigest()
    assert c["contract_id"] == "ct_" + acc_hex[:32] == contract.contract_id
    assert c["contract_digest"] == contract.digest()


def run_verify_chain(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    contract = Contract.from_dict(section["contract"])
    events = [ContractEvent.from_dict(e) for e in c["events"]]
    state = verify_chain(contract, events)
    if c["want_error"] is not None:
        return
    assert state.status.value == c["want_status"]
    assert state.seq == c["want_seq"]
    assert [e.digest() for e in events] == c["event_digests"]
    prev = contract.digest()
    for e, d in zip(c["events"], c["event_digests"], strict=True):
        assert e["prev_digest"] == prev
        prev = "sha256:" + hashlib.sha256(rfc8785.dumps(e)).hexdigest()
        assert prev == d
    keys = {
        "provider": section["contract"]["offer"]["provider_key"],
        "consumer": section["contract"]["acceptance"]["consumer_key"],
    }
    for e, text in zip(c["events"], c.get("signed_texts", []), strict=False):
        body = {k: v for k, v in e.items() if k != "signatures"}
        assert rfc8785.dumps(body) == text.encode()
        for party, sig in e["signatures"].items():
            ed25519_raw(keys[party]).verify(b64d(sig), text.encode())
    for at in c["status_at"]:
        st = contract_status(contract, events, now=parse_time(at["time"], "time"))
        assert (st.status.value, st.terms.quota_units) == (at["status"], at["quota_units"]), at


def run_verify_receipt(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    from marketplace.sdk.ledger_api import verify_receipt

    cp = verify_receipt(c["receipt"], c["vkey"], origin=c.get("origin"))
    if c["want_error"] is None:
        assert (cp.size, base64.b64encode(cp.root_hash).decode()) == (c["want_size"], c["want_root_b64"])


def run_verify_cosignature(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    verifier = CosignatureVerifier.from_vkey(c["cosigner_vkey"])
    verify_cosignature(c["checkpoint_body"].encode(), c["line"], verifier, now=c["now"])
    if c["want_error"] is None:
        sig = b64d(c["line"].split(" ")[-1].strip())
        assert int.from_bytes(sig[4:12], "big") == c["now"]
        ed25519_raw(KEYS["witness"]["public"]).verify(sig[12:], c["signed_message"].encode())


def run_open_note(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    kinds = {"ed25519": NoteVerifier, "cosignature": CosignatureVerifier}
    verifiers = [kinds[k].from_vkey(v) for k, v in zip(c["note_vkey_types"], c["vkeys"], strict=True)]
    note = open_note(c["note"].encode(), verifiers)
    if c["want_error"] is None:
        assert len(note.signatures) == c["want_verified"]


def run_witness_update(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    w = Witness(c["witness_name"], SigningKey.from_private_bytes(bytes.fromhex(c["witness_seed_hex"])), c["log_vkey"])
    state = None if c["state"] is None else WitnessState.from_json(c["state"])
    new, line = w.update(
        state,
        c["checkpoint"].encode(),
        c["old_size"],
        [b64d(p) for p in c["consistency_proof_b64"]],
        now=c["now"],
    )
    if c["want_error"] is None:
        assert line == c["want_line"]
        assert new.to_json() == c["want_state"]


def run_verify_export(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    from marketplace.cli.cmd_ledger import verify_dir

    d = tmp / "export"
    for rel, text in c["files"].items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text.encode())
    (d / "checkpoints").mkdir(parents=True, exist_ok=True)
    try:
        summary = verify_dir(d, trusted_vkey=section["trusted_vkey"], origin=c.get("origin"))
    except ComplianceViolation as e:
        assert e.index == c["want_index"], e
        assert c["want_message"] in str(e)
        raise
    except LogVerificationError as e:
        assert c.get("want_message", "") in str(e)
        # An untrusted key or origin is told apart from a tampered log (exit 5 vs 3).
        assert isinstance(e, UntrustedLogKey) == (c["want_error"] == "UntrustedLogKey"), e
        raise
    assert summary == c["want_summary"]


def run_open_sealed(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    kp = SealKeyPair.from_private_bytes(bytes.fromhex(KEYS["x25519_" + c["recipient"]]["private_hex"]))
    got = open_sealed(
        kp,
        bytes.fromhex(c["blob_hex"]),
        info=bytes.fromhex(c["info_hex"]),
        aad=bytes.fromhex(c["aad_hex"]),
        max_size=c.get("max_size", DEFAULT_MAX_SIZE),
    )
    if c["want_error"] is None:
        assert got.hex() == c["want_plaintext_hex"]


def _payload_keypair(c: dict[str, Any]) -> SealKeyPair:
    return SealKeyPair.from_private_bytes(bytes.fromhex(KEYS["x25519_" + c["recipient"]]["private_hex"]))


def run_open_input(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    from marketplace.compute.payload import code_digest, open_input

    job = open_input(_payload_keypair(c), c["job_id"], bytes.fromhex(c["blob_hex"]), max_size=1 << 20)
    if c["want_error"] is not None:
        return
    h = c["want_header"]
    assert (job.job_id, job.kind, job.reply_public, job.format, job.params) == (
        h["job_id"],
        h["kind"],
        h["reply_public"],
        h["format"],
        h["params"],
    )
    assert job.reply_public == KEYS["x25519_reply"]["public"]
    if "want_body_hex" in c:
        assert job.data.hex() == c["want_body_hex"]
    if "want_code_digest" in c:
        assert job.code == h["code"]
        assert code_digest(job.code) == c["want_code_digest"]


def run_open_result(c: dict[str, Any], section: dict[str, Any], tmp: Path) -> None:
    from marketplace.compute.payload import open_result

    res = open_result(_payload_keypair(c), c["job_id"], bytes.fromhex(c["blob_hex"]))
    if c["want_error"] is None:
        h = c["want_header"]
        assert (res.job_id, res.kind, res.format, res.metrics, res.stdout, list(res.outputs)) == (
            h["job_id"],
            h["kind"],
            h["format"],
            h["metrics"],
            h["stdout"],
            h["outputs"],
        )


RUNNERS = {name[len("run_") :]: fn for name, fn in dict(globals()).items() if name.startswith("run_")}


def test_every_op_has_a_runner() -> None:
    ops = {c["op"] for s in SECTIONS for c in DOC[s]["cases"]}
    assert ops == set(RUNNERS), ops ^ set(RUNNERS)


@pytest.mark.parametrize(("section", "c"), _cases())
def test_vector(section: str, c: dict[str, Any], tmp_path: Path) -> None:
    run = RUNNERS[c["op"]]
    want = c["want_error"]
    if want is None:
        run(c, DOC[section], tmp_path)
        return
    with pytest.raises(ERRORS[want]):
        run(c, DOC[section], tmp_path)


# -- 4. the real service -----------------------------------------------------------------------------


def test_the_ledger_service_returns_the_vector_receipts(tmp_path: Path) -> None:
    """Given the vectors' log key and records, ``ledger.receipt`` returns exactly the receipts."""
    from crypto.note import NoteSigner
    from marketplace.runtime import Runtime
    from marketplace.services import ledger
    from marketplace.settings import Settings

    led = DOC["ledger"]
    data_dir = tmp_path / "data"
    key_dir = tmp_path / "keys"  # outside the data directory (marketplace.custody)
    key_dir.mkdir(mode=0o700)
    signer = NoteSigner(KEYS["log"]["name"], SigningKey.from_private_bytes(bytes.fromhex(KEYS["log"]["seed_hex"])))
    seed = base64.b64encode(b"\x01" + bytes.fromhex(KEYS["log"]["seed_hex"])).decode()
    key_file = key_dir / "log.key"
    key_file.write_text(f"PRIVATE+KEY+{signer.name}+{signer.key_id.hex()}+{seed}\n")
    key_file.chmod(0o600)
    rt = Runtime(
        Settings(
            data_dir=data_dir,
            key_dir=key_dir,
            database_url=f"sqlite:///{tmp_path / 'som.db'}",
            log_origin=led["origin"],
        )
    )
    try:
        records = [json.loads(b64d(x)) for x in led["leaves_b64"]]
        with rt.tx() as s:
            ledger.append_many(s, records[:3])
        ledger.sign_checkpoint(rt)
        receipt_3 = ledger.receipt(rt, 1)
        with rt.tx() as s:
            ledger.append_many(s, records[3:])
        ledger.sign_checkpoint(rt)
        got = [ledger.receipt(rt, i) for i in range(7)]
    finally:
        rt.close()
    want = [c["receipt"] for c in led["cases"] if c["want_error"] is None]
    assert got + [receipt_3] == want


def test_som_ledger_verify_cli_on_the_export_vectors(tmp_path: Path) -> None:
    """`som --json ledger verify DIR --vkey KEY`: exit 0 with the summary, 3 for a log failure,
    4 naming the leaf for a contract violation, 5 for an export under another key or origin
    (docs/ledger.md)."""
    from typer.testing import CliRunner

    from marketplace.cli import app

    runner = CliRunner()
    by_error: dict[str | None, dict[str, Any]] = {}
    for c in DOC["exports"]["cases"]:
        by_error.setdefault(c["want_error"], c)
    vkey = DOC["exports"]["trusted_vkey"]
    for want, code in ((None, 0), ("LogVerificationError", 3), ("ComplianceViolation", 4), ("UntrustedLogKey", 5)):
        c = by_error[want]
        d = tmp_path / f"export-{code}"
        for rel, text in c["files"].items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(text.encode())
        origin = ["--origin", c["origin"]] if "origin" in c else []
        r = runner.invoke(app, ["--json", "ledger", "verify", str(d), "--vkey", vkey, *origin], catch_exceptions=False)
        assert r.exit_code == code, r.output
        if want is None:
            assert json.loads(r.stdout) == c["want_summary"]
        elif want == "ComplianceViolation":
            assert f"leaf {c['want_index']}" in r.output
