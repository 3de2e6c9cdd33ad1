"""Shared setup of the HE service tests (no tests here): a real sklearn model, an offering, a contract."""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LRData:
    npz: bytes
    x_train: np.ndarray
    x_test: np.ndarray
    plain_proba: np.ndarray  # sklearn predict_proba[:, 1] on x_test


@lru_cache(maxsize=1)
def lr_breast_cancer() -> LRData:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, _ = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mu, sd = xtr.mean(0), xtr.std(0)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    clf = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            "layer0.weight": clf.coef_.astype(np.float64),
            "layer0.bias": clf.intercept_.astype(np.float64),
            "layer0.activation": np.array("sigmoid"),
        },
    )
    return LRData(buf.getvalue(), xtr, xte, clf.predict_proba(xte)[:, 1])


def npy(a: np.ndarray, *, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def principal(world: Any, name: str, role: str) -> Any:
    from marketplace.services.identity import Principal

    return Principal(key_id=f"key_test_{name}", org_id=world.orgs[name], roles=frozenset({role}))


def make_contract(
    world: Any,
    offering_id: str,
    *,
    consumer: str = "consumer",
    provider: str = "provider",
    modes: frozenset[str] = frozenset({"he_inference"}),
    quota: int = 1_000_000,
    max_batch: int = 100_000,
) -> str:
    """Provider signs an offer, consumer signs the acceptance, both through the contracts service."""
    from contracts.offer import accept_offer, make_offer
    from contracts.terms import Terms
    from crypto.signing import SigningKey
    from marketplace.db.base import utcnow
    from marketplace.services import audit
    from marketplace.services import contracts as svc

    now = utcnow()
    terms = Terms(
        modes=modes,
        quota_units=quota,
        rate_units=quota,
        rate_window_seconds=60,
        valid_from=now - timedelta(hours=1),
        valid_until=now + timedelta(days=30),
        unit_price_minor=2,
        currency="EUR",
        max_batch=max_batch,
    )
    offer = make_offer(
        offer_id="ofr_" + secrets.token_hex(8),
        offering_id=offering_id,
        provider_org=world.orgs[provider],
        terms=terms,
        signing_key=SigningKey.generate(),
        now=now,
    )
    rt = world.rt
    with rt.tx() as s:
        svc.publish_offer(s, principal(world, provider, "provider"), offering_id, offer.to_dict(), audit.Actor.system())
    contract = accept_offer(offer, consumer_org=world.orgs[consumer], signing_key=SigningKey.generate(), now=now)
    with rt.tx() as s:
        row = svc.accept_offer(
            s,
            principal(world, consumer, "consumer"),
            offer.offer_id,
            contract.acceptance.to_dict(),
            audit.Actor.system(),
        )
        return str(row.id)


def lr_offering(world: Any, *, compile_: bool = True, publish: bool = True) -> str:
    """A marketplace-hosted LR offering, uploaded (and compiled, published)."""
    d = lr_breast_cancer()
    off = world.provider.create_offering(name="breast-cancer-lr", task="binary-classification", hosting="marketplace")
    world.provider.upload_version(off["id"], d.npz, format="npz", input_shape=[30])
    if compile_:
        world.provider.compile_version(off["id"], 1, d.x_train)
    if publish:
        world.provider.publish(off["id"])
    return str(off["id"])
