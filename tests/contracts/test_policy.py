from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts._validate import parse_time
from contracts.compliance import check_records
from contracts.errors import ComplianceViolation, UsageError
from contracts.offer import Status
from contracts.policy import (
    Allow,
    Deny,
    DenyReason,
    UsageState,
    UseRequest,
    commit,
    decide,
    release,
    reserve,
)
from contracts.records import contract_record, usage_record
from tests.contracts.conftest import standard_contract, standard_terms
from tests.contracts.strategies import DIGEST, T0, small_terms, use_requests

HE = UseRequest(mode="he_inference", units=10, batch_size=10, keyset_id="k1")
JOB = UseRequest(mode="remote_job", units=10, batch_size=10, job_kind="predict")
BOUND = UsageState(bound_keysets=frozenset({"k1"}))
NOW = T0 + timedelta(seconds=30)


@pytest.mark.parametrize(
    ("reason", "terms_kw", "usage_kw", "req", "now"),
    [
        (DenyReason.TERMINATED, {}, {"status": Status.TERMINATED}, HE, NOW),
        (DenyReason.SUSPENDED, {}, {"status": Status.SUSPENDED}, HE, NOW),
        (DenyReason.NOT_YET_VALID, {}, {}, HE, T0 - timedelta(microseconds=1)),
        (DenyReason.EXPIRED, {}, {}, HE, T0 + timedelta(days=30)),
        (DenyReason.MODE_NOT_ALLOWED, {"modes": {"remote_job"}}, {}, HE, NOW),
        (DenyReason.JOB_KIND_NOT_ALLOWED, {}, {}, replace(JOB, job_kind="custom"), NOW),
        (DenyReason.JOB_KIND_NOT_ALLOWED, {}, {}, replace(JOB, job_kind=None), NOW),
        (DenyReason.KEYSET_NOT_BOUND, {}, {}, replace(HE, keyset_id="k9"), NOW),
        (DenyReason.KEYSET_NOT_BOUND, {}, {}, replace(HE, keyset_id=None), NOW),
        (DenyReason.BATCH_TOO_LARGE, {"max_batch": 9}, {}, HE, NOW),
        (DenyReason.QUOTA_EXHAUSTED, {}, {"used_units": 995}, HE, NOW),
        (DenyReason.QUOTA_EXHAUSTED, {}, {"used_units": 900, "reserved_units": 95}, HE, NOW),
        (
            DenyReason.RATE_LIMITED,
            {},
            {"window_units": 95, "window_start": T0},
            HE,
            NOW,
        ),
        (DenyReason.RATE_LIMITED, {"rate_units": 5}, {}, HE, NOW),
    ],
)
def test_every_deny_reason(reason, terms_kw, usage_kw, req, now):
    terms = standard_terms(**terms_kw)
    usage = replace(BOUND, **usage_kw)
    d = decide(terms, usage, req, now)
    assert isinstance(d, Deny)
    assert d.reason is reason
    assert d.message
    # The same request without the obstacle is allowed: the reason is the real one.
    fixed = replace(req, job_kind="predict") if req.mode == "remote_job" else replace(req, keyset_id="k1")
    assert isinstance(decide(standard_terms(), BOUND, fixed, NOW), Allow)


def test_rate_limited_retry_after_points_at_the_next_window():
    terms = standard_terms()
    usage = replace(BOUND, window_units=95, window_start=T0)
    d = decide(terms, usage, HE, NOW)
    assert isinstance(d, Deny) and d.retry_after == 30
    assert isinstance(decide(terms, usage, HE, NOW + timedelta(seconds=d.retry_after)), Allow)
    assert isinstance(decide(terms, usage, HE, NOW + timedelta(seconds=d.retry_after - 1)), Deny)
    # a request that can never fit gets no retry_after
    d2 = decide(standard_terms(rate_units=5), BOUND, HE, NOW)
    assert isinstance(d2, Deny) and d2.retry_after is None and "split" in d2.message


def test_reservations_count_against_quota_and_rate():
    terms = standard_terms(quota_units=25, rate_units=1000)
    u, r1 = reserve(BOUND, 10, NOW, terms=terms)
    u, r2 = reserve(u, 10, NOW, terms=terms)
    assert decide(terms, u, HE, NOW).reason is DenyReason.QUOTA_EXHAUSTED
    u = release(u, r1)
    assert isinstance(decide(terms, u, HE, NOW), Allow)
    u = commit(u, r2)
    assert (u.used_units, u.reserved_units) == (10, 0)
    with pytest.raises(UsageError):
        commit(u, r2)  # nothing reserved any more


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        UseRequest(mode="training", units=1, batch_size=1)
    with pytest.raises(ValueError, match="units"):
        UseRequest(mode="he_inference", units=0, batch_size=1)
    with pytest.raises(ValueError, match="naive"):
        decide(standard_terms(), BOUND, HE, NOW.replace(tzinfo=None))
    with pytest.raises(TypeError):
        decide(standard_terms().to_dict(), BOUND, HE, NOW)
    with pytest.raises(ValueError, match="used_units"):
        UsageState(used_units=-1)


# -- properties -------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(
        use_requests(max_units=15),
        st.integers(0, 20_000),  # milliseconds since the previous op
        st.sampled_from(["commit", "release"]),
        st.integers(0, 3),  # steps until it completes (in flight meanwhile)
    ),
    min_size=5,
    max_size=40,
)


