from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from contracts.compliance import check_records
from contracts.errors import ComplianceViolation
from contracts.offer import advance, draft_event, initial_state, sign_event
from contracts.records import (
    audit_record,
    contract_event_record,
    contract_record,
    job_approval_record,
    usage_record,
)
from tests.contracts.conftest import standard_contract, standard_terms
from tests.contracts.strategies import CONSUMER_KEY, DIGEST, OTHER_KEY, PROVIDER_KEY, T0

KEYS = {"provider": PROVIDER_KEY, "consumer": CONSUMER_KEY}


def _use(contract, uid, seconds, *, units=10, mode="he_inference", outcome="charged", terms=None):
    return usage_record(
        contract,
        usage_id=uid,
        mode=mode,
        units=units,
        outcome=outcome,
        request_digest=DIGEST,
        idempotency_key_digest=DIGEST,
        time=T0 + timedelta(seconds=seconds),
        terms=terms,
    )


def _event(contract, state, kind, hours, *, by="provider", signers=("provider",), **kw):
    ev = draft_event(contract, state, kind, by=by, now=T0 + timedelta(hours=hours), **kw)
    for s in signers:
        ev = sign_event(ev, s, KEYS[s])
    return ev, advance(contract, state, ev)


def _history(contract):
    """A clean history: uses, a suspension and resumption, an amendment, a termination."""
    s0 = initial_state(contract)
    sus, s1 = _event(contract, s0, "suspension", 1)
    res, s2 = _event(contract, s1, "resumption", 2)
    new_terms = standard_terms(unit_price_minor=7, quota_units=2000)
    amend, s3 = _event(contract, s2, "amendment", 3, signers=("provider", "consumer"), terms=new_terms)
    term, _ = _event(contract, s3, "termination", 4, by="consumer", signers=("consumer",))
    at = lambda h: T0 + timedelta(hours=h)  # noqa: E731
    leaves = [
        audit_record(
            event_id="a1",
            actor="ops",
            org=None,
            action="start",
            target=None,
            outcome="success",
            request_id=None,
            time=T0,
        ),
        contract_record(contract, time=at(-1)),
        _use(contract, "u1", 10),
        _use(contract, "u2", 20, mode="remote_job", outcome="released"),
        _use(contract, "u3", 30, units=90),  # 100 in the first 60 s window: exactly the rate
        contract_event_record(sus, time=at(1)),
        contract_event_record(res, time=at(2)),
        _use(contract, "u4", 2 * 3600 + 5),
        job_approval_record(
            job_id="j1",
            contract_id=contract.contract_id,
            code_digest=DIGEST,
            decision="approved",
            actor="acme-admin",
            time=at(2.5),
        ),
        contract_event_record(amend, time=at(3)),
        _use(contract, "u5", 3 * 3600 + 5, units=50, terms=new_terms),
        contract_event_record(term, time=at(4)),
    ]
    return leaves, {"amend": amend, "new_terms": new_terms, "sus": sus}


def test_clean_history_passes_with_totals(contract):
    leaves, _ = _history(contract)
    summary = check_records(enumerate(leaves))
    t = summary.contracts[contract.contract_id]
    assert t.charged_units == 10 + 90 + 10 + 50
    assert t.amount_minor == (10 + 90 + 10) * 5 + 50 * 7
    assert (t.usage_records, t.released_records, t.events, t.currency) == (5, 1, 4, "EUR")
    assert summary.leaves == len(leaves)
    assert summary.per_schema == {
        "som.audit/v1": 1,
        "som.contract/v1": 1,
        "som.usage/v1": 5,
        "som.contract-event/v1": 4,
        "som.job-approval/v1": 1,
    }
    assert (
        json.loads(json.dumps(summary.to_dict()))["contracts"][contract.contract_id]["amount_minor"] == t.amount_minor
    )


def _violates(leaves, index, match):
    with pytest.raises(ComplianceViolation, match=match) as e:
        check_records(enumerate(leaves))
    assert e.value.index == index
    return e.value


