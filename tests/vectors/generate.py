"""Generate tests/vectors/som-formats.json: golden vectors for Share-of-Model's own formats.

For: independent verifiers and peer implementations that want to check theirs against ours
(ledger leaves, offers and contracts, contract event chains, signed checkpoints and receipts,
witness cosignatures, offline exports, sealed job payloads). See docs/vectors.md.
Not for: the third-party conformance vectors (tests/vectors/transparency-log.json holds those).

Deterministic: fixed Ed25519 seeds, fixed times, fixed X25519 keys. Ed25519 (RFC 8032) is
deterministic, so everything is recomputed exactly on every run, except HPKE: its encapsulation
is randomized, so the sealed payloads were generated once (``--reseal``) and are stored below in
``_SEALED``; every run checks they still open and derives the tampered siblings from them.

Usage::

    python tests/vectors/generate.py            # rewrite tests/vectors/som-formats.json
    python tests/vectors/generate.py --check    # exit 1 if the committed file differs
    python tests/vectors/generate.py --reseal   # print fresh _SEALED constants (then paste them)

``tests/test_vectors_som.py`` regenerates into a temporary file and compares byte for byte.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from contracts.offer import (  # noqa: E402
    Contract,
    accept_offer,
    advance,
    draft_event,
    initial_state,
    make_offer,
    sign_event,
)
from contracts.records import (  # noqa: E402
    audit_record,
    contract_event_record,
    contract_record,
    job_approval_record,
    usage_record,
)
from contracts.terms import JobLimits, Terms  # noqa: E402
from crypto.canonical import canonicalize  # noqa: E402
from crypto.checkpoint import Checkpoint, sign_checkpoint  # noqa: E402
from crypto.errors import DecryptionError  # noqa: E402
from crypto.merkle import MerkleTree, leaf_hash  # noqa: E402
from crypto.note import CosignatureSigner, NoteSigner, cosign  # noqa: E402
from crypto.sealing import SealKeyPair  # noqa: E402
from crypto.signing import SigningKey  # noqa: E402

OUT = Path(__file__).resolve().parent / "som-formats.json"

# -- sources ---------------------------------------------------------------------------------

JCS = "RFC 8785 (JSON Canonicalization Scheme)"
EDDSA = "RFC 8032 §5.1 (Ed25519)"
LEAF_DOCS = "docs/ledger.md#leaves; contracts/records.py (leaf schemas)"
OFFERS = "contracts/offer.py module docstring (som.offer/v1, som.acceptance/v1, som.event/v1)"
RFC9162 = "RFC 9162 §2.1 (Merkle tree hashing, inclusion and consistency proofs)"
NOTE = "c2sp.org/signed-note"
CHECKPOINT = "c2sp.org/tlog-checkpoint"
COSIG = "c2sp.org/tlog-cosignature"
WITNESS = "c2sp.org/tlog-witness (add-checkpoint semantics)"
RECEIPTS = "docs/ledger.md#receipts (ledger.receipt / verify_receipt)"
EXPORT = "docs/ledger.md#how-a-compliance-officer-verifies (som ledger verify)"
COMPLIANCE = "contracts/compliance.py module docstring (rules per leaf)"
HPKE = "RFC 9180 base mode: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305"
SEALING = "crypto/sealing.py module docstring (SOMSEAL framing, job_info)"
PAYLOAD = "marketplace/agent/payload.py module docstring (SOMJOBI1/SOMJOBR1 framing)"

# -- fixed keys and times ------------------------------------------------------------------------


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"som-vectors/v1/" + label.encode()).digest()


ORIGIN = "vectors.som.example/ledger"
WITNESS_NAME = "vectors.som.example/witness"
TS_COSIGN = 1_772_409_600  # 2026-03-02T00:00:00Z

T0 = datetime(2026, 3, 1, tzinfo=UTC)
PROVIDER = SigningKey.from_private_bytes(_seed("provider"))
CONSUMER = SigningKey.from_private_bytes(_seed("consumer"))
STRANGER = SigningKey.from_private_bytes(_seed("stranger"))
LOG = NoteSigner(ORIGIN, SigningKey.from_private_bytes(_seed("log")))
IMPOSTOR_LOG = NoteSigner(ORIGIN, SigningKey.from_private_bytes(_seed("impostor-log")))
OTHER_ORIGIN = "other.som.example/ledger"
OTHER_LOG = NoteSigner(OTHER_ORIGIN, SigningKey.from_private_bytes(_seed("impostor-log")))
WITNESS_KEY = SigningKey.from_private_bytes(_seed("witness"))
WITNESS_SIGNER = CosignatureSigner(WITNESS_NAME, WITNESS_KEY)
OTHER_WITNESS = CosignatureSigner(WITNESS_NAME, SigningKey.from_private_bytes(_seed("other-witness")))
COMPUTE = SealKeyPair.from_private_bytes(_seed("x25519/compute-site"))
REPLY = SealKeyPair.from_private_bytes(_seed("x25519/consumer-reply"))
OTHER_X = SealKeyPair.from_private_bytes(_seed("x25519/other"))

SEAL_KEYS = {"compute": COMPUTE, "reply": REPLY, "other": OTHER_X}
JOB_ID = "job_vectors_0001"
CUSTOM_JOB_ID = "job_vectors_0002"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    """``data`` with bit ``bit`` of byte ``index`` (negative: from the end) flipped."""
    b = bytearray(data)
    b[index] ^= 1 << bit
    return bytes(b)


def flip_sig(sig_b64: str) -> str:
    return b64(flip(base64.b64decode(sig_b64), 10))


def case(desc: str, want_error: str | None, source: list[str], op: str, **fields: Any) -> dict[str, Any]:
    return {"desc": desc, "want_error": want_error, "source": source, "op": op, **fields}


# -- contracts -------------------------------------------------------------------------------------


def make_terms(quota: int = 1000) -> Terms:
    return Terms(
        modes=frozenset({"he_inference", "remote_job"}),
        quota_units=quota,
        rate_units=200,
        rate_window_seconds=60,
        valid_from=T0,
        valid_until=T0 + timedelta(days=365),
        unit_price_minor=7,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset({"predict", "evaluate", "custom"}), 600, 2048, 900),
    )


def make_contract(offer_id: str = "offer_vectors_1", quota: int = 1000) -> Contract:
    offer = make_offer(
        offer_id=offer_id,
        offering_id="off_vectors_iris",
        provider_org="org_provider",
        terms=make_terms(quota),
        signing_key=PROVIDER,
        now=T0 - timedelta(days=1),
    )
    return accept_offer(offer, consumer_org="org_consumer", signing_key=CONSUMER, now=T0 - timedelta(hours=1))


CONTRACT = make_contract()


def make_events() -> list[Any]:
    c, st = CONTRACT, initial_state(CONTRACT)
    out = []
    plan = [
        ("suspension", "provider", "invoice overdue", None, 2),
        ("resumption", "provider", "invoice paid", None, 3),
        ("amendment", "provider", "quota raised", make_terms(2000), 4),
        ("termination", "consumer", "project finished", None, 5),
    ]
    for kind, by, reason, terms, hours in plan:
        ev = draft_event(c, st, kind, by=by, reason=reason, terms=terms, now=T0 + timedelta(hours=hours))
        signers = ["provider", "consumer"] if kind == "amendment" else [by]
        for p in signers:
            ev = sign_event(ev, p, PROVIDER if p == "provider" else CONSUMER)
        st = advance(c, st, ev)
        out.append(ev)
    return out


EVENTS = make_events()


def usage(
    contract: Contract, n: int, units: int, minutes: int, *, mode: str = "he_inference", outcome: str = "charged"
) -> dict[str, Any]:
    return usage_record(
        contract,
        usage_id=f"use_vectors_{contract.offer.offer_id[-1]}_{n}",
        mode=mode,
        units=units,
        outcome=outcome,
        request_digest=digest(f"request {n}"),
        idempotency_key_digest=digest(f"idempotency key {n}"),
        time=T0 + timedelta(minutes=minutes),
    )


AUDIT = audit_record(
    event_id="aud_vectors_0001",
    actor="zoë@consumer.example",
    org="org_consumer",
    action="job.submit",
    target='job_vectors_0001 "iris" \\ α',
    outcome="success",
    request_id="req_vectors_0001",
    time=T0 + timedelta(minutes=11),
)
AUDIT_NULLS = audit_record(
    event_id="aud_vectors_0002",
    actor="system",
    org=None,
    action="ledger.checkpoint",
    target=None,
    outcome="failure",
    request_id=None,
    time=T0 + timedelta(minutes=12),
)
JOB_APPROVAL = job_approval_record(
    job_id=CUSTOM_JOB_ID,
    contract_id=CONTRACT.contract_id,
    code_digest=digest("print('hello')\n"),
    decision="approved",
    actor="bob@provider.example",
    time=T0 + timedelta(minutes=20),
)

# The 7-leaf ledger: a contract, its uses, an audit event, a job approval, a suspension.
LEDGER_RECORDS: list[dict[str, Any]] = [
    contract_record(CONTRACT, time=T0 - timedelta(hours=1)),
    usage(CONTRACT, 1, 40, 10),
    AUDIT,
    JOB_APPROVAL,
    usage(CONTRACT, 2, 25, 30, mode="remote_job"),
    usage(CONTRACT, 3, 10, 40, outcome="released"),
    contract_event_record(EVENTS[0], time=EVENTS[0].time),
]
LEAVES: list[bytes] = [canonicalize(r) for r in LEDGER_RECORDS]


def tree(leaves: list[bytes]) -> MerkleTree:
    return MerkleTree(leaves)


def note_for(leaves: list[bytes], size: int, signer: NoteSigner = LOG, origin: str = ORIGIN) -> str:
    cp = Checkpoint(origin, size, tree(leaves).root(size))
    return sign_checkpoint(cp, signer).decode()


def receipt(leaves: list[bytes], index: int, size: int) -> dict[str, Any]:
    """Exactly the shape ``marketplace.services.ledger.receipt`` returns."""
    t = tree(leaves)
    return {
        "index": index,
        "leaf": b64(leaves[index]),
        "leaf_hash": b64(leaf_hash(leaves[index])),
        "inclusion_proof": [b64(p) for p in t.inclusion_proof(index, size)],
        "checkpoint": note_for(leaves, size),
    }


# -- sections ---------------------------------------------------------------------------------------


def keys_section() -> dict[str, Any]:
    def ed(k: SigningKey) -> dict[str, str]:
        return {"seed_hex": k.unsafe_private_bytes().hex(), "public": k.verify_key.to_text()}

    def x(k: SealKeyPair) -> dict[str, str]:
        return {"private_hex": k.unsafe_private_bytes().hex(), "public": k.public_text()}

    return {
        "about": "Test keys (never use them for anything else). Ed25519 seeds are "
        "SHA-256('som-vectors/v1/' + label); X25519 private keys likewise.",
        "provider": ed(PROVIDER),
        "consumer": ed(CONSUMER),
        "stranger": ed(STRANGER),
        "log": {**ed(LOG._key), "name": ORIGIN, "vkey": LOG.verifier.vkey()},
        "impostor_log": {**ed(IMPOSTOR_LOG._key), "name": ORIGIN, "vkey": IMPOSTOR_LOG.verifier.vkey()},
        "witness": {**ed(WITNESS_KEY), "name": WITNESS_NAME, "vkey": WITNESS_SIGNER.verifier.vkey()},
        "other_witness": {
            **ed(OTHER_WITNESS._key),
            "name": WITNESS_NAME,
            "vkey": OTHER_WITNESS.verifier.vkey(),
        },
        "x25519_compute": x(COMPUTE),
        "x25519_reply": x(REPLY),
        "x25519_other": x(OTHER_X),
    }


def _reordered_text(record: dict[str, Any]) -> str:
    """A non-canonical but equal JSON text: keys reversed, indented, non-ASCII escaped."""

    def rev(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rev(v[k]) for k in reversed(list(v))}
        if isinstance(v, list):
            return [rev(x) for x in v]
        return v

    return json.dumps(rev(record), indent=2, ensure_ascii=True)


def canonical_section() -> dict[str, Any]:
    records = [
        ("usage, charged", usage(CONTRACT, 1, 40, 10)),
        ("usage, released", usage(CONTRACT, 3, 10, 40, outcome="released")),
        ("contract (signed offer + acceptance)", LEDGER_RECORDS[0]),
        ("contract event (suspension)", LEDGER_RECORDS[6]),
        (
            "contract event (amendment, with terms, two signatures)",
            contract_event_record(EVENTS[2], time=EVENTS[2].time),
        ),
        ("audit (non-ASCII, quote and backslash escapes)", AUDIT),
        ("audit (null org, target, request_id)", AUDIT_NULLS),
        ("job approval", JOB_APPROVAL),
    ]
    cases: list[dict[str, Any]] = []
    for name, rec in records:
        data = canonicalize(rec)
        src = [JCS, LEAF_DOCS, RFC9162]
        cases.append(
            case(
                f"{name}: canonical bytes and RFC 9162 leaf hash",
                None,
                src,
                "canonical_record",
                record=rec,
                input_text=_reordered_text(rec),
                canonical=data.decode(),
                leaf_hash_hex=leaf_hash(data).hex(),
            )
        )
        pos = data.index(b'"som.') + 5
        for desc, bad in [
            ("truncated by one byte", data[:-1]),
            ("trailing garbage", data + b"garbage"),
            ("bit flip in the schema name", flip(data, pos)),
        ]:
            cases.append(case(f"{name}: {desc}", "SchemaError", [LEAF_DOCS], "parse_leaf", leaf_b64=b64(bad)))
    data = canonicalize(records[0][1])
    extra = [
        ("usage: bit flip making invalid UTF-8", flip(data, 0, 7)),
        ("usage: duplicate key", data[:-1] + b',"units":41}'),
        ("usage: unknown extra field", data[:-1] + b',"zz":1}'),
        ("usage: units as a string", data.replace(b'"units":40', b'"units":"40"')),
        ("usage: NaN", data.replace(b'"units":40', b'"units":NaN')),
    ]
    for desc, bad in extra:
        cases.append(case(desc, "SchemaError", [LEAF_DOCS], "parse_leaf", leaf_b64=b64(bad)))
    return {
        "about": "Ledger leaves: the RFC 8785 canonical JSON of each record kind and its leaf "
        "hash SHA-256(0x00 || bytes). input_text is an equal but non-canonical JSON text that must "
        "canonicalize to the same bytes. parse_leaf cases must be refused by a strict leaf parser.",
        "cases": cases,
    }


def contracts_section() -> dict[str, Any]:
    c = CONTRACT.to_dict()
    src = [OFFERS, EDDSA, JCS]
    cases = [
        case(
            "signed offer + acceptance: both signatures verify; contract id and digests",
            None,
            src,
            "verify_contract",
            contract=c,
            pin_provider_key=CONTRACT.offer.provider_key,
            pin_consumer_key=CONTRACT.acceptance.consumer_key,
            offer_signed_text=canonicalize(CONTRACT.offer.body()).decode(),
            acceptance_signed_text=canonicalize(CONTRACT.acceptance.body()).decode(),
            offer_digest=CONTRACT.offer.digest(),
            contract_digest=CONTRACT.digest(),
            contract_id=CONTRACT.contract_id,
        )
    ]

    def bad(desc: str, err: str, mutate: Any, **pins: Any) -> None:
        d = copy.deepcopy(c)
        mutate(d)
        cases.append(case(desc, err, src, "verify_contract", contract=d, **pins))

    def set_(path: list[str], value: Any) -> Any:
        def m(d: dict[str, Any]) -> None:
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value

        return m

    bad("offer terms changed (quota_units)", "InvalidSignature", set_(["offer", "terms", "quota_units"], 1001))
    bad("offer price changed", "InvalidSignature", set_(["offer", "terms", "price", "unit_price_minor"], 1))
    bad("acceptance consumer_org changed", "InvalidSignature", set_(["acceptance", "consumer_org"], "org_mallory"))
    bad(
        "offer signature bit flipped",
        "InvalidSignature",
        set_(["offer", "signature"], flip_sig(c["offer"]["signature"])),
    )
    bad(
        "acceptance signature bit flipped",
        "InvalidSignature",
        set_(["acceptance", "signature"], flip_sig(c["acceptance"]["signature"])),
    )
    bad(
        "offer provider_key swapped for the consumer's key",
        "InvalidSignature",
        set_(["offer", "provider_key"], CONSUMER.verify_key.to_text()),
    )
    bad(
        "acceptance consumer_key swapped for a stranger's key",
        "InvalidSignature",
        set_(["acceptance", "consumer_key"], STRANGER.verify_key.to_text()),
    )
    bad(
        "signatures swapped between offer and acceptance",
        "InvalidSignature",
        lambda d: (
            d["offer"].__setitem__("signature", c["acceptance"]["signature"]),
            d["acceptance"].__setitem__("signature", c["offer"]["signature"]),
        ),
    )
    other = make_contract(offer_id="offer_vectors_2")
    bad(
        "acceptance of another offer (offer_digest binds a different offer)",
        "InvalidSignature",
        set_(["acceptance"], other.acceptance.to_dict()),
    )
    bad(
        "untouched contract, provider key pinned to a stranger's",
        "InvalidSignature",
        lambda d: None,
        pin_provider_key=STRANGER.verify_key.to_text(),
    )
    bad(
        "untouched contract, consumer key pinned to the provider's",
        "InvalidSignature",
        lambda d: None,
        pin_consumer_key=PROVIDER.verify_key.to_text(),
    )
    bad("offer signature truncated", "SchemaError", set_(["offer", "signature"], c["offer"]["signature"][:-4]))
    bad(
        "acceptance with trailing garbage in its signature",
        "SchemaError",
        set_(["acceptance", "signature"], c["acceptance"]["signature"] + "AAAA"),
    )
    bad("offer schema version changed", "SchemaError", set_(["offer", "schema"], "som.offer/v2"))
    bad("unknown field in the acceptance", "SchemaError", set_(["acceptance", "note"], "x"))
    return {
        "about": "A provider's signed offer, the consumer's acceptance and the contract id "
        "('ct_' + the first 32 hex digits of SHA-256 of the canonical signed acceptance). Each "
        "signature is Ed25519 over the canonical JSON of the record without its signature "
        "(offer_signed_text, acceptance_signed_text). pin_* keys, when present, are the keys "
        "the verifier expects.",
        "cases": cases,
    }


def events_section() -> dict[str, Any]:
    evs = [e.to_dict() for e in EVENTS]
    src = [OFFERS, EDDSA, JCS]
    st = initial_state(CONTRACT)
    heads = []
    for e in EVENTS:
        st = advance(CONTRACT, st, e)
        heads.append(st.head)
    cases = [
        case(
            "suspension, resumption, amendment (both sign), termination by the consumer",
            None,
            src,
            "verify_chain",
            events=evs,
            signed_texts=[canonicalize(e.body()).decode() for e in EVENTS],
            event_digests=heads,
            want_status="terminated",
            want_seq=4,
            status_at=[
                {"time": "2026-03-01T01:00:00.000000Z", "status": "active", "quota_units": 1000},
                {"time": "2026-03-01T02:30:00.000000Z", "status": "suspended", "quota_units": 1000},
                {"time": "2026-03-01T03:30:00.000000Z", "status": "active", "quota_units": 1000},
                {"time": "2026-03-01T04:30:00.000000Z", "status": "active", "quota_units": 2000},
                {"time": "2026-03-01T05:00:00.000000Z", "status": "terminated", "quota_units": 2000},
            ],
        ),
        case(
            "a prefix of the chain is itself a valid chain (suspended): a chain cannot show "
            "truncation, the ledger does",
            None,
            src,
            "verify_chain",
            events=evs[:1],
            event_digests=heads[:1],
            want_status="suspended",
            want_seq=1,
            status_at=[],
        ),
    ]

    def bad(desc: str, err: str, events: list[dict[str, Any]]) -> None:
        cases.append(case(desc, err, src, "verify_chain", events=events))

    def edit(i: int, path: list[str], value: Any) -> list[dict[str, Any]]:
        out = copy.deepcopy(evs)
        d = out[i]
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
        return out

    bad("suspension reason changed", "InvalidSignature", edit(0, ["reason"], "no reason"))
    bad("termination time changed", "InvalidSignature", edit(3, ["time"], "2026-03-01T05:00:01.000000Z"))
    bad(
        "suspension signature bit flipped",
        "InvalidSignature",
        edit(0, ["signatures", "provider"], flip_sig(evs[0]["signatures"]["provider"])),
    )
    bad(
        "amendment consumer signature bit flipped",
        "InvalidSignature",
        edit(2, ["signatures", "consumer"], flip_sig(evs[2]["signatures"]["consumer"])),
    )
    susp_by_stranger = sign_event(
        draft_event(
            CONTRACT,
            initial_state(CONTRACT),
            "suspension",
            by="provider",
            reason="invoice overdue",
            now=T0 + timedelta(hours=2),
        ),
        "provider",
        STRANGER,
    )
    bad(
        "suspension signed by another key under the provider's name (swapped key)",
        "InvalidSignature",
        [susp_by_stranger.to_dict()],
    )
    susp_by_consumer = sign_event(
        draft_event(
            CONTRACT,
            initial_state(CONTRACT),
            "suspension",
            by="provider",
            reason="invoice overdue",
            now=T0 + timedelta(hours=2),
        ),
        "consumer",
        CONSUMER,
    )
    bad("suspension signed by the consumer (only the provider may suspend)", "ChainError", [susp_by_consumer.to_dict()])
    bad(
        "amendment missing the consumer's signature",
        "ChainError",
        edit(2, ["signatures"], {"provider": evs[2]["signatures"]["provider"]}),
    )
    bad("events reordered (resumption first)", "ChainError", [evs[1], evs[0], *evs[2:]])
    bad("an event dropped from the middle (resumption)", "ChainError", [evs[0], *evs[2:]])
    bad("an event repeated", "ChainError", [evs[0], evs[0]])
    st = initial_state(CONTRACT)
    for e in EVENTS:
        st = advance(CONTRACT, st, e)
    after = sign_event(
        draft_event(CONTRACT, st, "resumption", by="provider", reason="oops", now=T0 + timedelta(hours=6)),
        "provider",
        PROVIDER,
    )
    bad("a correctly signed event after the termination", "ChainError", [*evs, after.to_dict()])
    other = make_contract(offer_id="offer_vectors_2")
    foreign = sign_event(
        draft_event(
            other,
            initial_state(other),
            "suspension",
            by="provider",
            reason="invoice overdue",
            now=T0 + timedelta(hours=2),
        ),
        "provider",
        PROVIDER,
    )
    bad("a suspension of another contract", "ChainError", [foreign.to_dict()])
    resume_first = sign_event(
        draft_event(
            CONTRACT,
            initial_state(CONTRACT),
            "resumption",
            by="provider",
            reason="nothing to resume",
            now=T0 + timedelta(hours=2),
        ),
        "provider",
        PROVIDER,
    )
    bad("a resumption of an active contract", "ChainError", [resume_first.to_dict()])
    return {
        "about": "A contract's event chain (som.event/v1): each event's prev_digest is the "
        "digest of the previous signed event, or of the contract for the first; seq counts from 1. "
        "The contract is the happy case of the 'contracts' section. want_status is the chain's "
        "final lifecycle status; status_at gives the status and quota in effect at given times.",
        "contract": CONTRACT.to_dict(),
        "cases": cases,
    }


def _flip_note_sig(note: str) -> str:
    """The note with one bit of its (first) Ed25519 signature flipped, key id kept."""
    text, _, sigs = note.rpartition("\n\n")
    prefix, _, b64sig = sigs.rstrip("\n").split("\n")[0].rpartition(" ")
    return f"{text}\n\n{prefix} {b64(flip(base64.b64decode(b64sig), 20))}\n"


def _bad_note_root(note: str, root: bytes) -> str:
    lines = note.split("\n")
    lines[2] = b64(root)
    return "\n".join(lines)


def ledger_section() -> dict[str, Any]:
    t = tree(LEAVES)
    note3, note7 = note_for(LEAVES, 3), note_for(LEAVES, 7)
    vkey = LOG.verifier.vkey()
    src = [RECEIPTS, RFC9162, CHECKPOINT, NOTE, EDDSA]
    cases = []
    for i in range(7):
        cases.append(
            case(
                f"receipt for leaf {i} in the checkpoint of size 7",
                None,
                src,
                "verify_receipt",
                receipt=receipt(LEAVES, i, 7),
                vkey=vkey,
                want_size=7,
                want_root_b64=b64(t.root(7)),
            )
        )
    cases.append(
        case(
            "receipt for leaf 1 in the checkpoint of size 3, origin pinned",
            None,
            src,
            "verify_receipt",
            receipt=receipt(LEAVES, 1, 3),
            vkey=vkey,
            origin=ORIGIN,
            want_size=3,
            want_root_b64=b64(t.root(3)),
        )
    )
    good = receipt(LEAVES, 4, 7)

    def bad(desc: str, err: str, **changes: Any) -> None:
        r = copy.deepcopy(good)
        vk = changes.pop("vkey", vkey)
        extra = {k: changes.pop(k) for k in ["origin"] if k in changes}
        for k, v in changes.items():
            if v is None:
                del r[k]
            else:
                r[k] = v
        cases.append(case(f"leaf 4: {desc}", err, src, "verify_receipt", receipt=r, vkey=vk, **extra))

    leaf = LEAVES[4]
    proof = good["inclusion_proof"]
    bad("leaf bit flip (leaf_hash left as it was)", "InvalidProof", leaf=b64(flip(leaf, 20)))
    bad(
        "leaf bit flip, leaf_hash recomputed",
        "InvalidProof",
        leaf=b64(flip(leaf, 20)),
        leaf_hash=b64(leaf_hash(flip(leaf, 20))),
    )
    bad("leaf_hash bit flip", "InvalidProof", leaf_hash=b64(flip(leaf_hash(leaf), 0)))
    bad(
        "leaf hashed as an RFC 9162 node (no 0x00 prefix)", "InvalidProof", leaf_hash=b64(hashlib.sha256(leaf).digest())
    )
    bad("wrong index (5)", "InvalidProof", index=5)
    bad("wrong index (3)", "InvalidProof", index=3)
    bad("index beyond the checkpoint size", "InvalidProof", index=7)
    bad("truncated inclusion proof", "InvalidProof", inclusion_proof=proof[:-1])
    bad("inclusion proof with an extra hash", "InvalidProof", inclusion_proof=[*proof, proof[0]])
    bad("inclusion proof hashes reordered", "InvalidProof", inclusion_proof=list(reversed(proof)))
    bad(
        "inclusion proof hash bit flip",
        "InvalidProof",
        inclusion_proof=[b64(flip(base64.b64decode(proof[0]), 31, 7)), *proof[1:]],
    )
    bad(
        "inclusion proof hash truncated to 31 bytes",
        "InvalidProof",
        inclusion_proof=[b64(base64.b64decode(proof[0])[:31]), *proof[1:]],
    )
    bad("trailing garbage after the note's signature line", "InvalidSignature", checkpoint=note7 + "garbage")
    bad("an extra non-signature line after the note", "InvalidSignature", checkpoint=note7 + "garbage\n")
    bad("note truncated (final newline dropped)", "InvalidSignature", checkpoint=note7[:-1])
    bad("note with its blank line removed", "InvalidSignature", checkpoint=note7.replace("\n\n", "\n", 1))
    bad("note signature bit flip", "InvalidSignature", checkpoint=_flip_note_sig(note7))
    bad(
        "tree size in the note changed to 8 (signature no longer verifies)",
        "InvalidSignature",
        checkpoint=note7.replace("\n7\n", "\n8\n", 1),
        index=4,
    )
    bad(
        "root in the note swapped for the size-3 root (signature no longer verifies)",
        "InvalidSignature",
        checkpoint=_bad_note_root(note7, t.root(3)),
    )
    bad(
        "checkpoint swapped for the size-3 checkpoint (other size and root)",
        "InvalidProof",
        checkpoint=note3,
        index=1,
        leaf=b64(LEAVES[1]),
        leaf_hash=b64(leaf_hash(LEAVES[1])),
    )
    bad(
        "note signed by another key under the log's name",
        "InvalidSignature",
        checkpoint=note_for(LEAVES, 7, IMPOSTOR_LOG),
    )
    bad("verified with another key's vkey", "InvalidSignature", vkey=IMPOSTOR_LOG.verifier.vkey())
    bad("origin pinned to another log", "InvalidSignature", origin="other.example/ledger")
    bad("leaf base64 with trailing garbage", "ValueError", leaf=good["leaf"] + "!")
    bad("index as a string", "ValueError", index="4")
    bad("negative index", "ValueError", index=-1)
    bad("inclusion_proof missing", "ValueError", inclusion_proof=None)
    bad("checkpoint not a string (a number)", "ValueError", checkpoint=7)
    return {
        "about": "A 7-leaf ledger of the records above (leaves_b64, in order), its signed "
        "checkpoints at sizes 3 and 7 (C2SP signed notes, log key in keys.log) and receipts "
        "exactly as ledger.receipt returns them: {index, leaf, leaf_hash, inclusion_proof, "
        "checkpoint}, bytes in standard base64.",
        "origin": ORIGIN,
        "vkey": vkey,
        "leaves_b64": [b64(x) for x in LEAVES],
        "leaf_hashes_b64": [b64(leaf_hash(x)) for x in LEAVES],
        "roots_b64": {str(n): b64(t.root(n)) for n in range(8)},
        "checkpoints": {"3": note3, "7": note7},
        "consistency_3_7_b64": [b64(p) for p in t.consistency_proof(3, 7)],
        "cases": cases,
    }


def _fork_leaves(index: int) -> list[bytes]:
    """The ledger with leaf ``index`` (a usage leaf) charging one unit more."""
    recs = copy.deepcopy(LEDGER_RECORDS)
    r = recs[index]
    r["units"] += 1
    r["amount_minor"] = r["units"] * r["unit_price_minor"]
    return [canonicalize(x) for x in recs]


def cosign_section() -> dict[str, Any]:
    t = tree(LEAVES)
    note3, note7 = note_for(LEAVES, 3), note_for(LEAVES, 7)
    body7 = Checkpoint(ORIGIN, 7, t.root(7)).body()
    body3 = Checkpoint(ORIGIN, 3, t.root(3)).body()
    line = cosign(body7, WITNESS_SIGNER, now=TS_COSIGN)
    wv = WITNESS_SIGNER.verifier.vkey()
    log_vkey = LOG.verifier.vkey()
    src = [COSIG, NOTE, EDDSA]
    sig = base64.b64decode(line.split(" ")[-1])
    cases = [
        case(
            "witness cosignature (tlog-cosignature/v1, timestamped Ed25519) on checkpoint 7",
            None,
            src,
            "verify_cosignature",
            checkpoint_body=body7.decode(),
            line=line,
            cosigner_vkey=wv,
            now=TS_COSIGN,
            signed_message=(b"cosignature/v1\ntime %d\n" % TS_COSIGN + body7).decode(),
        ),
        case(
            "the cosigned note opens with the log's and the witness's keys",
            None,
            [*src, CHECKPOINT],
            "open_note",
            note=note7 + line,
            vkeys=[log_vkey, wv],
            note_vkey_types=["ed25519", "cosignature"],
            want_verified=2,
        ),
    ]

    def cbad(desc: str, err: str, **kw: Any) -> None:
        fields = {"checkpoint_body": body7.decode(), "line": line, "cosigner_vkey": wv, "now": TS_COSIGN, **kw}
        cases.append(case(f"cosignature: {desc}", err, src, "verify_cosignature", **fields))

    prefix = line[: line.rindex(" ") + 1]
    cbad("signature bit flip", "InvalidSignature", line=prefix + b64(flip(sig, 40)) + "\n")
    cbad("timestamp changed", "InvalidSignature", line=prefix + b64(flip(sig, 11)) + "\n")
    cbad("timestamp after now", "InvalidSignature", now=TS_COSIGN - 1)
    cbad("over the size-3 checkpoint (swapped roots)", "InvalidSignature", checkpoint_body=body3.decode())
    cbad("checkpoint body with trailing garbage", "InvalidSignature", checkpoint_body=body7.decode() + "garbage\n")
    cbad("another witness key under the same name", "InvalidSignature", cosigner_vkey=OTHER_WITNESS.verifier.vkey())
    cbad("line truncated", "InvalidSignature", line=line[:-10] + "\n")
    cases.append(
        case(
            "cosignature line checked as a plain Ed25519 note signature (type 0x01 "
            "vkey of the witness key): key ids differ, so no known key signed",
            "InvalidSignature",
            [NOTE, COSIG],
            "open_note",
            note=note7 + line,
            vkeys=[_ed25519_vkey(WITNESS_NAME, WITNESS_KEY)],
            note_vkey_types=["ed25519"],
        )
    )

    # Witness state machine (add-checkpoint semantics) and a fork.
    state3 = {"origin": ORIGIN, "size": 3, "root_hash": b64(t.root(3)), "note": note3}
    state7 = {"origin": ORIGIN, "size": 7, "root_hash": b64(t.root(7)), "note": note7}
    cons = [b64(p) for p in t.consistency_proof(3, 7)]
    fork = _fork_leaves(4)  # same first 4 leaves: consistent with size 3, not with size 7
    fork_note = note_for(fork, 7)
    rewritten = _fork_leaves(1)  # changes history before size 3
    rewritten_note = note_for(rewritten, 7)
    wsrc = [WITNESS, COSIG, RFC9162]

    def w(
        desc: str, err: str | None, state: dict[str, Any] | None, note: str, old: int, proof: list[str], **kw: Any
    ) -> None:
        cases.append(
            case(
                f"witness: {desc}",
                err,
                wsrc,
                "witness_update",
                log_vkey=log_vkey,
                witness_seed_hex=WITNESS_KEY.unsafe_private_bytes().hex(),
                witness_name=WITNESS_NAME,
                state=state,
                checkpoint=note,
                old_size=old,
                consistency_proof_b64=proof,
                now=TS_COSIGN,
                **kw,
            )
        )

    w(
        "cosigns 7 after 3 with a valid consistency proof",
        None,
        state3,
        note7,
        3,
        cons,
        want_line=line,
        want_state=state7,
    )
    w(
        "first checkpoint (old size 0, empty proof)",
        None,
        None,
        note3,
        0,
        [],
        want_line=cosign(body3, WITNESS_SIGNER, now=TS_COSIGN),
        want_state=state3,
    )
    w("same checkpoint again (old size 7, empty proof)", None, state7, note7, 7, [], want_line=line, want_state=state7)
    w("FORK: a second checkpoint of size 7 with another root", "ForkDetected", state7, fork_note, 7, [])
    w(
        "a witness that only saw size 3 cannot see the fork (leaf 4 differs): it cosigns; only "
        "someone holding both size-7 notes can (see exports)",
        None,
        state3,
        fork_note,
        3,
        [b64(p) for p in tree(fork).consistency_proof(3, 7)],
        want_line=cosign(Checkpoint(ORIGIN, 7, tree(fork).root(7)).body(), WITNESS_SIGNER, now=TS_COSIGN),
        want_state={"origin": ORIGIN, "size": 7, "root_hash": b64(tree(fork).root(7)), "note": fork_note},
    )
    w(
        "rewritten history (leaf 1 differs) with its own consistency proof from 3",
        "InvalidProof",
        state3,
        rewritten_note,
        3,
        [b64(p) for p in tree(rewritten).consistency_proof(3, 7)],
    )
    w("consistency proof truncated", "InvalidProof", state3, note7, 3, cons[:-1])
    w(
        "consistency proof hash bit flip",
        "InvalidProof",
        state3,
        note7,
        3,
        [b64(flip(base64.b64decode(cons[0]), 0)), *cons[1:]],
    )
    w("old size 0 with a non-empty proof", "InvalidProof", None, note7, 0, cons)
    w("rollback to size 3 after 7", "RollbackRefused", state7, note3, 7, [])
    w("old size not the one the witness last cosigned", "WitnessConflict", state3, note7, 0, [])
    w(
        "checkpoint signed by another key under the log's name",
        "InvalidSignature",
        state3,
        note_for(LEAVES, 7, IMPOSTOR_LOG),
        3,
        cons,
    )
    w("checkpoint signature bit flip", "InvalidSignature", state3, _flip_note_sig(note7), 3, cons)
    w("checkpoint note with trailing garbage", "InvalidSignature", state3, note7 + "garbage", 3, cons)
    return {
        "about": "A witness cosignature over the size-7 checkpoint (c2sp.org/tlog-cosignature, "
        "timestamp fixed) and the witness's add-checkpoint decisions, including a fork: the log "
        "signing a second size-7 checkpoint whose leaf 4 charges one unit more. witness_update "
        "cases give the witness state (null: none yet), the checkpoint, old size and proof; "
        "happy ones give the expected cosignature line and new state.",
        "cosigned_note": note7 + line,
        "fork_checkpoint": fork_note,
        "cases": cases,
    }


def _ed25519_vkey(name: str, key: SigningKey) -> str:
    return NoteSigner(name, key).verifier.vkey()


def _export_files(
    leaves: list[bytes],
    sizes: list[int],
    notes: dict[str, str] | None = None,
    vkey: str | None = None,
    signer: NoteSigner = LOG,
    origin: str = ORIGIN,
) -> dict[str, str]:
    lines = "".join(canonicalize({"index": i, "leaf": b64(x)}).decode() + "\n" for i, x in enumerate(leaves))
    files = {"leaves.jsonl": lines}
    for n in sizes:
        files[f"checkpoints/{n}.note"] = note_for(leaves, n, signer, origin)
    files.update(notes or {})
    files["log.vkey"] = (vkey or LOG.verifier.vkey()) + "\n"
    return files


def _summary(leaves: list[bytes], sizes: list[int]) -> dict[str, Any]:
    """The summary ``som ledger verify --json`` prints, computed from the records by hand."""
    recs = [json.loads(x) for x in leaves]
    per_schema: dict[str, int] = {}
    for r in recs:
        per_schema[r["schema"]] = per_schema.get(r["schema"], 0) + 1
    contracts: dict[str, dict[str, Any]] = {}
    for r in recs:
        if r["schema"] == "som.contract/v1":
            cur = r["contract"]["offer"]["terms"]["price"]["currency"]
            contracts[r["contract_id"]] = {
                "currency": cur,
                "charged_units": 0,
                "amount_minor": 0,
                "usage_records": 0,
                "released_records": 0,
                "events": 0,
            }
        elif r["schema"] == "som.usage/v1":
            t = contracts[r["contract_id"]]
            t["usage_records"] += 1
            if r["outcome"] == "charged":
                t["charged_units"] += r["units"]
                t["amount_minor"] += r["amount_minor"]
            else:
                t["released_records"] += 1
        elif r["schema"] == "som.contract-event/v1":
            contracts[r["contract_id"]]["events"] += 1
    n = len(leaves)
    root = b64(tree(leaves).root(n))
    return {
        "log": f"{ORIGIN}: {n} leaves, {len(sizes)} checkpoints verified; latest size {n} root {root}",
        "origin": ORIGIN,
        "leaves": n,
        "checkpoints": len(sizes),
        "latest_size": max(sizes),
        "latest_root": root,
        "trusted_size": None,
        "compliance": {
            "leaves": n,
            "per_schema": dict(sorted(per_schema.items())),
            "contracts": dict(sorted(contracts.items())),
        },
    }


def exports_section() -> dict[str, Any]:
    src = [EXPORT, COMPLIANCE, RFC9162, CHECKPOINT]
    good = _export_files(LEAVES, [3, 7])
    cases = [
        case(
            "the 7-leaf ledger exported with checkpoints 3 and 7",
            None,
            src,
            "verify_export",
            files=good,
            want_summary=_summary(LEAVES, [3, 7]),
        )
    ]
    lines = good["leaves.jsonl"].splitlines(keepends=True)

    def bad(desc: str, err: str, **kw: Any) -> None:
        files = dict(good)
        for k, v in kw.pop("files", {}).items():
            if v is None:
                del files[k]
            else:
                files[k] = v
        cases.append(case(desc, err, src, "verify_export", files=files, **kw))

    flipped = json.loads(lines[4])
    flipped["leaf"] = b64(flip(base64.b64decode(flipped["leaf"]), 30))
    bad(
        "leaf 4 bit flip",
        "LogVerificationError",
        want_message="[3, 7)",
        files={"leaves.jsonl": "".join([*lines[:4], json.dumps(flipped, separators=(",", ":")) + "\n", *lines[5:]])},
    )
    bad("last leaf missing (truncation)", "LogVerificationError", files={"leaves.jsonl": "".join(lines[:-1])})
    bad("trailing garbage line", "LogVerificationError", files={"leaves.jsonl": good["leaves.jsonl"] + "garbage\n"})
    bad(
        "leaves 1 and 2 swapped",
        "LogVerificationError",
        files={
            "leaves.jsonl": "".join(
                [
                    lines[0],
                    lines[2].replace('"index":2', '"index":1'),
                    lines[1].replace('"index":1', '"index":2'),
                    *lines[3:],
                ]
            )
        },
    )
    bad(
        "the log's fork: a second size-7 checkpoint with another root",
        "LogVerificationError",
        want_message="forked",
        files={"checkpoints/7b.note": note_for(_fork_leaves(4), 7)},
    )
    bad(
        "checkpoint 3 re-signed with the size-7 root (swapped roots)",
        "LogVerificationError",
        files={"checkpoints/3.note": sign_checkpoint(Checkpoint(ORIGIN, 3, tree(LEAVES).root(7)), LOG).decode()},
    )
    bad(
        "checkpoint 7 with trailing garbage",
        "LogVerificationError",
        want_message="checkpoints/7.note",
        files={"checkpoints/7.note": good["checkpoints/7.note"] + "garbage"},
    )
    bad(
        "checkpoint 3 signature bit flip",
        "LogVerificationError",
        want_message="checkpoints/3.note",
        files={"checkpoints/3.note": _flip_note_sig(good["checkpoints/3.note"])},
    )
    bad(
        "checkpoints signed by another key under the log's name",
        "LogVerificationError",
        files={"checkpoints/7.note": note_for(LEAVES, 7, IMPOSTOR_LOG)},
    )
    bad(
        "log.vkey of another key",
        "UntrustedLogKey",
        want_message="expected",
        files={"log.vkey": IMPOSTOR_LOG.verifier.vkey() + "\n"},
    )
    # The attack the pinned key stops: drop a charged leaf, re-sign the rest under a new key
    # (and even a new origin), ship that key as log.vkey. Self-consistent; not the trusted log.
    dropped = [*LEAVES[:4], *LEAVES[5:]]
    cases.append(
        case(
            "charged leaf 4 removed, re-signed under another key shipped as log.vkey",
            "UntrustedLogKey",
            src,
            "verify_export",
            want_message="fingerprint",
            files=_export_files(dropped, [3, 6], vkey=IMPOSTOR_LOG.verifier.vkey(), signer=IMPOSTOR_LOG),
        )
    )
    cases.append(
        case(
            "charged leaf 4 removed, re-signed under another key and another origin",
            "UntrustedLogKey",
            src,
            "verify_export",
            want_message=OTHER_ORIGIN,
            files=_export_files(dropped, [3, 6], vkey=OTHER_LOG.verifier.vkey(), signer=OTHER_LOG, origin=OTHER_ORIGIN),
        )
    )
    cases.append(
        case(
            "the verifier expects another origin than the log's",
            "UntrustedLogKey",
            src,
            "verify_export",
            origin=OTHER_ORIGIN,
            want_message=OTHER_ORIGIN,
            files=good,
        )
    )
    bad("no checkpoints", "LogVerificationError", files={"checkpoints/3.note": None, "checkpoints/7.note": None})

    # Compliance violations: the log verifies, a leaf breaks its contract.
    small = make_contract(offer_id="offer_vectors_3", quota=50)
    q_leaves = [
        canonicalize(r)
        for r in [
            contract_record(small, time=T0 - timedelta(hours=1)),
            usage(small, 1, 40, 10),
            usage(small, 2, 20, 20),
        ]
    ]
    cases.append(
        case(
            "quota violation: 40 + 20 units charged on a 50-unit quota",
            "ComplianceViolation",
            src,
            "verify_export",
            files=_export_files(q_leaves, [3]),
            want_index=2,
            want_message="quota",
        )
    )
    s_leaves = [*LEAVES, canonicalize(usage(CONTRACT, 4, 5, 150))]
    cases.append(
        case(
            "usage charged while the contract is suspended (after leaf 6)",
            "ComplianceViolation",
            src,
            "verify_export",
            files=_export_files(s_leaves, [3, 8]),
            want_index=7,
            want_message="suspended",
        )
    )
    cases.append(
        case(
            "the same ledger cut before the bad leaf verifies",
            None,
            src,
            "verify_export",
            files=_export_files(q_leaves[:2], [2]),
            want_summary=_summary(q_leaves[:2], [2]),
        )
    )
    return {
        "about": "Offline export directories (files: relative path -> exact text) as "
        "'som ledger export' writes them, and what 'som ledger verify --vkey TRUSTED_VKEY "
        "[--origin ORIGIN]' must conclude (trusted_vkey: the log key the verifier pinned; origin, "
        "where a case gives one, the origin it expects, else the key's name): the JSON "
        "summary (want_summary), or a log failure (LogVerificationError, exit 3; want_message is "
        "a substring of the message), or an export whose log key or origin is not the trusted "
        "one (UntrustedLogKey, exit 5), or a contract violation naming the leaf "
        "(ComplianceViolation, exit 4, want_index).",
        "trusted_vkey": LOG.verifier.vkey(),
        "cases": cases,
    }


# -- sealed payloads ------------------------------------------------------------------------------

# Generated once with --reseal (HPKE encapsulation is randomized); hex of the sealed blobs.
_SEALED: dict[str, str] = {
    "input": (
        "534f4d5345414c01019e75f8e412a9ad44b69efa466719ed10142f3b8db0e21a0751defdfd67707c137bd2a2"
        "7a01c3ca7919a0320e1a757ff3f0696ce77cdb931b48f4016bded5bbd2f39eb8806d24c8ab0173578d5700a3"
        "9b1246ed3c77f680f762e9a287addc9d2e112b854717238c841ea56f61d9f9207926cbab722901d8ec59bca0"
        "e381e66f82e9bd47621668b16031f755a4755542c9aeeed9936ccde4d51ab2ac692be93f3902f23c78935113"
        "0e3a8d4dc8bac06e960e15f12160aad46f76184826a64f33f77649d377be61b9a0846b11cc808a0f1d554ba4"
        "a212a9504f93e7cbead44c23fad09f9cb45a5ce315000e0f5275ee20236a37a20ec06bd57569f838d2ba0b26"
        "fc"
    ),
    "custom_input": (
        "534f4d5345414c01013eefd34f9ddd09f0d67885c57616e4ed27d95322409e4152b6d4f7f97585b84b4851f4"
        "870e5494a6246dfe255cb4b355e6c2c09e92c90e2689810660bba8be0ae224fa29eb18b19c3807dee7a566ca"
        "9b6b20d9b51e9c9090ddacc849a6feb6365622a53522ce677450f2bb72af2d9971e58ee5cf748bac9c728265"
        "a03744a70309d2a3a70085dc3d7c7e4dcb527cfc3fb454ebca2633980a32e867144914ef7c69ca82b699a601"
        "4cde665f3b7e60ebbecf10b38fb3fc3003c63dea94c86f3e07d115135019bbef761dc86cf0eac2ca1c554cb7"
        "493e54f2771d223cce401bb285a9ea7830e0154df5c2926c"
    ),
    "result": (
        "534f4d5345414c010181d2039476db12051d93b66c560487a8b1f434a24a937de3cc2d847e91d2b04a4339a2"
        "cdd57d8b30588aec6a4e5e3e017f478097eb23936902231db7a561034c5920da07beaa0ca149cca8679da3f0"
        "f9107a08160375ed18b687607a22f93acaf219b505341ad63255f84715fb65ee800a74037bf25c6104c232b3"
        "2124a1f927429dc69dd0ff0f291876ea17141f9ce2f275e2bc136b31dff40d0fe55db8c9342735c8f55b1797"
        "a7654140e3eb82ada6ebda69246bb28f3cfc2cfcb3c9dfe7653a50916b4a31f7141a93d58616da"
    ),
    "input_naming_other_job": (
        "534f4d5345414c0101d34a6816595968d2252c6e600ebf44d477a6ce739e827c4e37856501f592c6093432d0"
        "9c7e8abcd584beca97a81b2581f3e41f64403fee0a1f9b0029b28a3e0d0890c05ec45ff89d10f28027efdbdc"
        "567bfe6ec9eeb495854d49e988d0ab7086787330acfbab7457463be318c815504bbf3ea4148239c3bc4ce29e"
        "952d246e15a5bc3b1c07a1c3fb38002a24557b3a64c70ec5ec29b3cdedb6cb4b9dcf9f884e1e5c41e5370c5c"
        "cece2da512d501695065123a8b95f696f38968810aa62a5076e507c8ce96cd4409d86489c3388a"
    ),
    "result_framed_as_input": (
        "534f4d5345414c01012f775d0c79ced2bc8d34335871e1455138761ffdaa23d309448d084024d7d876525f17"
        "dc96d612d67a3e32de7fc10c56477b49c3ceb32dab8575cc6f5501e96286606ade562d31b1faf6a078a43a1f"
        "92b3dd8a38d733586641530dfcb243492bb931e2f294105f85f8ddb3dd9ba2f60e6fc942fe8276de53339a2e"
        "f35fae275fb9776a51cf3077257093aa64229c9a510418556e2cedc05da42c5242006ec31ac7048232528308"
        "649489d0eec64faba20d65791e273a88afc3fa43cbad6e0fe7b0424dc758f760a6da7b"
    ),
    "raw_with_aad": (
        "534f4d5345414c010160dd470b8d51009624c52f9aa304959ac78b62865f1d575d687da4d50fc59a391603c3"
        "913339c7c37041fefebf185a037595520ddccf514cf03e25ce120cf4e72bcafa4f57a0"
    ),
}


def _seal_fresh() -> dict[str, str]:
    """New sealed blobs for _SEALED (randomized). Uses the real payload framing."""
    from crypto.sealing import job_info, seal
    from marketplace.compute.payload import JobInput, JobResult, seal_input, seal_result

    inp = JobInput(
        job_id=JOB_ID,
        kind="predict",
        reply_public=REPLY.public_text(),
        data=b"sepal_length,sepal_width\n5.1,3.5\n6.2,2.9\n",
        format="csv",
        params={"threshold": 1},
    )
    custom = JobInput(
        job_id=CUSTOM_JOB_ID,
        kind="custom",
        reply_public=REPLY.public_text(),
        data=b"a,b\n1,2\n",
        format="csv",
        code="print('hello')\n",
    )
    res = JobResult(
        job_id=JOB_ID,
        kind="predict",
        body=b"label\nsetosa\nvirginica\n",
        format="csv",
        metrics={"rows": 2},
        stdout="ok\n",
        outputs=(),
    )
    wrong_job = JobInput(job_id="job_vectors_9999", kind="predict", reply_public=REPLY.public_text(), data=b"x\n1\n")
    # A header naming another job, sealed under JOB_ID's info: the framing check must refuse it.
    from marketplace.compute.payload import INPUT_MAGIC, _frame

    header = {
        "job_id": wrong_job.job_id,
        "kind": "predict",
        "reply_public": REPLY.public_text(),
        "format": "csv",
        "params": {},
    }
    return {
        "input": seal_input(COMPUTE.public_text(), inp).hex(),
        "custom_input": seal_input(COMPUTE.public_text(), custom).hex(),
        "result": seal_result(REPLY.public_text(), res).hex(),
        "input_naming_other_job": seal(
            COMPUTE.public_text(), _frame(INPUT_MAGIC, header, wrong_job.data), info=job_info(JOB_ID, "input")
        ).hex(),
        "result_framed_as_input": seal(
            REPLY.public_text(), _frame(INPUT_MAGIC, header, b""), info=job_info(JOB_ID, "result")
        ).hex(),
        "raw_with_aad": seal(
            COMPUTE.public_text(), b"som raw sealed payload", info=b"som/vectors/raw", aad=b"ledger leaf 7"
        ).hex(),
    }


def sealed_section() -> dict[str, Any]:
    from crypto.sealing import job_info, open_sealed

    blobs = {k: bytes.fromhex(v) for k, v in _SEALED.items()}
    src = [HPKE, SEALING]
    psrc = [HPKE, SEALING, PAYLOAD]
    cases: list[dict[str, Any]] = []

    def plain(name: str, key: SealKeyPair, info: bytes, aad: bytes = b"") -> bytes:
        try:
            return open_sealed(key, blobs[name], info=info, aad=aad)
        except DecryptionError as e:
            raise SystemExit(
                f"stored sealed blob {name!r} no longer opens (keys or sealing changed): "
                "run generate.py --reseal, paste the output over _SEALED, regenerate"
            ) from e

    inp_plain = plain("input", COMPUTE, job_info(JOB_ID, "input"))
    res_plain = plain("result", REPLY, job_info(JOB_ID, "result"))
    cus_plain = plain("custom_input", COMPUTE, job_info(CUSTOM_JOB_ID, "input"))
    raw_plain = plain("raw_with_aad", COMPUTE, b"som/vectors/raw", b"ledger leaf 7")

    def raw(desc: str, err: str | None, blob: bytes, key: str, info: bytes, aad: bytes = b"", **kw: Any) -> None:
        cases.append(
            case(
                desc,
                err,
                src,
                "open_sealed",
                recipient=key,
                info_hex=info.hex(),
                aad_hex=aad.hex(),
                blob_hex=blob.hex(),
                **kw,
            )
        )

    def job(desc: str, err: str | None, api: str, blob: bytes, key: str, job_id: str, **kw: Any) -> None:
        cases.append(case(desc, err, psrc, api, recipient=key, job_id=job_id, blob_hex=blob.hex(), **kw))

    info_in = job_info(JOB_ID, "input")
    info_res = job_info(JOB_ID, "result")
    raw(
        "job input: HPKE layer (info = job_info(job_id, 'input'))",
        None,
        blobs["input"],
        "compute",
        info_in,
        want_plaintext_hex=inp_plain.hex(),
    )
    raw(
        "job result: HPKE layer (info = job_info(job_id, 'result'))",
        None,
        blobs["result"],
        "reply",
        info_res,
        want_plaintext_hex=res_plain.hex(),
    )
    raw(
        "raw payload with aad",
        None,
        blobs["raw_with_aad"],
        "compute",
        b"som/vectors/raw",
        b"ledger leaf 7",
        want_plaintext_hex=raw_plain.hex(),
    )

    def hdr(data: bytes) -> dict[str, Any]:
        n = int.from_bytes(data[8:12], "big")
        out: dict[str, Any] = json.loads(data[12 : 12 + n])
        return out

    def body(data: bytes) -> bytes:
        return data[12 + int.from_bytes(data[8:12], "big") :]

    job(
        "job input opened and unframed (predict, csv)",
        None,
        "open_input",
        blobs["input"],
        "compute",
        JOB_ID,
        want_header=hdr(inp_plain),
        want_body_hex=body(inp_plain).hex(),
    )
    job(
        "custom job input carries its code",
        None,
        "open_input",
        blobs["custom_input"],
        "compute",
        CUSTOM_JOB_ID,
        want_header=hdr(cus_plain),
        want_code_digest=digest("print('hello')\n"),
    )
    job(
        "job result opened and unframed",
        None,
        "open_result",
        blobs["result"],
        "reply",
        JOB_ID,
        want_header=hdr(res_plain),
    )

    inp = blobs["input"]
    enc_end = 9 + 32
    raw("input: ciphertext bit flip", "DecryptionError", flip(inp, enc_end + 3), "compute", info_in)
    raw("input: tag bit flip", "DecryptionError", flip(inp, -1, 7), "compute", info_in)
    raw("input: encapsulated key bit flip", "DecryptionError", flip(inp, 12), "compute", info_in)
    raw("input: truncated by one byte", "DecryptionError", inp[:-1], "compute", info_in)
    raw("input: trailing garbage", "DecryptionError", inp + b"garbage", "compute", info_in)
    raw("input: truncated below the minimum length", "ValueError", inp[: 9 + 32 + 15], "compute", info_in)
    raw("input: magic bit flip", "ValueError", flip(inp, 0), "compute", info_in)
    raw("input: unsupported version", "ValueError", inp[:7] + b"\x02" + inp[8:], "compute", info_in)
    raw("input: opened as the result direction", "DecryptionError", inp, "compute", info_res)
    raw("input: opened for another job id", "DecryptionError", inp, "compute", job_info("job_vectors_0003", "input"))
    raw("input: opened with another key", "DecryptionError", inp, "other", info_in)
    raw("input: opened with the reply key", "DecryptionError", inp, "reply", info_in)
    res = blobs["result"]
    raw(
        "result: encapsulated keys swapped with the input's",
        "DecryptionError",
        res[:9] + inp[9:enc_end] + res[enc_end:],
        "reply",
        info_res,
    )
    raw("result: ciphertext bit flip", "DecryptionError", flip(res, enc_end), "reply", info_res)
    raw("raw: wrong aad", "DecryptionError", blobs["raw_with_aad"], "compute", b"som/vectors/raw", b"ledger leaf 8")
    raw("raw: aad dropped", "DecryptionError", blobs["raw_with_aad"], "compute", b"som/vectors/raw")
    raw(
        "raw: larger than max_size",
        "ValueError",
        blobs["raw_with_aad"],
        "compute",
        b"som/vectors/raw",
        b"ledger leaf 7",
        max_size=64,
    )
    job(
        "job input: header names another job (sealed under this job's info)",
        "ValueError",
        "open_input",
        blobs["input_naming_other_job"],
        "compute",
        JOB_ID,
    )
    job(
        "job result: input framing (SOMJOBI1) inside a result",
        "ValueError",
        "open_result",
        blobs["result_framed_as_input"],
        "reply",
        JOB_ID,
    )
    job("job input opened as a result", "DecryptionError", "open_result", inp, "compute", JOB_ID)
    job("job input opened for another job id", "DecryptionError", "open_input", inp, "compute", "job_vectors_0003")
    return {
        "about": "Open-vectors for sealed payloads. HPKE encapsulation is randomized, so these "
        "blobs were sealed once and are fixed: a verifier opens them with the private key "
        "(keys.x25519_<recipient>) and must refuse every tampered sibling. blob = 'SOMSEAL' || "
        "0x01 version || 0x01 suite || enc (32) || ct; hpke_info = 'som/seal/v1' || 0x00 || "
        "header || SHA-256(u32(len(info)) || info || aad); job_info(job_id, direction) = "
        "'som/job/v1' || 0x00 || u32(len(job_id)) || job_id || 0x00 || direction. open_input / "
        "open_result also unframe MAGIC (8) || u32(len(header)) || header JSON || body.",
        "cases": cases,
    }


def build() -> dict[str, Any]:
    return {
        "schema": "som.vectors/v1",
        "about": "Golden vectors for Share-of-Model's own formats; see docs/vectors.md. Every "
        "case has desc, want_error (null, or the error a verifier must raise), source and op.",
        "generator": "tests/vectors/generate.py",
        "keys": keys_section(),
        "canonical_records": canonical_section(),
        "contracts": contracts_section(),
        "event_chains": events_section(),
        "ledger": ledger_section(),
        "cosignatures": cosign_section(),
        "exports": exports_section(),
        "sealed": sealed_section(),
    }


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--check", action="store_true", help="compare with --out instead of writing")
    ap.add_argument("--reseal", action="store_true", help="print fresh _SEALED constants")
    a = ap.parse_args(argv)
    if a.reseal:
        print("_SEALED: dict[str, str] = {")
        for k, v in _seal_fresh().items():
            print(f'    "{k}": (')
            for i in range(0, len(v), 88):
                print(f'        "{v[i : i + 88]}"')
            print("    ),")
        print("}")
        return 0
    text = render(build())
    if a.check:
        same = a.out.exists() and a.out.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{a.out} is stale: run {Path(__file__).name}")
        return 0 if same else 1
    a.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
