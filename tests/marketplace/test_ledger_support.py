"""Helpers for the ledger tests (no tests here): signed contracts and usage leaves on a real DB."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.offer import Contract, accept_offer, make_offer
from contracts.records import contract_record, usage_record
from contracts.terms import JobLimits, Terms
from crypto.signing import SigningKey

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PROVIDER_KEY = SigningKey.from_private_bytes(bytes(range(32)))
CONSUMER_KEY = SigningKey.from_private_bytes(bytes(range(32, 64)))


def make_contract(
    *,
    consumer_org: str,
    provider_org: str,
    offering_id: str = "off_ledger",
    offer_id: str = "offer-1",
    quota: int = 10_000,
) -> Contract:
    terms = Terms(
        modes=frozenset({"he_inference", "remote_job"}),
        quota_units=quota,
        rate_units=quota,
        rate_window_seconds=60,
        valid_from=T0,
        valid_until=T0 + timedelta(days=30),
        unit_price_minor=5,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset({"predict", "evaluate"}), 600, 2048, 900),
    )
    offer = make_offer(
        offer_id=offer_id,
        offering_id=offering_id,
        provider_org=provider_org,
        terms=terms,
        signing_key=PROVIDER_KEY,
        now=T0 - timedelta(days=1),
    )
    return accept_offer(offer, consumer_org=consumer_org, signing_key=CONSUMER_KEY, now=T0 - timedelta(hours=1))


def usage(
    contract: Contract, i: int, *, units: int = 2, outcome: str = "charged", mode: str = "he_inference"
) -> dict[str, Any]:
    d = lambda s: "sha256:" + hashlib.sha256(s.encode()).hexdigest()  # noqa: E731
    return usage_record(
        contract,
        usage_id=f"use_{contract.contract_id[-8:]}_{i}",
        mode=mode,
        units=units,
        outcome=outcome,
        request_digest=d(f"req{i}"),
        idempotency_key_digest=d(f"idem{i}"),
        time=T0 + timedelta(seconds=10 * i),
    )


def contract_leaf(contract: Contract) -> dict[str, Any]:
    return contract_record(contract, time=T0 - timedelta(hours=1))
