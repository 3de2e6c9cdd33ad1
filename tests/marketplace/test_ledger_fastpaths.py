"""The ledger's fast paths give the answers of the slow ones: the canonical bytes of a usage leaf
on append vs crypto.canonical, the one-expression usage-leaf check vs the field-by-field
validators, the exact-format export line reader vs the generic JSON one, and the one-pass
compliance walk's handling of bad leaves."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import records
from contracts.compliance import ComplianceWalk, check_leaves
from contracts.errors import ComplianceViolation, SchemaError
from crypto.canonical import canonicalize
from crypto.logverify import LogVerificationError, read_export_leaves
from marketplace.services import ledger
from tests.marketplace.test_ledger_support import contract_leaf, make_contract, usage

CONTRACT = make_contract(consumer_org="org_c", provider_org="org_p")
GOOD = usage(CONTRACT, 1)
FIELDS = sorted(GOOD)


def slow_ok(d: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> bool:
    """The field-by-field validators alone (the fast check switched off)."""
    with monkeypatch.context() as m:
        m.setattr(records, "_usage_ok", lambda _d: False)
        try:
            records._validate_usage(d)
        except SchemaError as e:
            return str(e) == f"{records.USAGE_SCHEMA}: invalid record"  # every field passed
    raise AssertionError("unreachable: the slow path always raises when the fast check fails")


TRICKY = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2**53 - 1,
    2**53,
    3.0,
    "",
    "x",
    "x" * 256,
    "x" * 257,
    "a\nb",
    "\u00e9t\u00e9",
    "\ud800",
    "\x00",
    "EUR",
    "eur",
    "EURO",
    "he_inference",
    "remote_job",
    "training",
    "charged",
    "released",
    "refunded",
    GOOD["time"],
    "2026-13-01T00:00:00.000000Z",
    "2026-01-01T00:00:00Z",
    GOOD["request_digest"],
    "sha256:" + "A" * 64,
    "sha1:00",
    [],
    ["x"],
    {},
    {"a": 1},
]
values = st.one_of(
    st.sampled_from(TRICKY),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.floats(allow_nan=False),
    st.text(max_size=300),
    st.lists(st.integers(), max_size=2),
)


def test_fast_usage_check_agrees_with_the_field_validators_on_every_tricky_value(monkeypatch):
    for field in FIELDS:
        for value in TRICKY:
            d = {**GOOD, field: value}
            assert records._usage_ok(d) == slow_ok(d, monkeypatch), (field, value)
    for field in FIELDS:
        d = dict(GOOD)
        del d[field]
        assert not records._usage_ok(d) and not slow_ok(d, monkeypatch)
    assert not records._usage_ok({**GOOD, "payload": "x"}) and not slow_ok({**GOOD, "payload": "x"}, monkeypatch)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=3))
def test_fast_usage_check_agrees_with_the_field_validators(changes):
    d = {**GOOD, **changes}
    with pytest.MonkeyPatch.context() as mp:
        assert records._usage_ok(d) == slow_ok(d, mp)


def test_the_fast_check_accepts_a_good_leaf(monkeypatch):
    assert records._usage_ok(GOOD) and slow_ok(GOOD, monkeypatch)


printable = st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs")) | st.just(" ")
ids = st.text(printable, min_size=1, max_size=40).filter(str.isprintable) | st.just("\U0001f600" * 256)
digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
ints = st.integers(min_value=0, max_value=2**53 - 1)
usage_leaves = st.fixed_dictionaries(
    {
        "schema": st.just("som.usage/v1"),
        "usage_id": ids,
        "contract_id": ids,
        "offering_id": ids,
        "consumer_org": ids,
        "provider_org": ids,
        "mode": st.sampled_from(["he_inference", "remote_job"]),
        "units": ints.filter(bool),
        "unit_price_minor": ints,
        "amount_minor": ints,
        "currency": st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3),
        "outcome": st.sampled_from(["charged", "released"]),
        "request_digest": digests,
        "idempotency_key_digest": digests,
        "time": st.sampled_from(
            [GOOD["time"], "2026-12-31T23:59:59.999999Z", "\u0661\u0662\u0663\u0664-01-01T00:00:00.000000Z"]
        ),
    }
)


@settings(max_examples=300, deadline=None)
@given(rec=usage_leaves)
def test_append_canonicalizes_usage_leaves_exactly_as_crypto_canonical(rec):
    records.validate_record(rec)
    leaf_hash, row = ledger.tree._prepare(rec)
    assert row[2] == canonicalize(rec)
    assert leaf_hash == row[0] and row[1] == int.from_bytes(leaf_hash[:8], "big", signed=True)


def test_append_canonicalizes_every_schema_as_crypto_canonical():
    for rec in (GOOD, contract_leaf(CONTRACT), {**GOOD, "usage_id": '\u00e9t\u00e9 \u2603 "q" \\'}):
        assert ledger.tree._prepare(rec)[1][2] == canonicalize(rec)


def write_lines(tmp_path: Path, lines: list[bytes]) -> Path:
    p = tmp_path / "leaves.jsonl"
    p.write_bytes(b"".join(lines))
    return p


def test_export_reader_fast_and_generic_lines_agree(tmp_path):
    leaves = [canonicalize(contract_leaf(CONTRACT)), *(canonicalize(usage(CONTRACT, i)) for i in range(4))]
    b64 = [base64.b64encode(x) for x in leaves]
    exact = [b'{"index":%d,"leaf":"%s"}\n' % (i, b) for i, b in enumerate(b64)]
    generic = [
        json.dumps({"leaf": b.decode(), "index": i}, indent=1).replace("\n", " ").encode() + b"\r\n"
        for i, b in enumerate(b64)
    ]
    mixed = [exact[0], generic[1], b"\n", exact[2], generic[3], exact[4].rstrip(b"\n")]  # no final newline
    want = list(enumerate(leaves))
    for lines in (exact, generic, mixed):
        assert list(read_export_leaves(write_lines(tmp_path, lines))) == want


@pytest.mark.parametrize(
    "line",
    [
        b'{"index":0,"leaf":"e30*"}\n',  # not base64
        b'{"index":0,"leaf":"e30=e30="}\n',  # data after padding
        b'{"index":0,"leaf":"e3"}\n',  # truncated
        b'{"index":0,"leaf":"e30="}garbage\n',
        b'{"index":"0","leaf":"e30="}\n',
    ],
)
def test_export_reader_refuses_bad_lines_naming_them(tmp_path, line):
    p = write_lines(tmp_path, [b'{"index":0,"leaf":"e30="}\n', line])
    with pytest.raises(LogVerificationError, match="leaves.jsonl line 2: not a leaf"):
        list(read_export_leaves(p))


def test_walk_names_the_leaf_that_does_not_parse_or_has_no_valid_date():
    head = canonicalize(contract_leaf(CONTRACT))
    good = canonicalize(GOOD)
    bad_date = canonicalize({**GOOD, "usage_id": "u2", "time": "2026-02-30T00:00:00.000000Z"})
    dup = b'{"schema":"som.audit/v1","schema":"som.audit/v1"}'
    assert check_leaves([(0, head), (1, good)]).leaves == 2
    for bad, match in ((bad_date, "time: not a valid date"), (dup, "duplicate key"), (b"{", "expected JSON")):
        with pytest.raises(ComplianceViolation, match=match) as e:
            check_leaves([(0, head), (1, good), (2, bad)])
        assert e.value.index == 2
    walk = ComplianceWalk()
    walk.add_leaf(0, head)
    walk.add_record(1, json.loads(good))
    with pytest.raises(ComplianceViolation, match="appears twice"):
        walk.add_leaf(2, good)