def _replace(leaves, i, leaf):
    return [*leaves[:i], leaf, *leaves[i + 1 :]]


def test_beyond_quota():
    c = standard_contract(standard_terms(quota_units=25, rate_units=1000))
    leaves = [contract_record(c, time=T0), _use(c, "a", 1), _use(c, "b", 2), _use(c, "c", 3)]
    _violates(leaves, 3, "quota")
    # released usage does not count against the quota
    leaves[2] = _use(c, "b", 2, outcome="released")
    check_records(enumerate(leaves))


def test_rate_per_window():
    c = standard_contract(standard_terms(rate_units=20, rate_window_seconds=60))
    leaves = [contract_record(c, time=T0), _use(c, "a", 59), _use(c, "b", 60), _use(c, "c", 119)]
    check_records(enumerate(leaves))  # 10 in window 0, 20 in window 1
    _violates([*leaves, _use(c, "d", 100)], 4, "rate")


@pytest.mark.parametrize(("seconds", "match"), [(-1, "outside validity"), (30 * 86_400, "outside validity")])
def test_outside_validity(contract, seconds, match):
    leaves = [contract_record(contract, time=T0), _use(contract, "u", seconds)]
    _violates(leaves, 1, match)


def test_before_acceptance():
    c = standard_contract(standard_terms(valid_from=T0 - timedelta(days=5)))
    leaves = [contract_record(c, time=T0), _use(c, "u", -3 * 3600)]
    _violates(leaves, 1, "before the contract was accepted")


def test_wrong_price_currency_amount(contract):
    leaves, _ = _history(contract)
    good = leaves[2]
    _violates(_replace(leaves, 2, {**good, "unit_price_minor": 4, "amount_minor": 40}), 2, "price")
    _violates(_replace(leaves, 2, {**good, "currency": "USD"}), 2, "price")
    _violates(_replace(leaves, 2, {**good, "amount_minor": 49}), 2, "amount_minor")
    _violates(_replace(leaves, 3, {**leaves[3], "amount_minor": 1}), 3, "released")


def test_old_price_after_amendment(contract):
    leaves, _ = _history(contract)
    # u5 charged at the pre-amendment price
    _violates(_replace(leaves, 10, _use(contract, "u5", 3 * 3600 + 5, units=50)), 10, "price")


def test_unknown_contract(contract):
    leaves, _ = _history(contract)
    other = standard_contract(consumer_org="mallory")
    _violates([*leaves[:3], _use(other, "x", 40)], 3, "unknown contract")
    _violates([leaves[0], leaves[2]], 1, "unknown contract")
    _violates(
        [
            job_approval_record(
                job_id="j",
                contract_id="ct_nope",
                code_digest=DIGEST,
                decision="approved",
                actor="a",
                time=T0,
            )
        ],
        0,
        "unknown contract",
    )


def test_after_termination_and_while_suspended(contract):
    leaves, _ = _history(contract)
    _violates(
        [*leaves, _use(contract, "late", 5 * 3600, terms=standard_terms(unit_price_minor=7))],
        len(leaves),
        "terminated",
    )
    suspended = [*leaves[:6], _use(contract, "s", 3600 + 60)]
    _violates(suspended, 6, "suspended")
    # a use reserved before the suspension but appended after it is fine
    check_records(enumerate([*leaves[:6], _use(contract, "early", 3000)]))


def test_forged_contract_signature(contract):
    leaves, _ = _history(contract)
    forged = json.loads(json.dumps(leaves[1]))
    forged["contract"]["offer"]["terms"]["quota_units"] = 10**9
    _violates(_replace(leaves, 1, forged), 1, "signatures")
    # a contract honestly re-signed by an outsider key is a different contract (and id)
    mismatched = json.loads(json.dumps(leaves[1]))
    mismatched["contract_id"] = "ct_" + "0" * 32
    _violates(_replace(leaves, 1, mismatched), 1, "contract_id")


