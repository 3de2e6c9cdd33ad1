"""crypto.note and crypto.checkpoint: the upstream signed-note and checkpoint examples, and
every tamper of a note we sign is refused."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from crypto import merkle
from crypto.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.note import (
    MAX_SIGNATURES,
    CosignatureSigner,
    CosignatureVerifier,
    MalformedNote,
    NoteSigner,
    NoteVerifier,
    add_signature_lines,
    cosign,
    cosignature_timestamp,
    format_vkey,
    open_note,
    sign_note,
    verify_cosignature,
)
from crypto.signing import SigningKey

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "transparency-log.json").read_text())
SIGNED = {v["id"]: v for v in VECTORS["signed_notes"]}
EXAMPLES = {v["id"]: v for v in VECTORS["checkpoint_examples"]}


@pytest.mark.parametrize("vec", VECTORS["signed_notes"], ids=lambda v: v["id"])
def test_signed_note_vectors_open(vec):
    verifier = NoteVerifier.from_vkey(vec["vkey"])
    assert verifier.vkey() == vec["vkey"]
    note = open_note(vec["note"].encode(), [verifier])
    assert vec["note"].startswith(note.text + "\n\u2014 ")
    assert [s.name for s in note.signatures] == [verifier.name]
    # Any other key: nothing known signed it.
    other = NoteSigner(verifier.name, SigningKey.generate()).verifier
    with pytest.raises(InvalidSignature):
        open_note(vec["note"].encode(), [other])


def test_signed_note_resign_reproduces_go_signature():
    vec = SIGNED["go-sumdb-note-PeterNeumann"]
    signer = NoteSigner.from_skey(vec["skey"])
    assert signer.verifier.vkey() == vec["vkey"]
    text = vec["note"].split("\n\n\u2014 ")[0] + "\n"
    assert sign_note(text, [signer]) == vec["note"].encode()


def test_sum_golang_org_checkpoint_opens_as_checkpoint():
    vec = SIGNED["sum.golang.org-real-checkpoint"]
    cp = open_checkpoint(vec["note"].encode(), NoteVerifier.from_vkey(vec["vkey"]))
    assert cp.origin == vec["origin"]
    assert cp.size == vec["tree_size"]
    assert cp.body().decode() in vec["note"]


def test_one_checkpoint_many_signers():
    # The sumdb checkpoint signed by extra keys: with all verifiers, every signature verifies;
    # with one, the others are reported as unverified and ignored.
    ids = [
        "sum.golang.org-real-checkpoint",
        "sumdb-checkpoint-extra-sig-monkeys",
        "sumdb-checkpoint-extra-sig-bananas",
        "sumdb-checkpoint-extra-sig-witness",
    ]
    body = SIGNED[ids[0]]["note"].split("\n\n")[0] + "\n\n"
    lines = [SIGNED[i]["note"].split("\n\n")[1] for i in ids]
    combined = (body + "".join(lines)).encode()
    verifiers = [NoteVerifier.from_vkey(SIGNED[i]["vkey"]) for i in ids]
    note = open_note(combined, verifiers)
    assert len(note.signatures) == 4 and not note.unverified
    note = open_note(combined, verifiers[1:2])
    assert [s.name for s in note.signatures] == ["monkeys"]
    assert {s.name for s in note.unverified} == {"sum.golang.org", "bananas", "witness"}


def test_checkpoint_examples():
    ex = EXAMPLES["c2sp-tlog-checkpoint-example"]
    text, sigs = ex["note"].split("\n\n", 1)
    cp = Checkpoint.parse(text + "\n")
    assert (cp.origin, cp.size) == ("example.com/behind-the-sofa", 20852163)
    assert cp.body() == (text + "\n").encode()
    # No public key is published for it: with any verifier it does not open.
    with pytest.raises(InvalidSignature):
        open_checkpoint(ex["note"].encode(), NoteSigner(cp.origin, SigningKey.generate()).verifier)

    golden = EXAMPLES["go-sumdb-tlog-FormatTree-golden"]
    cp = Checkpoint("go.sum database tree", golden["tree_size"], merkle.leaf_hash(b"hello world"))
    assert cp.body().decode() == golden["note_text"]
    assert Checkpoint.parse(golden["note_text"]) == cp


def test_vkey_format_and_key_id():
    key = SigningKey.generate()
    signer = NoteSigner("example.com/log", key)
    vkey = format_vkey("example.com/log", key.verify_key)
    name, kid, b64 = vkey.split("+", 2)
    assert name == "example.com/log" and kid == signer.key_id.hex()
    assert base64.b64decode(b64) == b"\x01" + key.verify_key.raw
    assert NoteVerifier.from_vkey(vkey) == signer.verifier
    bad_kid = f"{name}+{'0' * 8}+{b64}"
    for bad in [bad_kid, "no-plus", f"{name}+{kid}+!!!", f"{name}+{kid}+{b64[:-4]}"]:
        with pytest.raises(KeyMaterialError):
            NoteVerifier.from_vkey(bad)
    # A cosigner vkey (type 0x04) is not a note vkey and vice versa.
    cos_vkey = CosignatureSigner("w", key).verifier.vkey()
    with pytest.raises(KeyMaterialError):
        NoteVerifier.from_vkey(cos_vkey)
    with pytest.raises(KeyMaterialError):
        CosignatureVerifier.from_vkey(vkey)


@pytest.fixture
def signer():
    return NoteSigner("som.example/ledger", SigningKey.generate())


def test_round_trip_and_tampering(signer):
    text = "hello\n\nworld\n"
    data = sign_note(text, signer)
    note = open_note(data, signer.verifier)
    assert note.text == text
    # Tampered text.
    with pytest.raises(InvalidSignature):
        open_note(data.replace(b"hello", b"hellp"), [signer.verifier])
    # Tampered signature: flip a byte of the raw signature (after the key id).
    line = data.decode().split("\n\n")[-1]
    name, b64 = line[2:-1].split(" ")
    raw = bytearray(base64.b64decode(b64))
    raw[10] ^= 1
    forged = data.decode().replace(b64, base64.b64encode(bytes(raw)).decode()).encode()
    with pytest.raises(InvalidSignature):
        open_note(forged, [signer.verifier])
    # Wrong key with the same name: the key id differs, so nothing known signed it.
    other = NoteSigner(signer.name, SigningKey.generate())
    with pytest.raises(InvalidSignature):
        open_note(data, [other.verifier])
    # A known key's signature that fails rejects the note even if another one verifies.
    both = sign_note(text, [signer, other])
    body, sigs = both.decode().rsplit("\n\n", 1)
    first, second = sigs.splitlines()
    swapped = (body + "\n\n" + first + "\n" + second.replace(second[-8:-2], "AAAAAA") + "\n").encode()
    with pytest.raises(InvalidSignature):
        open_note(swapped, [signer.verifier, other.verifier])


def test_unknown_keys_ignored_and_duplicates_dropped(signer):
    stranger = NoteSigner("stranger.example", SigningKey.generate())
    data = sign_note("x\n", [stranger, signer])
    note = open_note(data, [signer.verifier])
    assert [s.name for s in note.signatures] == [signer.name]
    assert [s.name for s in note.unverified] == ["stranger.example"]
    dup = data + data.decode().splitlines(keepends=True)[-1].encode()
    note = open_note(dup, [signer.verifier])
    assert len(note.signatures) == 1


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.replace(b"\n\n", b"\n", 1),  # no blank line
        lambda d: d[:-1],  # signature block not newline-terminated
        lambda d: d.replace("\u2014".encode(), b"-"),  # not an em dash
        lambda d: d.replace("\u2014 ".encode(), "\u2014".encode()),  # no space
        lambda d: d + b"garbage\n",  # trailing non-signature line
        lambda d: d + "\u2014 name\n".encode(),  # no signature
        lambda d: d + "\u2014 name !!!!\n".encode(),  # not base64
        lambda d: d + "\u2014 name AAAA\n".encode(),  # shorter than key id + 1
        lambda d: d + "\u2014 na+me AAAAAAAA\n".encode(),  # '+' in name
        lambda d: d.replace(b"hello", b"hel\rlo"),  # control character
        lambda d: d.replace(b"hello", b"hel\xfflo"),  # not UTF-8
        lambda d: d + b"\n",  # empty signature line
    ],
)
def test_malformed_notes_rejected(signer, mutate):
    data = sign_note("hello\n", signer)
    open_note(data, signer.verifier)
    with pytest.raises(MalformedNote):
        open_note(mutate(data), [signer.verifier])


def test_too_many_signatures_rejected(signer):
    data = sign_note("hello\n", signer)
    stranger = NoteSigner("s", SigningKey.generate())
    extra = sign_note("hello\n", stranger).split(b"\n\n")[1]
    open_note(data + extra * (MAX_SIGNATURES - 1), [signer.verifier])
    with pytest.raises(MalformedNote):
        open_note(data + extra * MAX_SIGNATURES, [signer.verifier])


def test_sign_note_rejects_bad_text(signer):
    for bad in ["no newline", "tab\there\n"]:
        with pytest.raises(ValueError):
            sign_note(bad, signer)
    with pytest.raises(ValueError):
        sign_note("x\n", [])
    with pytest.raises(ValueError):
        NoteSigner("has space", SigningKey.generate())
    with pytest.raises(ValueError):
        NoteSigner("a+b", SigningKey.generate())


def test_cosignature_round_trip_and_message_layout():
    key = SigningKey.generate()
    cosigner = CosignatureSigner("witness.example/w1", key)
    body = Checkpoint("example.com/log", 5, merkle.EMPTY_ROOT).body()
    line = cosign(body, cosigner, now=1679315147)
    verify_cosignature(body, line, cosigner.verifier)
    raw = base64.b64decode(line.split(" ")[2])
    assert raw[:4] == cosigner.key_id
    assert int.from_bytes(raw[4:12], "big") == 1679315147
    # The signature is Ed25519 over exactly the c2sp.org/tlog-cosignature message.
    msg = b"cosignature/v1\ntime 1679315147\n" + body
    key.verify_key.verify(raw[12:], msg)
    opened = open_note(add_signature_lines(body + b"\n" + line.encode(), []), [cosigner.verifier])
    assert cosignature_timestamp(opened.signatures[0]) == 1679315147


def test_cosignature_tampering_rejected():
    cosigner = CosignatureSigner("w", SigningKey.generate())
    body = Checkpoint("example.com/log", 5, merkle.EMPTY_ROOT).body()
    line = cosign(body, cosigner, now=1000)
    other_body = Checkpoint("example.com/log", 6, merkle.EMPTY_ROOT).body()
    with pytest.raises(InvalidSignature):
        verify_cosignature(other_body, line, cosigner.verifier)
    with pytest.raises(InvalidSignature):
        verify_cosignature(body, line, CosignatureSigner("w", SigningKey.generate()).verifier)
    # Changing the timestamp breaks the signature.
    raw = bytearray(base64.b64decode(line.split(" ")[2]))
    raw[11] ^= 1
    forged = f"\u2014 w {base64.b64encode(bytes(raw)).decode()}\n"
    with pytest.raises(InvalidSignature):
        verify_cosignature(body, forged, cosigner.verifier)
    # A cosignature from the future (relative to the verifier's clock) is refused.
    with pytest.raises(InvalidSignature):
        verify_cosignature(body, line, cosigner.verifier, now=999)
    verify_cosignature(body, line, cosigner.verifier, now=1000)
    # A plain note signature by the same key is not a cosignature (different key id, message).
    plain = sign_note(body.decode(), NoteSigner("w", SigningKey.generate()))
    with pytest.raises(InvalidSignature):
        verify_cosignature(body, plain.split(b"\n\n")[1].decode(), cosigner.verifier)


def test_checkpoint_sign_open_and_strict_parse(signer):
    cp = Checkpoint(signer.name, 42, bytes(range(32)), ("ext line",))
    note = sign_checkpoint(cp, signer)
    assert open_checkpoint(note, signer.verifier) == cp
    assert open_checkpoint(note, signer.verifier, origin=signer.name) == cp
    with pytest.raises(InvalidSignature):
        open_checkpoint(note, signer.verifier, origin="other")
    root = base64.b64encode(bytes(32)).decode()
    for bad in [
        f"o\n042\n{root}\n",
        f"o\n-1\n{root}\n",
        f"o\n+1\n{root}\n",
        f"o\n1 \n{root}\n",
        f"o\n\u0661\n{root}\n",  # non-ASCII digit
        f"\n1\n{root}\n",
        f"o\n1\n{base64.b64encode(bytes(31)).decode()}\n",
        f"o\n1\n{root[:-1]}\n",
        f"o\n1\n{root}",
        f"o\n1\n{root}\n\n",  # empty extension line
        "o\n1\n",
    ]:
        with pytest.raises(MalformedNote):
            Checkpoint.parse(bad)
    assert Checkpoint.parse(f"o\n0\n{root}\n").size == 0
    with pytest.raises(ValueError):
        Checkpoint("o", 1, b"short")
    with pytest.raises(ValueError):
        Checkpoint("o\nx", 1, bytes(32))
