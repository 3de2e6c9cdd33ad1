"""HE key sets: a consumer's public CKKS key material, bound to one of its contracts.

For: ``create_keyset`` registers a consumer's *public* key set (validated with
:meth:`crypto.he.PublicContext.from_bytes`: a secret key is refused) bound to one of its
contracts and the plan the offering serves; key sets are revoked with their contract
(``refresh_revocation``) or by their owner; ``keyset_bound`` is metering's check that a request's
key set belongs to the contract it is charged to. Not for: inference
(:mod:`marketplace.services.he`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts._validate import parse_time
from crypto.errors import HEError
from crypto.he import PublicContext
from marketplace.db.base import utcnow
from marketplace.db.models import KeyKind, Offering
from marketplace.db.models_contracts import ContractRow
from marketplace.db.models_he import Keyset
from marketplace.db.paging import Window, page_scalars
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.he_plans import current_plan
from marketplace.services.identity import Principal

__all__ = [
    "create_keyset",
    "delete_keyset",
    "get_keyset",
    "keyset_bound",
    "keyset_content",
    "keyset_public",
    "list_keysets",
    "own_keyset",
    "refresh_revocation",
]


@dataclass(frozen=True)
class ContractRef:
    id: str
    offering_id: str
    consumer_org_id: str
    status: str
    ended: bool  # terminated or past its validity window: its key sets are revoked
    modes: tuple[str, ...]


def _contract(s: Session, contract_id: str, *, now: datetime) -> ContractRef | None:
    row = s.get(ContractRow, contract_id)
    if row is None:
        return None
    terms = row.terms or {}
    expired = False
    try:
        expired = now >= parse_time(terms.get("valid_until"), "valid_until")
    except Exception:  # noqa: BLE001 - unreadable terms: treat as ended, never as valid
        expired = True
    return ContractRef(
        id=row.id,
        offering_id=row.offering_id,
        consumer_org_id=row.consumer_org_id,
        status=row.status,
        ended=row.status == "terminated" or expired,
        modes=tuple(terms.get("modes") or ()),
    )


def _resolve_contract(
    s: Session, p: Principal, *, contract_id: str | None, offering_id: str | None, now: datetime
) -> ContractRef:
    if contract_id:
        c = _contract(s, contract_id, now=now)
        if c is None or c.consumer_org_id != p.org_id or (offering_id and c.offering_id != offering_id):
            raise NotFound(f"contract {contract_id} not found")
        return c
    if not offering_id:
        raise Invalid("give contract_id (or offering_id to use your single active contract for it)")
    ids = list(
        s.scalars(
            select(ContractRow.id).where(
                ContractRow.consumer_org_id == p.org_id,
                ContractRow.offering_id == offering_id,
                ContractRow.status == "active",
            )
        )
    )
    live = [c for c in (_contract(s, i, now=now) for i in ids) if c is not None and not c.ended]
    if not live:
        raise NotFound(f"no active contract of yours for offering {offering_id}; accept an offer first")
    if len(live) > 1:
        raise Conflict(f"you have {len(live)} active contracts for offering {offering_id}; give contract_id")
    return live[0]


def keyset_public(k: Keyset) -> dict[str, Any]:
    return {
        "id": k.id,
        "org_id": k.org_id,
        "offering_id": k.offering_id,
        "contract_id": k.contract_id,
        "plan_digest": k.plan_digest,
        "size": k.size,
        "digest": k.blob,
        "layouts": list(k.layouts),
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
        "revoked_reason": k.revoked_reason,
        "status": "revoked" if k.revoked_at else "active",
    }


def create_keyset(
    rt: Runtime,
    p: Principal,
    data: bytes,
    *,
    contract_id: str | None,
    offering_id: str | None,
    who: audit.Actor,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Register a public key set for one of the caller's contracts (consumer role).

    Raises NotFound (no such contract of yours), Forbidden (contract ended or without
    he_inference), Conflict (offering not compiled), Invalid (not a public key set for the
    offering's plan; a key set carrying a secret key is refused).
    """
    p.require("consumer")
    now = now or utcnow()
    if not data:
        raise Invalid("empty key set: send SecretContext.public_keyset_bytes() as application/octet-stream")
    with rt.tx() as s:
        c = _resolve_contract(s, p, contract_id=contract_id, offering_id=offering_id, now=now)
        if c.ended:
            raise Forbidden(f"contract {c.id} has ended; key sets cannot be registered for it", reason="contract_ended")
        if c.modes and "he_inference" not in c.modes:
            raise Forbidden(f"contract {c.id} does not allow he_inference", reason="mode_not_allowed")
        off = s.get(Offering, c.offering_id)
        if off is None:  # pragma: no cover - FK
            raise NotFound(f"offering {c.offering_id} not found")
        ref = current_plan(s, off, c.id)
    try:
        ctx = PublicContext.from_bytes(data, plan=ref.plan)
    except HEError as e:
        raise Invalid(f"key set refused: {e}") from e
    layouts = list(ctx.layouts)
    del ctx
    addr = rt.blobs.put(data)
    with rt.tx() as s:
        k = Keyset(
            org_id=p.org_id,
            offering_id=c.offering_id,
            contract_id=c.id,
            plan_digest=ref.digest,
            blob=addr,
            size=len(data),
            layouts=layouts,
            created_by=p.key_id,
        )
        s.add(k)
        s.flush()
        audit.emit(
            s,
            who,
            "keyset.create",
            target=k.id,
            detail={"contract_id": c.id, "offering_id": c.offering_id, "size": len(data), "layouts": layouts},
        )
        return keyset_public(k)


