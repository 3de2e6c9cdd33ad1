"""Helpers shared by the contract and metering tests (no tests here)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from contracts.records import parse_record
from contracts.terms import JobLimits, Terms
from crypto.signing import SigningKey
from marketplace.db.base import utcnow
from marketplace.services.identity import Principal


def make_terms(
    *,
    quota: int = 100,
    rate: int = 1000,
    window: int = 60,
    price: int = 5,
    modes: tuple[str, ...] = ("he_inference", "remote_job"),
    max_batch: int = 64,
    valid_from: Any = None,
    valid_until: Any = None,
) -> Terms:
    now = utcnow()
    return Terms(
        modes=frozenset(modes),
        quota_units=quota,
        rate_units=rate,
        rate_window_seconds=window,
        valid_from=valid_from or now - timedelta(days=1),
        valid_until=valid_until or now + timedelta(days=30),
        unit_price_minor=price,
        currency="EUR",
        max_batch=max_batch,
        job_limits=JobLimits(frozenset({"predict", "evaluate"}), 600, 2048, 900),
    )


@dataclass
class Deal:
    offering_id: str
    offer: dict[str, Any]
    contract: dict[str, Any]
    provider_key: SigningKey
    consumer_key: SigningKey
    consumer: Principal  # service-level principal of the consumer org

    @property
    def contract_id(self) -> str:
        return str(self.contract["id"])


def make_deal(world: Any, **terms_kw: Any) -> Deal:
    """A published provider-hosted offering, a signed offer and the consumer's signed contract."""
    off = world.provider.create_offering(name="credit-risk", task="binary-classification", hosting="provider")
    world.provider.publish(off["id"])
    pk, ck = SigningKey.generate(), SigningKey.generate()
    offer = world.provider.publish_offer(off["id"], make_terms(**terms_kw), signing_key=pk)
    contract = world.consumer.accept_offer(offer["id"], signing_key=ck)
    p = Principal(key_id="key_test", org_id=world.orgs["consumer"], roles=frozenset({"consumer"}))
    return Deal(off["id"], offer, contract, pk, ck, p)


def ledger_records(world: Any) -> list[tuple[int, dict[str, Any]]]:
    """Every ledger leaf, parsed and schema-checked, with its index."""
    from marketplace.services import ledger

    with world.rt.sessions() as s:
        size = ledger.tree_size(s)
    return [(i, parse_record(data)) for i, data in ledger.iter_leaves(world.rt, 0, size)]


def usage_leaves(world: Any, contract_id: str) -> list[dict[str, Any]]:
    return [r for _, r in ledger_records(world) if r["schema"] == "som.usage/v1" and r["contract_id"] == contract_id]


def canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)
