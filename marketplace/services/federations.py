"""Federations: create, join, read; the coordinator's bookkeeping between rounds.

For: who may join (an active contract on the offering whose modes include ``federated``, and the
federation's ``allowed_orgs``), the privacy budget (each round is charged before it runs and
refused when the cumulative epsilon would exceed the terms'), one ledger leaf per contribution
(:func:`contracts.records.fl_contribution_record`) and the new model version with its lineage.
Not for: running rounds (:mod:`marketplace.federated.coordinator`) or learning (Flower's apps).
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts.records import fl_contribution_record
from marketplace.db.base import utcnow
from marketplace.db.models import Offering, OfferingVersion
from marketplace.db.models_contracts import ContractRow
from marketplace.db.models_federated import Federation, FederationParticipant, FederationRound
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound
from marketplace.federated import learning
from marketplace.federated.privacy import epsilon_after
from marketplace.federated.recipe import Counting, Recipe, Terms
from marketplace.services import audit, catalog
from marketplace.services.contracts import ledger_append, terms_of
from marketplace.services.identity import Principal

__all__ = [
    "active_participant",
    "can_run_round",
    "complete",
    "list_for",
    "create",
    "fail",
    "get_for",
    "join",
    "participant_of",
    "record_round",
    "rounds_of",
]

OPEN = ("open", "running")


def recipe_of(f: Federation) -> Recipe:
    return Recipe.from_dict(f.recipe)


def terms_of_fed(f: Federation) -> Terms:
    return Terms.from_dict(f.terms)


def create(
    s: Session,
    p: Principal,
    *,
    offering_id: str,
    recipe: dict[str, Any],
    terms: dict[str, Any],
    name: str,
    parent_version_id: str | None,
    who: audit.Actor,
) -> Federation:
    p.require("provider")
    off = catalog.get_owned(s, p, offering_id)
    try:
        r = Recipe.from_dict(recipe)
        t = Terms.from_dict(terms)
    except ValueError as e:
        raise Invalid(str(e)) from e
    if t.epsilon > 0 and r.noise_multiplier <= 0:
        raise Invalid("terms ask for a privacy budget (epsilon > 0): the recipe needs noise_multiplier > 0")
    parent = s.get(OfferingVersion, parent_version_id) if parent_version_id else catalog.latest_version(s, off.id)
    if parent is None or parent.offering_id != off.id:
        raise Invalid("the offering has no such parent version (upload one first)")
    if parent.input_shape != [r.dim]:
        raise Invalid(f"recipe.dim {r.dim} does not match the parent version's input {parent.input_shape}")
    f = Federation(
        offering_id=off.id,
        org_id=p.org_id,
        parent_version_id=parent.id,
        name=name,
        recipe=r.to_dict(),
        terms=t.to_dict(),
    )
    s.add(f)
    s.flush()
    audit.emit(s, who, "federation.create", target=f.id, detail={"offering_id": off.id})
    return f


def _contract_for(s: Session, org_id: str, offering_id: str) -> ContractRow | None:
    rows = s.scalars(
        select(ContractRow).where(
            ContractRow.offering_id == offering_id,
            ContractRow.consumer_org_id == org_id,
            ContractRow.status == "active",
        )
    )
    now = utcnow()
    for row in rows:
        t = terms_of(row)
        if "federated" in t.modes and t.is_valid_at(now):
            return row
    return None


def join(s: Session, p: Principal, fed_id: str, *, samples: int, who: audit.Actor) -> FederationParticipant:
    f = s.get(Federation, fed_id)
    if f is None:
        raise NotFound(f"federation {fed_id} not found")
    row = _contract_for(s, p.org_id, f.offering_id)
    terms = terms_of_fed(f)
    if row is None or (terms.allowed_orgs and p.org_id not in terms.allowed_orgs):
        audit.emit(s, who, "federation.join", target=fed_id, outcome="denied")
        raise Forbidden(
            "joining needs an active contract in mode 'federated' on the offering (and the federation's consent)"
        )
    if f.status not in OPEN:
        raise Conflict(f"federation {fed_id} is {f.status}")
    existing = s.scalar(
        select(FederationParticipant).where(
            FederationParticipant.federation_id == fed_id, FederationParticipant.org_id == p.org_id
        )
    )
    if existing is not None:
        existing.samples = samples
        return existing
    part = FederationParticipant(
        federation_id=fed_id, org_id=p.org_id, contract_id=row.id, node_id=secrets.randbits(62) | 2, samples=samples
    )
    s.add(part)
    s.flush()
    audit.emit(s, who, "federation.join", target=fed_id, detail={"samples": samples})
    return part


def get_for(s: Session, p: Principal, fed_id: str) -> tuple[Federation, FederationParticipant | None]:
    """The federation if the caller's organisation runs it or takes part; NotFound otherwise."""
    f = s.get(Federation, fed_id)
    if f is not None:
        if f.org_id == p.org_id:
            return f, None
        part = participant_of(s, p, fed_id, required=False)
        if part is not None:
            return f, part
    raise NotFound(f"federation {fed_id} not found")


def list_for(s: Session, p: Principal) -> list[Federation]:
    """Federations the caller's organisation runs or takes part in, newest first."""
    mine = select(FederationParticipant.federation_id).where(FederationParticipant.org_id == p.org_id)
    return list(
        s.scalars(
            select(Federation)
            .where((Federation.org_id == p.org_id) | Federation.id.in_(mine))
            .order_by(Federation.created_at.desc())
            .limit(500)
        )
    )


