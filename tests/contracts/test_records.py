from __future__ import annotations

import contextlib
import json
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.errors import SchemaError
from contracts.offer import ContractEvent, draft_event, initial_state, sign_event
from contracts.records import (
    SCHEMAS,
    audit_record,
    contract_event_record,
    contract_record,
    fl_contribution_record,
    job_approval_record,
    parse_record,
    usage_record,
    validate_record,
)
from crypto.canonical import canonicalize
from tests.contracts.strategies import DIGEST, PROVIDER_KEY, T0


def _leaves(contract):
    ev = sign_event(
        draft_event(contract, initial_state(contract), "suspension", by="provider", now=T0),
        "provider",
        PROVIDER_KEY,
    )
    return {
        "som.usage/v1": usage_record(
            contract,
            usage_id="u1",
            mode="he_inference",
            units=3,
            outcome="charged",
            request_digest=DIGEST,
            idempotency_key_digest=DIGEST,
            time=T0,
        ),
        "som.contract/v1": contract_record(contract, time=T0),
        "som.contract-event/v1": contract_event_record(ev, time=T0),
        "som.audit/v1": audit_record(
            event_id="e1",
            actor="alice",
            org=None,
            action="offering.create",
            target="model-1",
            outcome="success",
            request_id="r1",
            time=T0,
        ),
        "som.job-approval/v1": job_approval_record(
            job_id="j1",
            contract_id=contract.contract_id,
            code_digest=DIGEST,
            decision="approved",
            actor="alice",
            time=T0,
        ),
        "som.fl-contribution/v1": fl_contribution_record(
            federation_id="fed_1",
            round=1,
            org="org_1",
            samples=120,
            update_digest=DIGEST,
            epsilon="1.25",
            delta="0.00001",
            time=T0,
        ),
    }


def test_every_schema_round_trips_through_canonical_bytes(contract):
    leaves = _leaves(contract)
    assert set(leaves) == set(SCHEMAS)
    for leaf in leaves.values():
        assert parse_record(canonicalize(leaf)) == leaf
    ev = ContractEvent.from_dict(leaves["som.contract-event/v1"]["event"])
    assert ev.contract_id == contract.contract_id


def test_usage_amount_follows_outcome(contract):
    charged = _leaves(contract)["som.usage/v1"]
    assert charged["amount_minor"] == 3 * contract.terms.unit_price_minor
    released = usage_record(
        contract,
        usage_id="u2",
        mode="remote_job",
        units=3,
        outcome="released",
        request_digest=DIGEST,
        idempotency_key_digest=DIGEST,
        time=T0,
    )
    assert released["amount_minor"] == 0
    assert released["time"] == "2026-01-01T00:00:00.000000Z"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("units", 0, "integer in [1"),
        ("units", "3", "integer"),
        ("units", 3.0, "integer"),
        ("amount_minor", -1, "integer"),
        ("mode", "training", "one of"),
        ("outcome", "refunded", "one of"),
        ("currency", "Eur", "[A-Z]{3}"),
        ("request_digest", "sha1:00", "sha256"),
        ("idempotency_key_digest", "sha256:" + "G" * 64, "sha256"),
        ("time", "2026-01-01T00:00:00Z", "T\\d\\d"),
        ("time", "2026-01-01T00:00:00.000000+00:00", "T\\d\\d"),
        ("usage_id", "", "non-empty"),
        ("usage_id", "a\nb", "printable"),
        ("contract_id", None, "string"),
    ],
)
def test_usage_field_errors_are_precise(contract, field, value, expected):
    leaf = dict(_leaves(contract)["som.usage/v1"])
    leaf[field] = value
    with pytest.raises(SchemaError) as e:
        validate_record(leaf)
    assert field in str(e.value) and expected in str(e.value) and "got" in str(e.value)


def test_structural_errors(contract):
    leaves = _leaves(contract)
    with pytest.raises(SchemaError, match="schema.*expected one of"):
        validate_record({**leaves["som.audit/v1"], "schema": "som.audit/v2"})
    missing = dict(leaves["som.usage/v1"])
    del missing["request_digest"]
    with pytest.raises(SchemaError, match="missing.*request_digest"):
        validate_record(missing)
    with pytest.raises(SchemaError, match="unexpected.*payload"):
        validate_record({**leaves["som.usage/v1"], "payload": "x"})
    with pytest.raises(SchemaError, match="outcome"):
        validate_record({**leaves["som.audit/v1"], "outcome": "maybe"})
    with pytest.raises(SchemaError, match="decision"):
        validate_record({**leaves["som.job-approval/v1"], "decision": "perhaps"})
    bad_contract = json.loads(json.dumps(leaves["som.contract/v1"]))
    bad_contract["contract"]["offer"]["terms"]["quota_units"] = -5
    with pytest.raises(SchemaError, match="quota_units"):
        validate_record(bad_contract)
    with pytest.raises(SchemaError, match="JSON object"):
        validate_record([1, 2])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"schema": "som.audit/v1", "schema": "som.audit/v1"}', "duplicate key"),
        (b'{"units": NaN}', "not JSON"),
        (b'{"units": Infinity}', "not JSON"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"schema": ', "expected JSON"),
        (b'"just a string"', "JSON object"),
    ],
)
def test_parse_record_refuses_bad_bytes(data, match):
    with pytest.raises(SchemaError, match=match):
        parse_record(data)


def test_parse_record_needs_bytes():
    with pytest.raises(TypeError):
        parse_record("{}")


@given(st.binary(max_size=200))
def test_parse_record_never_crashes_on_garbage(data):
    with contextlib.suppress(SchemaError):
        parse_record(data)


def test_builders_refuse_bad_values(contract):
    with pytest.raises(SchemaError):
        usage_record(
            contract,
            usage_id="u",
            mode="he_inference",
            units=0,
            outcome="charged",
            request_digest=DIGEST,
            idempotency_key_digest=DIGEST,
            time=T0,
        )
    with pytest.raises(ValueError, match="naive"):
        contract_record(contract, time=(T0 + timedelta(1)).replace(tzinfo=None))