def refresh_revocation(s: Session, k: Keyset, *, now: datetime) -> None:
    if k.revoked_at is not None:
        return
    c = _contract(s, k.contract_id, now=now)
    if c is None or c.ended:
        k.revoked_at = now
        k.revoked_reason = "contract_ended"


def list_keysets(
    rt: Runtime, p: Principal, page: Window, *, now: datetime | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of the caller's organisation's key sets (revocations refreshed), and the total."""
    now = now or utcnow()
    with rt.tx() as s:
        stmt = select(Keyset).where(Keyset.org_id == p.org_id).order_by(Keyset.created_at, Keyset.id)
        rows, total = page_scalars(s, stmt, page)
        for k in rows:
            refresh_revocation(s, k, now=now)
        return [keyset_public(k) for k in rows], total


def get_keyset(rt: Runtime, p: Principal, keyset_id: str) -> dict[str, Any]:
    with rt.tx() as s:
        k = own_keyset(s, p, keyset_id)
        refresh_revocation(s, k, now=utcnow())
        return keyset_public(k)


def own_keyset(s: Session, p: Principal, keyset_id: str) -> Keyset:
    k = s.get(Keyset, keyset_id)
    if k is None:
        raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)  # audited as a foreign one is
    if k.org_id != p.org_id:
        raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)
    return k


def delete_keyset(rt: Runtime, p: Principal, keyset_id: str, *, who: audit.Actor) -> dict[str, Any]:
    """Revoke a key set of the caller's org (the row stays for the audit trail)."""
    with rt.tx() as s:
        k = own_keyset(s, p, keyset_id)
        if k.revoked_at is None:
            k.revoked_at = utcnow()
            k.revoked_reason = "deleted"
            audit.emit(s, who, "keyset.revoke", target=k.id, detail={"reason": "deleted"})
        return keyset_public(k)


def keyset_content(rt: Runtime, p: Principal, keyset_id: str) -> bytes:
    """The key set bytes: for its owner, or for an agent key serving its offering."""
    with rt.tx() as s:
        k = s.get(Keyset, keyset_id)
        allowed = k is not None and (
            k.org_id == p.org_id
            or (p.kind == KeyKind.AGENT and p.offering_ids is not None and k.offering_id in p.offering_ids)
        )
        if k is None:
            raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)
        if not allowed:
            raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)
        addr = k.blob
    data: bytes = rt.blobs.get(addr)
    return data


def keyset_bound(s: Session, contract_id: str, keyset_id: str) -> bool:
    """Metering's key-set check: registered for ``contract_id`` and not revoked."""
    k = s.get(Keyset, keyset_id)
    return k is not None and k.contract_id == contract_id and k.revoked_at is None