def test_forged_or_misordered_events(contract):
    leaves, parts = _history(contract)
    ev = json.loads(json.dumps(leaves[9]))
    ev["event"]["terms"]["quota_units"] = 10**9  # consumer "amends" quota on its own
    _violates(_replace(leaves, 9, ev), 9, "signatures")
    # dropping the resumption (and the use it allowed) breaks the chain at the amendment
    _violates([*leaves[:6], *leaves[8:]], 7, "seq")
    # an event signed by the wrong party
    bad = sign_event(
        draft_event(
            contract,
            initial_state(contract),
            "suspension",
            by="provider",
            now=T0 + timedelta(hours=1),
        ),
        "provider",
        OTHER_KEY,
    )
    _violates([*leaves[:5], contract_event_record(bad, time=T0)], 5, "signatures")


def test_duplicates_and_mismatches(contract):
    leaves, _ = _history(contract)
    _violates([*leaves[:3], leaves[2]], 3, "usage_id u1 appears twice")
    _violates([*leaves[:3], leaves[1]], 3, "appears twice")
    _violates(_replace(leaves, 2, {**leaves[2], "consumer_org": "mallory"}), 2, "orgs")


def test_mode_not_allowed():
    c = standard_contract(standard_terms(modes={"he_inference"}))
    _violates([contract_record(c, time=T0), _use(c, "u", 5, mode="remote_job")], 1, "mode")


def test_schema_errors_are_violations(contract):
    leaves, _ = _history(contract)
    _violates(_replace(leaves, 2, {**leaves[2], "units": "10"}), 2, "units")
    _violates(_replace(leaves, 0, {"schema": "som.unknown/v1"}), 0, "schema")


def _bulk(n):
    c = standard_contract(standard_terms(quota_units=10**9, rate_units=10**6))
    base = _use(c, "u", 0, units=1)
    leaves = [contract_record(c, time=T0)]
    for i in range(n):
        t = T0 + timedelta(milliseconds=i + 1)
        leaves.append({**base, "usage_id": f"u{i}", "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")})
    return c, leaves


def test_streaming_speed():
    c, leaves = _bulk(50_000)
    start = time.perf_counter()
    summary = check_records(enumerate(leaves))
    elapsed = time.perf_counter() - start
    assert summary.contracts[c.contract_id].charged_units == 50_000
    assert elapsed < 5, f"50k leaves took {elapsed:.2f} s"  # ~0.2 s here; generous for CI


def test_takes_a_generator_lazily(contract):
    leaves, _ = _history(contract)
    seen = []

    def gen():
        for i, leaf in enumerate([*leaves[:3], {"schema": "bad"}, *leaves[3:]]):
            seen.append(i)
            yield i, leaf

    with pytest.raises(ComplianceViolation):
        check_records(gen())
    assert seen == [0, 1, 2, 3]  # stopped at the first bad leaf


def test_library_is_pure():
    code = (
        "import sys, contracts.terms, contracts.offer, contracts.policy, contracts.metering, "
        "contracts.records, contracts.compliance\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in {'marketplace', 'fastapi', "
        "'sqlalchemy', 'httpx', 'typer', 'celery', 'redis', 'requests', 'socket'}]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # noqa: S603
    assert out.stdout.strip() == ""


@pytest.mark.slow
def test_a_million_leaves_streamed():
    c = standard_contract(standard_terms(quota_units=10**9, rate_units=10**6))
    base = _use(c, "u", 0, units=1)
    head = contract_record(c, time=T0)

    def leaves():
        yield 0, head
        for i in range(1_000_000):
            t = T0 + timedelta(microseconds=10 * i + 1)
            yield i + 1, {**base, "usage_id": f"u{i}", "time": t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}

    start = time.perf_counter()
    summary = check_records(leaves())
    elapsed = time.perf_counter() - start
    assert summary.contracts[c.contract_id].amount_minor == 1_000_000 * 5
    assert elapsed < 60, f"1M leaves took {elapsed:.1f} s"  # ~3.5 s checking + generation here
