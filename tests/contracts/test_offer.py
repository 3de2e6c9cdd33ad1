from __future__ import annotations

import copy
import json
import re
from datetime import timedelta

import pytest
from hypothesis import given, settings

from contracts.errors import ChainError, SchemaError
from contracts.offer import (
    Contract,
    ContractEvent,
    EventKind,
    Offer,
    Status,
    accept_offer,
    advance,
    contract_status,
    draft_event,
    initial_state,
    make_offer,
    sign_event,
    verify_chain,
    verify_contract,
)
from crypto.errors import InvalidSignature
from tests.contracts.conftest import standard_contract, standard_terms
from tests.contracts.strategies import CONSUMER_KEY, OTHER_KEY, PROVIDER_KEY, T0, contracts

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SIG = re.compile(r"[A-Za-z0-9+/]{86}==")


def _paths(value, prefix=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    else:
        yield prefix, value


def _change(value):
    """A different value of the same shape (still parses, so only the signature can catch it)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value + 1
    if isinstance(value, list):
        return value[:-1] if len(value) > 1 else None
    if TIME.fullmatch(value):
        return value[:-2] + ("1" if value[-2] != "1" else "2") + "Z"
    if DIGEST.fullmatch(value):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    if value.startswith("ed25519:"):
        return OTHER_KEY.verify_key.to_text()
    if SIG.fullmatch(value):
        return value[:10] + ("A" if value[10] != "A" else "B") + value[11:]
    if re.fullmatch(r"[A-Z]{3}", value):
        return "USD" if value != "USD" else "EUR"
    if value.startswith("som.") or value in {e.value for e in EventKind} | {"provider", "consumer"}:
        return None  # enum-valued: a change fails the schema, tested elsewhere
    return value + "x"


def _set(d, path, value):
    d = copy.deepcopy(d)
    target = d
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = value
    return d


def test_contract_round_trip_and_verify(contract):
    d = json.loads(json.dumps(contract.to_dict()))
    again = Contract.from_dict(d)
    assert again == contract
    assert again.contract_id == contract.contract_id
    assert again.to_dict() == d
    verify_contract(again)
    verify_contract(d)
    verify_contract(
        contract,
        provider_key=PROVIDER_KEY.verify_key.to_text(),
        consumer_key=CONSUMER_KEY.verify_key.to_text(),
    )


@settings(max_examples=25, deadline=None)
@given(contracts())
def test_any_contract_round_trips_and_verifies(c):
    again = Contract.from_dict(json.loads(json.dumps(c.to_dict())))
    verify_contract(again)
    assert again.contract_id == c.contract_id
    assert again.digest() == c.digest()


def test_every_field_of_a_contract_is_signed(contract):
    d = contract.to_dict()
    skipped = []
    for path, value in _paths(d):
        new = _change(value)
        if new is None:
            skipped.append(path)
            continue
        tampered = _set(d, path, new)
        with pytest.raises(InvalidSignature):
            verify_contract(tampered)
    # Every leaf of offer, terms and acceptance but the schema names was changed and caught.
    assert all(p[-1] == "schema" for p in skipped)
    assert len(skipped) == 3


def test_pinned_keys_must_match(contract):
    with pytest.raises(InvalidSignature):
        verify_contract(contract, provider_key=OTHER_KEY.verify_key.to_text())
    with pytest.raises(InvalidSignature):
        verify_contract(contract, consumer_key=OTHER_KEY.verify_key.to_text())


def test_acceptance_binds_the_exact_offer(contract):
    other = make_offer(
        offer_id="offer-1",
        offering_id="model-1",
        provider_org="acme",
        terms=standard_terms(unit_price_minor=1),
        signing_key=PROVIDER_KEY,
        now=T0 - timedelta(days=1),
    )
    swapped = Contract(offer=other, acceptance=contract.acceptance)
    with pytest.raises(InvalidSignature):
        verify_contract(swapped)


def test_key_substitution_is_caught(contract):
    # Re-signing the offer with another key and claiming it is the provider's fails a pin, and
    # changes the offer digest the consumer signed.
    forged = make_offer(
        offer_id="offer-1",
        offering_id="model-1",
        provider_org="acme",
        terms=contract.terms,
        signing_key=OTHER_KEY,
        now=contract.offer.created,
    )
    with pytest.raises(InvalidSignature):
        verify_contract(Contract(offer=forged, acceptance=contract.acceptance))


def test_contract_id_is_deterministic_and_distinct():
    a = standard_contract()
    b = standard_contract()
    c = standard_contract(consumer_org="carol")
    assert a.contract_id == b.contract_id  # Ed25519 is deterministic, so is the id
    assert a.contract_id != c.contract_id
    assert re.fullmatch(r"ct_[0-9a-f]{32}", a.contract_id)


def test_accept_refuses_a_forged_offer_and_time_travel(contract):
    bad = Offer.from_dict(_set(contract.offer.to_dict(), ("offering_id",), "other"))
    with pytest.raises(InvalidSignature):
        accept_offer(bad, consumer_org="bob", signing_key=CONSUMER_KEY, now=T0)
    with pytest.raises(ValueError, match="creation"):
        accept_offer(contract.offer, consumer_org="bob", signing_key=CONSUMER_KEY, now=T0 - timedelta(days=2))


def test_malformed_contract_is_a_schema_error(contract):
    d = contract.to_dict()
    with pytest.raises(SchemaError, match="signature"):
        Contract.from_dict(_set(d, ("offer", "signature"), "not base64"))
    with pytest.raises(SchemaError, match="provider_key"):
        Contract.from_dict(_set(d, ("offer", "provider_key"), "rsa:abc"))
    with pytest.raises(SchemaError, match="offer_digest"):
        Contract.from_dict(_set(d, ("acceptance", "offer_digest"), "md5:00"))


# -- events -----------------------------------------------------------------------------------


def _event(contract, state, kind, *, by="provider", signers=("provider",), at=1, **kw):
    ev = draft_event(contract, state, kind, by=by, now=T0 + timedelta(hours=at), **kw)
    keys = {"provider": PROVIDER_KEY, "consumer": CONSUMER_KEY}
    for s in signers:
        ev = sign_event(ev, s, keys[s])
    return ev


def test_event_chain_lifecycle(contract):
    s0 = initial_state(contract)
    sus = _event(contract, s0, "suspension", at=1)
    s1 = advance(contract, s0, sus)
    res = _event(contract, s1, "resumption", at=2)
    s2 = advance(contract, s1, res)
    amend = _event(
        contract,
        s2,
        "amendment",
        by="consumer",
        signers=("consumer", "provider"),
        at=3,
        terms=standard_terms(quota_units=5000),
    )
    s3 = advance(contract, s2, amend)
    term = _event(contract, s3, "termination", by="consumer", signers=("consumer",), at=4)
    events = [sus, res, amend, term]
    final = verify_chain(contract, events)
    assert final.status is Status.TERMINATED and final.seq == 4

    def status(hours):
        return contract_status(contract, events, T0 + timedelta(hours=hours))

    assert status(0.5).status is Status.ACTIVE
    assert status(1.5).status is Status.SUSPENDED
    assert status(2.5).status is Status.ACTIVE and status(2.5).terms.quota_units == 1000
    assert status(3.5).terms.quota_units == 5000
    assert status(4.5).status is Status.TERMINATED
    # Round trip through JSON keeps signatures valid.
    again = [ContractEvent.from_dict(json.loads(json.dumps(e.to_dict()))) for e in events]
    assert again == events
    verify_chain(contract, again)


def test_time_based_status(contract):
    assert contract_status(contract, [], T0 - timedelta(seconds=1)).status is Status.NOT_YET_VALID
    assert contract_status(contract, [], T0 + timedelta(days=30)).status is Status.EXPIRED
    assert contract_status(contract, [], T0).status is Status.ACTIVE
    s0 = initial_state(contract)
    term = _event(contract, s0, "termination", at=1)
    # terminated wins over expired
    assert contract_status(contract, [term], T0 + timedelta(days=40)).status is Status.TERMINATED


@pytest.mark.parametrize(
    ("kind", "by", "signers", "match"),
    [
        ("suspension", "consumer", ("consumer",), "expected signatures"),
        ("suspension", "provider", (), "expected signatures"),
        ("termination", "consumer", ("provider",), "expected signatures"),
        ("amendment", "provider", ("provider",), "expected signatures"),
        ("resumption", "provider", ("provider",), "resumption expected a suspended"),
    ],
)
def test_entitlement_and_transitions(contract, kind, by, signers, match):
    kw = {"terms": standard_terms(quota_units=1)} if kind == "amendment" else {}
    ev = _event(contract, initial_state(contract), kind, by=by, signers=signers, **kw)
    with pytest.raises(ChainError, match=match):
        advance(contract, initial_state(contract), ev)


def test_wrong_key_for_party_is_an_invalid_signature(contract):
    ev = draft_event(contract, initial_state(contract), "suspension", by="provider", now=T0)
    ev = sign_event(ev, "provider", CONSUMER_KEY)  # consumer pretends to be the provider
    with pytest.raises(InvalidSignature):
        advance(contract, initial_state(contract), ev)


def test_every_field_of_an_event_is_signed(contract):
    s0 = initial_state(contract)
    ev = _event(
        contract,
        s0,
        "amendment",
        signers=("provider", "consumer"),
        reason="more",
        terms=standard_terms(quota_units=7),
    )
    d = ev.to_dict()
    checked = 0
    for path, value in _paths(d):
        if path[0] in ("contract_id", "seq", "prev_digest"):
            continue  # chain fields: caught as ChainError below
        new = _change(value)
        if new is None:
            continue
        with pytest.raises(InvalidSignature):
            advance(contract, s0, ContractEvent.from_dict(_set(d, path, new)))
        checked += 1
    assert checked >= 15
    for path in (("contract_id",), ("seq",), ("prev_digest",)):
        with pytest.raises(ChainError):
            advance(contract, s0, ContractEvent.from_dict(_set(d, path, _change(d[path[0]]))))


def test_chain_order_and_termination_is_final(contract):
    s0 = initial_state(contract)
    sus = _event(contract, s0, "suspension", at=1)
    s1 = advance(contract, s0, sus)
    res = _event(contract, s1, "resumption", at=2)
    with pytest.raises(ChainError, match="seq"):
        verify_chain(contract, [res, sus])
    term = _event(contract, s0, "termination", at=1)
    st = advance(contract, s0, term)
    after = _event(contract, st, "suspension", at=2)
    with pytest.raises(ChainError, match="terminated"):
        advance(contract, st, after)
    back = _event(contract, s1, "resumption", at=0)  # before the suspension
    with pytest.raises(ChainError, match="time"):
        advance(contract, s1, back)


def test_amendment_cannot_change_currency(contract):
    ev = _event(
        contract,
        initial_state(contract),
        "amendment",
        signers=("provider", "consumer"),
        terms=standard_terms(currency="USD"),
    )
    with pytest.raises(ChainError, match="currency"):
        advance(contract, initial_state(contract), ev)


def test_event_shape_errors(contract):
    with pytest.raises(ValueError, match="amendment"):
        draft_event(contract, initial_state(contract), "amendment", by="provider", now=T0)
    with pytest.raises(ValueError):
        draft_event(contract, initial_state(contract), "pause", by="provider", now=T0)
    d = _event(contract, initial_state(contract), "suspension").to_dict()
    with pytest.raises(SchemaError, match="kind"):
        ContractEvent.from_dict(_set(d, ("kind",), "pause"))
    with pytest.raises(SchemaError, match="unexpected"):
        ContractEvent.from_dict(_set(d, ("signatures",), {"operator": d["signatures"]["provider"]}))