def participant_of(s: Session, p: Principal, fed_id: str, *, required: bool = True) -> FederationParticipant | None:
    part = s.scalar(
        select(FederationParticipant).where(
            FederationParticipant.federation_id == fed_id, FederationParticipant.org_id == p.org_id
        )
    )
    if part is None and required:
        raise NotFound(f"federation {fed_id} not found")
    return part


def active_participant(s: Session, p: Principal, fed_id: str) -> FederationParticipant:
    """The caller's participation, while its ``federated`` contract is still active (403 once
    suspended or terminated: it stops receiving and sending messages)."""
    pt = participant_of(s, p, fed_id)
    assert pt is not None
    row = s.get(ContractRow, pt.contract_id)
    if row is None or row.status != "active":
        raise Forbidden("the contract this participation rests on is no longer active")
    return pt


def participants(s: Session, fed_id: str) -> list[FederationParticipant]:
    return list(
        s.scalars(
            select(FederationParticipant)
            .where(FederationParticipant.federation_id == fed_id)
            .order_by(FederationParticipant.joined_at)
        )
    )


def rounds_of(s: Session, fed_id: str) -> list[FederationRound]:
    return list(
        s.scalars(
            select(FederationRound).where(FederationRound.federation_id == fed_id).order_by(FederationRound.number)
        )
    )


def can_run_round(s: Session, fed_id: str, rnd: int) -> float | None:
    """The cumulative epsilon after round ``rnd``, or None (and the federation stops with
    ``budget_exhausted``) when that would exceed the terms' budget. 0 without DP."""
    f = s.get(Federation, fed_id)
    assert f is not None
    r, t = recipe_of(f), terms_of_fed(f)
    if r.noise_multiplier <= 0:
        return 0.0
    eps = epsilon_after(r.noise_multiplier, rnd, t.delta)
    if t.epsilon > 0 and eps > t.epsilon:
        f.status = "budget_exhausted"
        f.error = f"round {rnd} would spend epsilon {eps:.4f} > budget {t.epsilon}; refused"
        f.updated_at = utcnow()
        return None
    return eps


def _dec(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.9f}".rstrip("0").rstrip(".") or "0"


def record_round(
    s: Session, fed_id: str, rnd: int, contributions: dict[int, str], *, epsilon: float, metrics: dict[str, Any]
) -> FederationRound:
    """One ledger leaf per contribution (node -> digest of what the coordinator received)."""
    f = s.get(Federation, fed_id)
    assert f is not None
    t = terms_of_fed(f)
    by_node = {pt.node_id: pt for pt in participants(s, fed_id)}
    now = utcnow()
    indexes: list[int] = []
    orgs: list[str] = []
    for node, digest in sorted(contributions.items()):
        pt = by_node.get(node)
        if pt is None:
            continue
        idx = ledger_append(
            s,
            fl_contribution_record(
                federation_id=fed_id,
                round=rnd,
                org=pt.org_id,
                samples=pt.samples,
                update_digest=digest,
                epsilon=_dec(epsilon),
                delta=_dec(t.delta) if epsilon else "0",
                time=now,
            ),
        )
        if idx is not None:
            indexes.append(idx)
        units = pt.samples if t.counting == Counting.SAMPLES else 1
        pt.rounds += 1
        pt.units += units
        pt.credit_minor += units * t.credit_minor_per_unit
        pt.epsilon_spent = epsilon
        orgs.append(pt.org_id)
    row = FederationRound(
        federation_id=fed_id,
        number=rnd,
        participants=sorted(orgs),
        metrics=metrics,
        epsilon=epsilon,
        ledger_indexes=indexes,
    )
    s.add(row)
    f.rounds_done = rnd
    f.epsilon_spent = epsilon
    f.updated_at = now
    s.flush()
    return row


def complete(rt: Any, s: Session, fed_id: str, params: list[np.ndarray], metrics: dict[str, Any]) -> OfferingVersion:
    """Store the trained model as a new version (the upload's validation and envelope
    encryption, :func:`catalog.add_version`) with its lineage."""
    f = s.get(Federation, fed_id)
    assert f is not None
    r = recipe_of(f)
    off = s.get(Offering, f.offering_id)
    assert off is not None
    data = learning.to_npz(params, np.asarray(r.mean), np.asarray(r.scale))
    who = audit.Actor(actor=f"federation:{fed_id}", org_id=f.org_id, request_id="")
    version = catalog.add_version(rt, s, off, data, fmt="npz", input_shape=[r.dim], who=who)
    version.info = {
        **version.info,
        "lineage": {
            "federation_id": fed_id,
            "parent_version_id": f.parent_version_id,
            "rounds": f.rounds_done,
            "participants": sorted({o for rd in rounds_of(s, fed_id) for o in rd.participants}),
            "metrics": metrics,
            "epsilon": f.epsilon_spent,
            "delta": terms_of_fed(f).delta if f.epsilon_spent else 0.0,
        },
    }
    f.result_version_id = version.id
    f.status = "completed"
    f.updated_at = utcnow()
    return version


def fail(s: Session, fed_id: str, status: str, error: str) -> None:
    f = s.get(Federation, fed_id)
    if f is not None:
        f.status = status
        f.error = error[:2000]
        f.updated_at = utcnow()