def _simulate(terms, operations):
    """Run requests through decide/reserve/commit/release; returns states and ledger leaves."""
    contract = standard_contract(terms)
    usage = UsageState(bound_keysets=frozenset({"k1", "k2"}))
    now = T0
    pending = []
    leaves = [contract_record(contract, time=T0 - timedelta(hours=1))]
    history = [usage]
    denied = []

    def finish(item):
        nonlocal usage
        res, req, outcome = item[1:]
        usage = commit(usage, res) if outcome == "commit" else release(usage, res)
        leaves.append(
            usage_record(
                contract,
                usage_id=f"u{len(leaves)}",
                mode=req.mode,
                units=req.units,
                outcome="charged" if outcome == "commit" else "released",
                request_digest=DIGEST,
                idempotency_key_digest=DIGEST,
                time=res.time,
            )
        )

    for step, (req, delay_ms, outcome, lag) in enumerate(operations):
        now += timedelta(milliseconds=delay_ms)
        for item in [p for p in pending if p[0] <= step]:
            pending.remove(item)
            finish(item)
        before = usage
        d = decide(terms, usage, req, now)
        assert decide(terms, usage, req, now) == d  # pure
        if isinstance(d, Deny):
            denied.append((req, now, usage, d))
            assert usage == before
        else:
            usage, res = reserve(usage, req.units, now, terms=terms)
            pending.append((step + lag, res, req, outcome))
        history.append(usage)
    for item in pending:
        finish(item)
    history.append(usage)
    return contract, history, leaves, denied


@settings(max_examples=60, deadline=None)
@given(small_terms(), ops)
def test_usage_invariants_and_offline_agreement(terms, operations):
    contract, history, leaves, _ = _simulate(terms, operations)
    for a, b in zip(history, history[1:], strict=False):
        assert b.used_units >= a.used_units  # monotone
        assert b.used_units + b.reserved_units <= terms.quota_units
        assert b.window_units <= terms.rate_units
    final = history[-1]
    assert final.reserved_units == 0
    charged = [leaf for leaf in leaves[1:] if leaf["outcome"] == "charged"]
    assert sum(leaf["units"] for leaf in charged) == final.used_units  # additive
    assert sum(leaf["amount_minor"] for leaf in charged) == final.used_units * terms.unit_price_minor
    # The offline checker, from the ledger alone, agrees the online decisions kept the terms.
    summary = check_records(enumerate(leaves))
    totals = summary.contracts[contract.contract_id]
    assert totals.charged_units == final.used_units
    assert totals.amount_minor == final.used_units * terms.unit_price_minor
    # Windows recomputed offline never hold more than the online policy allowed.
    per_window = {}
    for leaf in charged:
        i = terms.window_index(parse_time(leaf["time"], "t"))
        per_window[i] = per_window.get(i, 0) + leaf["units"]
    assert all(v <= terms.rate_units for v in per_window.values())


@settings(max_examples=60, deadline=None)
@given(small_terms(), ops)
def test_overriding_a_quota_or_rate_denial_is_caught_offline(terms, operations):
    contract, history, leaves, denied = _simulate(terms, operations)
    # With nothing in flight at the denial, the room it lacked was already used by charges
    # (quota) or charges in that very window (rate), so the ledger shows the breach.
    usable = [
        (req, now)
        for req, now, usage, d in denied
        if d.reason in (DenyReason.QUOTA_EXHAUSTED, DenyReason.RATE_LIMITED) and usage.reserved_units == 0
    ]
    if not usable:
        return
    req, now = usable[-1]
    forced = usage_record(
        contract,
        usage_id="forced",
        mode=req.mode,
        units=req.units,
        outcome="charged",
        request_digest=DIGEST,
        idempotency_key_digest=DIGEST,
        time=now,
    )
    with pytest.raises(ComplianceViolation, match="quota|rate") as e:
        check_records(enumerate([*leaves, forced]))
    assert e.value.index == len(leaves)


@settings(max_examples=100, deadline=None)
@given(small_terms(), use_requests(max_units=15), st.integers(0, 10**6), st.integers(0, 10**6))
def test_reserve_then_release_is_identity(terms, req, ms_a, ms_b):
    now = T0 + timedelta(milliseconds=ms_a)
    start, _ = reserve(BOUND, 1, now - timedelta(milliseconds=ms_b), terms=terms)
    u, res = reserve(start, req.units, now, terms=terms)
    back = release(u, res)
    if start.window_start == res.window_start:
        assert back == start
    # In every case it is observationally the same for any next decision.
    for other in (HE, JOB, req):
        assert decide(terms, back, other, now) == decide(terms, start, other, now)


@settings(max_examples=100, deadline=None)
@given(small_terms(), st.integers(1, 50), st.integers(1, 50), st.integers(0, 10**6))
def test_reservations_are_additive(terms, a, b, ms):
    now = T0 + timedelta(milliseconds=ms)
    u1, r1 = reserve(BOUND, a, now, terms=terms)
    u2, r2 = reserve(u1, b, now, terms=terms)
    joint, rj = reserve(BOUND, a + b, now, terms=terms)
    assert u2 == joint
    assert commit(commit(u2, r1), r2) == commit(joint, rj)
