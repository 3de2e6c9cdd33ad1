from __future__ import annotations

from datetime import timedelta

import pytest

from contracts.offer import Contract, accept_offer, make_offer
from contracts.terms import JobLimits, Terms
from tests.contracts.strategies import CONSUMER_KEY, PROVIDER_KEY, T0


def standard_terms(**overrides) -> Terms:
    fields = dict(
        modes=frozenset({"he_inference", "remote_job"}),
        quota_units=1000,
        rate_units=100,
        rate_window_seconds=60,
        valid_from=T0,
        valid_until=T0 + timedelta(days=30),
        unit_price_minor=5,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset({"predict", "evaluate"}), 600, 2048, 900),
    )
    fields.update(overrides)
    return Terms(**fields)


def standard_contract(terms: Terms | None = None, *, consumer_org: str = "bob-labs") -> Contract:
    offer = make_offer(
        offer_id="offer-1",
        offering_id="model-1",
        provider_org="acme",
        terms=standard_terms() if terms is None else terms,
        signing_key=PROVIDER_KEY,
        now=T0 - timedelta(days=1),
    )
    return accept_offer(offer, consumer_org=consumer_org, signing_key=CONSUMER_KEY, now=T0 - timedelta(hours=1))


@pytest.fixture
def terms() -> Terms:
    return standard_terms()


@pytest.fixture
def contract() -> Contract:
    return standard_contract()
