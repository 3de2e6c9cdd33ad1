"""Contract routes: offers, acceptances, contracts and their signed events, statements, receipts.

Every record that changes a contract arrives *signed by its party* (the SDK/CLI signs with the
organisation's local Ed25519 key); the server verifies and stores it, and never holds a signing key.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Query, Request, Response
from pydantic import BaseModel

from contracts.offer import Status
from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.jsonlimits import BoundedRecord
from marketplace.api.schemas import PageOf
from marketplace.db.base import utcnow
from marketplace.db.models_contracts import ContractRow, OfferRow
from marketplace.db.paging import page_scalars
from marketplace.services import contracts as svc
from marketplace.services import metering

router = APIRouter(tags=["contracts"])

SignedRecord = Annotated[BoundedRecord, Body(description="The signed record (its to_dict()); at most 32 deep, 64 KiB.")]


class OfferPublic(BaseModel):
    id: str
    offering_id: str
    provider_org_id: str
    provider_key: str
    digest: str
    status: str
    created_at: datetime
    offer: dict[str, Any]
    addressed_to: list[str] | None = None  # a private offer: only these organisations see it


class UsagePublic(BaseModel):
    quota_units: int
    used_units: int
    reserved_units: int
    remaining_units: int
    window_start: datetime | None
    window_units: int


class ContractPublic(BaseModel):
    id: str
    offer_id: str
    offering_id: str
    provider_org_id: str
    consumer_org_id: str
    status: str
    effective_status: str
    terms: dict[str, Any]
    seq: int
    head: str
    accepted_at: datetime
    ledger_index: int | None
    version_number: int | None = None  # the model version pinned at acceptance
    usage: UsagePublic
    contract: dict[str, Any]
    events: list[dict[str, Any]] = []


def _offer_public(row: OfferRow) -> OfferPublic:
    return OfferPublic(
        id=row.id,
        offering_id=row.offering_id,
        provider_org_id=row.provider_org_id,
        provider_key=row.provider_key,
        digest=row.digest,
        status=row.status,
        created_at=row.created_at,
        offer=row.record,
        addressed_to=row.addressed_to,
    )


def _contract_public(s: Any, row: ContractRow, *, events: bool) -> ContractPublic:
    terms = svc.terms_of(row)
    now = utcnow()
    eff: Status = row.status
    if eff != Status.TERMINATED:
        if now >= terms.valid_until:
            eff = Status.EXPIRED
        elif now < terms.valid_from:
            eff = Status.NOT_YET_VALID
    return ContractPublic(
        id=row.id,
        offer_id=row.offer_id,
        offering_id=row.offering_id,
        provider_org_id=row.provider_org_id,
        consumer_org_id=row.consumer_org_id,
        status=row.status,
        effective_status=eff,
        terms=row.terms,
        seq=row.seq,
        head=row.head,
        accepted_at=row.accepted_at,
        ledger_index=row.ledger_index,
        version_number=row.version_number,
        usage=UsagePublic(
            quota_units=terms.quota_units,
            used_units=row.used_units,
            reserved_units=row.reserved_units,
            remaining_units=max(terms.quota_units - row.used_units - row.reserved_units, 0),
            window_start=row.window_start,
            window_units=row.window_units,
        ),
        contract=row.record,
        events=[e.record for e in svc.events_of(s, row.id)] if events else [],
    )


# -- offers -----------------------------------------------------------------------------------


@router.post(
    "/v1/offerings/{offering_id}/offers",
    response_model=OfferPublic,
    status_code=201,
    summary="Publish a signed offer for your offering (provider)",
)
def publish_offer(
    offering_id: str,
    body: SignedRecord,
    p: Auth,
    rt: Rt,
    request: Request,
    to: Annotated[list[str] | None, Query(description="Private offer: the organisation ids it is addressed to")] = None,
) -> OfferPublic:
    with rt.tx() as s:
        return _offer_public(svc.publish_offer(s, p, offering_id, body, actor_of(p, request), addressed_to=to))


@router.get(
    "/v1/offerings/{offering_id}/offers",
    response_model=list[OfferPublic],
    summary="Offers of an offering (open ones; all of them for the provider)",
)
def list_offers(offering_id: str, p: Auth, rt: Rt) -> list[OfferPublic]:
    with rt.tx() as s:
        return [_offer_public(r) for r in svc.list_offers(s, p, offering_id)]


@router.get("/v1/offers/{offer_id}", response_model=OfferPublic, summary="One offer")
def get_offer(offer_id: str, p: Auth, rt: Rt) -> OfferPublic:
    with rt.tx() as s:
        return _offer_public(svc.get_offer(s, p, offer_id))


@router.post("/v1/offers/{offer_id}/withdraw", response_model=OfferPublic, summary="Close an offer (provider)")
def withdraw_offer(offer_id: str, p: Auth, rt: Rt, request: Request) -> OfferPublic:
    with rt.tx() as s:
        return _offer_public(svc.withdraw_offer(s, p, offer_id, actor_of(p, request)))


@router.post(
    "/v1/offers/{offer_id}/accept",
    response_model=ContractPublic,
    status_code=201,
    summary="Accept an offer with your signed acceptance (consumer): creates the contract",
)
def accept_offer(offer_id: str, body: SignedRecord, p: Auth, rt: Rt, request: Request) -> ContractPublic:
    with rt.tx() as s:
        row = svc.accept_offer(s, p, offer_id, body, actor_of(p, request))
        return _contract_public(s, row, events=True)


# -- contracts --------------------------------------------------------------------------------


@router.get("/v1/contracts", response_model=PageOf[ContractPublic], summary="Your organisation's contracts")
def list_contracts(
    p: Auth,
    rt: Rt,
    page: Page,
    role: Literal["provider", "consumer"] | None = None,
    offering_id: str | None = None,
    status: Literal["active", "suspended", "terminated"] | None = None,
) -> PageOf[ContractPublic]:
    with rt.tx() as s:
        stmt = svc.party_query(p, role=role, offering_id=offering_id, status=status)
        rows, total = page_scalars(s, stmt, page)
        items = [_contract_public(s, r, events=False) for r in rows]
        return PageOf[ContractPublic].build(items, total, page)


@router.get("/v1/contracts/{contract_id}", response_model=ContractPublic, summary="One contract (its parties only)")
def get_contract(contract_id: str, p: Auth, rt: Rt) -> ContractPublic:
    with rt.tx() as s:
        return _contract_public(s, svc.get_for_party(s, p, contract_id), events=True)


@router.post(
    "/v1/contracts/{contract_id}/events",
    response_model=ContractPublic,
    status_code=201,
    summary="Record a signed suspension, resumption, termination or amendment",
)
def add_event(contract_id: str, body: SignedRecord, p: Auth, rt: Rt, request: Request) -> ContractPublic:
    with rt.tx() as s:
        svc.add_event(s, p, contract_id, body, actor_of(p, request))
        return _contract_public(s, svc.get_for_party(s, p, contract_id), events=True)


def _aware(t: datetime | None) -> datetime | None:
    """A query time as UTC: naive means UTC, an offset is converted (``+07:47`` is not refused)."""
    if t is None:
        return None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@router.get(
    "/v1/contracts/{contract_id}/statement",
    summary="Usage statement over [from, to) (JSON or CSV); reconciles with the ledger's usage leaves",
    response_model=None,
    responses={200: {"content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}}}},
)
def get_statement(
    contract_id: str,
    p: Auth,
    rt: Rt,
    from_: Annotated[datetime | None, Query(alias="from", description="Start (inclusive); default: acceptance")] = None,
    to: Annotated[datetime | None, Query(description="End (exclusive); default: now")] = None,
    format: Literal["json", "csv"] = "json",
) -> Any:
    with rt.tx() as s:
        row = svc.get_for_party(s, p, contract_id)
        start = _aware(from_) or row.accepted_at
        end = _aware(to) or (utcnow() + timedelta(microseconds=1))
        st = svc.statement(s, row, start, end)
    if format == "csv":
        return Response(
            st.to_csv(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{contract_id}.csv"'},
        )
    return st.to_dict()


@router.get("/v1/receipts/{usage_id}", summary="The ledger receipt of a metered use")
def get_receipt(usage_id: str, p: Auth, rt: Rt) -> dict[str, Any]:
    return metering.receipt_for(rt, p, usage_id)
