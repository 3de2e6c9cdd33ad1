"""Catalog routes: offerings, versions (model uploads), publishing."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from pydantic_core import PydanticSerializationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.middleware import BodyLimit, body_limit
from marketplace.api.schemas import (
    OfferingCreate,
    OfferingPublic,
    OfferingUpdate,
    PageOf,
    VersionPublic,
)
from marketplace.db.base import utcnow
from marketplace.db.models import Hosting, Offering, OfferingStatus, OfferingVersion
from marketplace.errors import Invalid, UnsupportedMediaType
from marketplace.runtime import Runtime
from marketplace.services import agents, audit, catalog, storage

router = APIRouter(prefix="/v1/offerings", tags=["catalog"])


def to_public(rt: Runtime, s: Session, off: Offering) -> OfferingPublic:
    """The public view of ``off``: its latest version and, for provider-hosted offerings, whether
    an agent serving it is online."""
    v = catalog.latest_version(s, off.id)
    out = OfferingPublic.model_validate(off)
    out.latest_version = VersionPublic.model_validate(v) if v else None
    if off.hosting == Hosting.PROVIDER:
        out.agent_online = agents.is_online(rt, s, off.id)
    return out


def served(out: OfferingPublic) -> OfferingPublic:
    """Serialize ``out`` inside the caller's transaction: an offering that could not be served
    back (e.g. nested too deep) raises Invalid here, so the transaction rolls back and nothing
    is stored that would make later reads (the catalog listing) fail for everyone."""
    try:
        out.model_dump_json()
    except (ValueError, PydanticSerializationError, RecursionError) as e:
        raise Invalid("the offering cannot be served back as JSON; nothing was stored") from e
    return out


@router.post(
    "", response_model=OfferingPublic, status_code=201, summary="Create an offering (provider; starts as draft)"
)
def create_offering(body: OfferingCreate, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    p.require("provider")
    with rt.tx() as s:
        off = Offering(org_id=p.org_id, **body.model_dump())
        s.add(off)
        s.flush()
        audit.emit(s, actor_of(p, request), "offering.create", target=off.id, detail={"name": off.name})
        return served(to_public(rt, s, off))


@router.get("", response_model=PageOf[OfferingPublic], summary="Search the catalog")
def search_offerings(
    p: Auth,
    rt: Rt,
    page: Page,
    q: Annotated[str | None, Query(max_length=200, description="Text in name or description")] = None,
    task: str | None = None,
    tag: str | None = None,
    hosting: Hosting | None = None,
    org_id: str | None = None,
    status: OfferingStatus | None = None,
) -> PageOf[OfferingPublic]:
    with rt.tx() as s:
        rows, total = catalog.search(
            s,
            p,
            q=q,
            task=task,
            tag=tag,
            hosting=hosting,
            org_id=org_id,
            status=status,
            page=page,
        )
        return PageOf[OfferingPublic].build([to_public(rt, s, r) for r in rows], total, page)


@router.get("/{offering_id}", response_model=OfferingPublic, summary="One offering")
def get_offering(offering_id: str, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    with rt.tx() as s:
        return to_public(rt, s, catalog.get_visible(s, p, offering_id))


@router.patch("/{offering_id}", response_model=OfferingPublic, summary="Update an offering you own")
def update_offering(offering_id: str, body: OfferingUpdate, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    p.require("provider")
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id)
        changes = body.model_dump(exclude_unset=True)
        for k, v in changes.items():
            if v is None:
                raise Invalid(f"{k} cannot be null")
            setattr(off, k, v)
        off.updated_at = utcnow()
        audit.emit(s, actor_of(p, request), "offering.update", target=off.id, detail={"fields": sorted(changes)})
        return served(to_public(rt, s, off))


@router.post("/{offering_id}/publish", response_model=OfferingPublic, summary="Publish to the catalog")
def publish(offering_id: str, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    p.require("provider")
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id, "admin")
        return to_public(rt, s, catalog.set_status(s, off, OfferingStatus.PUBLISHED, actor_of(p, request)))


@router.post("/{offering_id}/withdraw", response_model=OfferingPublic, summary="Withdraw from the catalog")
def withdraw(offering_id: str, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    p.require("provider")
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id, "admin")
        return to_public(rt, s, catalog.set_status(s, off, OfferingStatus.WITHDRAWN, actor_of(p, request)))


@router.post(
    "/{offering_id}/versions",
    response_model=VersionPublic,
    status_code=201,
    summary="Upload a model version (raw ONNX or .npz bytes as application/octet-stream)",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    dependencies=[body_limit(BodyLimit.BINARY)],
)
async def upload_version(
    offering_id: str,
    p: Auth,
    rt: Rt,
    request: Request,
    format: Annotated[Literal["onnx", "npz"], Query(description="Artifact format")],
    input_shape: Annotated[str, Query(description="Declared input shape, e.g. '30'")] = "",
) -> VersionPublic:
    p.require("provider")
    try:
        shape = [int(x) for x in input_shape.split(",") if x.strip()] if input_shape else []
    except ValueError as e:
        raise Invalid(f"input_shape must be comma-separated integers, got {input_shape!r}") from e
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype not in ("application/octet-stream", "application/onnx", "application/x-npz"):
        raise UnsupportedMediaType(f"send the artifact as application/octet-stream, not {ctype}")
    data = await request.body()
    who = actor_of(p, request)

    def upload() -> VersionPublic:
        # Ownership first (a stranger learns nothing about validation), then the CPU work of
        # validating and encrypting with no transaction open, then one short transaction.
        with rt.tx() as s:
            off = catalog.get_owned(s, p, offering_id)
            catalog.check_uploadable(off)
            storage.check_quota(rt, s, off.org_id, len(data), what="this model version")  # before parsing
        prepared = catalog.prepare_version(rt, data, fmt=format, input_shape=shape)
        with rt.tx() as s:
            v = catalog.commit_version(s, catalog.get_owned(s, p, offering_id), prepared, who=who)
            return VersionPublic.model_validate(v)

    return await run_in_threadpool(upload)  # off the event loop: other requests keep being served


@router.get("/{offering_id}/versions", response_model=list[VersionPublic], summary="Versions of an offering")
def list_versions(offering_id: str, p: Auth, rt: Rt, request: Request) -> list[VersionPublic]:
    with rt.tx() as s:
        catalog.get_visible(s, p, offering_id)
        rows = s.scalars(
            select(OfferingVersion).where(OfferingVersion.offering_id == offering_id).order_by(OfferingVersion.number)
        )
        return [VersionPublic.model_validate(r) for r in rows]
