"""Offers in the service: a provider's signed offer, stored, listed and withdrawn.

For: checking a provider-signed :class:`contracts.offer.Offer` (ids, times, the Ed25519
signature over its RFC 8785 body) for an offering the provider owns, and who may see which
offer. Not for: accepting an offer (:mod:`~marketplace.services.contracts.lifecycle`), signing
(the provider signs on its own machine; this module only verifies).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts.errors import SchemaError
from contracts.offer import Offer
from crypto.canonical import canonicalize
from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.signing import verify
from marketplace.db.base import utcnow
from marketplace.db.models import Offering, OfferingStatus
from marketplace.db.models_contracts import OfferRow, OfferState
from marketplace.errors import Conflict, Invalid, NotFound
from marketplace.services import audit, sharing
from marketplace.services.contracts.store import OFFER_ID_RE, check_time
from marketplace.services.identity import Principal

__all__ = ["get_offer", "list_offers", "publish_offer", "withdraw_offer"]


def publish_offer(
    s: Session,
    p: Principal,
    offering_id: str,
    signed: Any,
    who: audit.Actor,
    *,
    now: datetime | None = None,
    addressed_to: list[str] | None = None,
) -> OfferRow:
    """Store a provider-signed offer (``Offer.to_dict()``) for an offering the caller owns;
    ``addressed_to`` (organisation ids) makes it a private offer only they see and accept."""
    p.require("provider")
    t = now or utcnow()
    off = sharing.check(s, p, offering_id, sharing.Permission.ADMIN)
    if off.org_id != p.org_id:
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    addressed_to = sharing.check_addressees(s, addressed_to)
    try:
        offer = Offer.from_dict(signed)
    except (SchemaError, ValueError, TypeError) as e:
        raise Invalid(f"offer: {e}") from e
    if offer.offering_id != offering_id:
        raise Invalid(f"offer.offering_id: expected {offering_id}, got {offer.offering_id}")
    if offer.provider_org != p.org_id:
        raise Invalid(f"offer.provider_org: expected your organisation {p.org_id}, got {offer.provider_org}")
    if not OFFER_ID_RE.fullmatch(offer.offer_id):
        raise Invalid(f"offer.offer_id: expected 'ofr_' + 8..60 URL-safe characters, got {offer.offer_id!r}")
    check_time("offer.created", offer.created, t)
    if t >= offer.terms.valid_until:
        raise Invalid(f"offer.terms.valid_until {offer.terms.valid_until.isoformat()} is in the past")
    try:  # Ed25519 over the RFC 8785 body, as contracts.offer signs it
        verify(offer.provider_key, offer.signature, canonicalize(offer.body()))
    except (InvalidSignature, KeyMaterialError) as e:
        raise Invalid("offer signature did not verify") from e
    if s.get(OfferRow, offer.offer_id) is not None:
        raise Conflict(f"offer {offer.offer_id} already exists")
    row = OfferRow(
        id=offer.offer_id,
        offering_id=offering_id,
        provider_org_id=p.org_id,
        provider_key=offer.provider_key,
        digest=offer.digest(),
        record=offer.to_dict(),
        addressed_to=addressed_to,
        status=OfferState.OPEN,
        created_at=t,
    )
    s.add(row)
    s.flush()
    audit.emit(
        s,
        who,
        "offer.publish",
        target=row.id,
        detail={"offering_id": offering_id, "digest": row.digest, "provider_key": row.provider_key},
    )
    return row


def get_offer(s: Session, p: Principal, offer_id: str) -> OfferRow:
    """An offer the caller may see: its own organisation's, or an open offer of a published offering."""
    row = s.get(OfferRow, offer_id)
    if row is None:
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)  # audited as a hidden one is
    if row.provider_org_id == p.org_id or p.has("admin"):
        return row
    off = s.get(Offering, row.offering_id)
    if (
        row.status != OfferState.OPEN
        or off is None
        or off.status != OfferingStatus.PUBLISHED
        or not sharing.may(s, p, off)
    ):
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    if row.addressed_to is not None and p.org_id not in row.addressed_to:  # a private offer to others
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    return row


def list_offers(s: Session, p: Principal, offering_id: str) -> list[OfferRow]:
    """Offers of an offering visible to the caller (open ones; all of them for the owner)."""
    off = s.get(Offering, offering_id)
    if off is None:
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    stmt = select(OfferRow).where(OfferRow.offering_id == offering_id)
    if off.org_id != p.org_id and not p.has("admin"):
        if off.status != OfferingStatus.PUBLISHED or not sharing.may(s, p, off):
            raise NotFound(f"offering {offering_id} not found", denied=offering_id)
        stmt = stmt.where(OfferRow.status == OfferState.OPEN)
        rows = list(s.scalars(stmt.order_by(OfferRow.created_at, OfferRow.id)))
        return [r for r in rows if r.addressed_to is None or p.org_id in r.addressed_to]
    return list(s.scalars(stmt.order_by(OfferRow.created_at, OfferRow.id)))


def withdraw_offer(s: Session, p: Principal, offer_id: str, who: audit.Actor) -> OfferRow:
    """Close an offer to new acceptances (existing contracts are unaffected)."""
    p.require("provider")
    row = s.get(OfferRow, offer_id)
    if row is None or row.provider_org_id != p.org_id:
        raise NotFound(f"offer {offer_id} not found", denied=offer_id)
    if row.status != OfferState.WITHDRAWN:
        row.status = OfferState.WITHDRAWN
        audit.emit(s, who, "offer.withdraw", target=row.id, detail={"offering_id": row.offering_id})
    return row
