"""Sharing routes: teams, grants, visibility, an offering's audit trail, version metadata and
validation reports (docs/sharing.md). Logic lives in :mod:`marketplace.services.sharing`,
:mod:`marketplace.services.validation` and :mod:`marketplace.services.offering_audit`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.routes_catalog import to_public
from marketplace.api.schemas import AuditPublic, OfferingPublic, PageOf, Strict, VersionPublic
from marketplace.db.models_sharing import Grant, Team
from marketplace.errors import Conflict
from marketplace.services import audit, catalog, offering_audit, sharing, validation

router = APIRouter(tags=["sharing"])


class TeamCreate(Strict):
    name: str = Field(min_length=1, max_length=100, examples=["credit-ml"])


class MemberAdd(Strict):
    member_id: str = Field(min_length=1, max_length=40, description="An API key id of your organisation")


class TeamPublic(BaseModel):
    id: str
    org_id: str
    name: str
    members: list[str]
    created_at: datetime


class GrantCreate(Strict):
    org_id: str | None = Field(default=None, max_length=40)
    team_id: str | None = Field(default=None, max_length=40)
    permission: Literal["read", "write", "admin"] = "read"


class GrantPublic(BaseModel):
    model_config = {"from_attributes": True}
    id: str
    offering_id: str
    org_id: str
    team_id: str | None
    permission: str
    created_by: str
    created_at: datetime


class VisibilitySet(Strict):
    visibility: Literal["public", "organisation", "shared"]


class EvaluationSet(Strict):
    x: list[list[float]] = Field(max_length=100_000)
    y: list[float] = Field(max_length=100_000)


class VersionMetadata(Strict):
    metrics: dict[str, float] = Field(default_factory=dict, description="Declared metrics: name -> value")
    measured_on: str = Field(default="", max_length=4000, description="The data the metrics were measured on")
    notes: str = Field(default="", max_length=4000)
    parent: int | None = Field(default=None, ge=1, description="The version this one derives from")
    tolerance: float | None = Field(default=None, ge=0, le=1, description="Largest |declared - measured| accepted")
    he_min_agreement: float | None = Field(default=None, ge=0, le=1, description="HE agreement threshold")
    evaluation: EvaluationSet | None = Field(default=None, description="Rows to re-compute the metrics on")


def _team(t: Team, members: list[str]) -> TeamPublic:
    return TeamPublic(id=t.id, org_id=t.org_id, name=t.name, members=members, created_at=t.created_at)


# -- teams --------------------------------------------------------------------------------------


@router.post("/v1/teams", response_model=TeamPublic, status_code=201, summary="Create a team (organisation root key)")
def create_team(body: TeamCreate, p: Auth, rt: Rt, request: Request) -> TeamPublic:
    with rt.tx() as s:
        return _team(sharing.create_team(s, p, body.name, actor_of(p, request)), [])


@router.get("/v1/teams", response_model=list[TeamPublic], summary="Teams of your organisation")
def list_teams(p: Auth, rt: Rt) -> list[TeamPublic]:
    with rt.tx() as s:
        return [_team(t, m) for t, m in sharing.list_teams(s, p)]


@router.get("/v1/teams/{team}", response_model=TeamPublic, summary="One team (id or name)")
def get_team(team: str, p: Auth, rt: Rt) -> TeamPublic:
    with rt.tx() as s:
        t = sharing.get_team(s, p, team)
        return _team(t, sharing.members(s, t))


@router.post("/v1/teams/{team}/members", response_model=TeamPublic, summary="Add a key to a team")
def add_member(team: str, body: MemberAdd, p: Auth, rt: Rt, request: Request) -> TeamPublic:
    with rt.tx() as s:
        t = sharing.add_member(s, p, team, body.member_id, actor_of(p, request))
        return _team(t, sharing.members(s, t))


@router.delete("/v1/teams/{team}/members/{member_id}", response_model=TeamPublic, summary="Remove a key from a team")
def remove_member(team: str, member_id: str, p: Auth, rt: Rt, request: Request) -> TeamPublic:
    with rt.tx() as s:
        t = sharing.remove_member(s, p, team, member_id, actor_of(p, request))
        return _team(t, sharing.members(s, t))


# -- grants, visibility, audit -------------------------------------------------------------------


@router.get(
    "/v1/offerings/{offering_id}/grants", response_model=list[GrantPublic], summary="Grants on an offering (admin)"
)
def list_grants(offering_id: str, p: Auth, rt: Rt) -> list[GrantPublic]:
    with rt.tx() as s:
        return [GrantPublic.model_validate(g) for g in sharing.list_grants(s, p, offering_id)]


@router.post(
    "/v1/offerings/{offering_id}/grants",
    response_model=GrantPublic,
    status_code=201,
    summary="Grant read, write or admin to an organisation or team (admin)",
)
def add_grant(offering_id: str, body: GrantCreate, p: Auth, rt: Rt, request: Request) -> GrantPublic:
    with rt.tx() as s:
        g: Grant = sharing.add_grant(
            s,
            p,
            offering_id,
            org_id=body.org_id,
            team_id=body.team_id,
            permission=body.permission,
            who=actor_of(p, request),
        )
        return GrantPublic.model_validate(g)


@router.delete("/v1/offerings/{offering_id}/grants/{grant_id}", status_code=204, summary="Revoke a grant (admin)")
def remove_grant(offering_id: str, grant_id: str, p: Auth, rt: Rt, request: Request) -> Response:
    with rt.tx() as s:
        sharing.remove_grant(s, p, offering_id, grant_id, actor_of(p, request))
    return Response(status_code=204)


@router.put("/v1/offerings/{offering_id}/visibility", response_model=OfferingPublic, summary="Set visibility (admin)")
def set_visibility(offering_id: str, body: VisibilitySet, p: Auth, rt: Rt, request: Request) -> OfferingPublic:
    with rt.tx() as s:
        return to_public(rt, s, sharing.set_visibility(s, p, offering_id, body.visibility, actor_of(p, request)))


@router.get(
    "/v1/offerings/{offering_id}/audit",
    response_model=PageOf[AuditPublic],
    summary="Audit events about your offering (admin on it): retrievals, computations, refusals, grants",
)
def offering_events(offering_id: str, p: Auth, rt: Rt, page: Page, action: str | None = None) -> PageOf[AuditPublic]:
    with rt.tx() as s:
        rows, total = offering_audit.events(s, p, offering_id, action=action, limit=page.limit, offset=page.offset)
        return PageOf[AuditPublic].build([AuditPublic.model_validate(r) for r in rows], total, page)


# -- version metadata and validation ----------------------------------------------------------


@router.put(
    "/v1/offerings/{offering_id}/versions/{number}/metadata",
    response_model=VersionPublic,
    summary="Declare a version's metrics, notes, parent and evaluation set: re-validates it (write)",
)
def set_metadata(
    offering_id: str, number: int, body: VersionMetadata, p: Auth, rt: Rt, request: Request
) -> VersionPublic:
    p.require("provider")
    who = actor_of(p, request)
    raw = body.model_dump(exclude_none=True)
    if body.evaluation is not None:
        raw["evaluation"] = {"x": body.evaluation.x, "y": body.evaluation.y}
    meta = validation.parse_meta(raw, rt.settings)  # bounds first: a 422 decrypts nothing
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id)
        v = validation.get_version(s, off.id, number)
        art = validation.model_artifact(s, v)
        if art is None:
            raise Conflict(f"version {number} has no stored model artifact")
        s.expunge(art)
        fmt, info = v.format, dict(v.info)
        audit.emit(s, who, "artifact.decrypt", target=art.id, detail={"purpose": "validate", "version": v.id})
    plaintext = catalog.decrypt_artifact(rt, art)
    meta, report = validation.evaluate(plaintext, fmt, info, raw, rt.settings)
    del plaintext
    with rt.tx() as s:
        v = validation.get_version(s, offering_id, number)
        v.meta, v.validation = meta, report
        v.validation = validation.final_report(v, rt.settings)
        audit.emit(
            s,
            who,
            "offering.version.validate",
            target=f"{offering_id}/v{number}",
            detail={"status": v.validation["status"] if v.validation else None},
        )
        s.flush()
        return VersionPublic.model_validate(v)


@router.get(
    "/v1/offerings/{offering_id}/versions/{number}/validation",
    response_model=dict[str, Any],
    summary="A version's validation report (whoever may read the offering)",
)
def get_validation(offering_id: str, number: int, p: Auth, rt: Rt) -> dict[str, Any]:
    with rt.tx() as s:
        off = catalog.get_visible(s, p, offering_id)
        v = validation.get_version(s, off.id, number)
        rep = validation.final_report(v, rt.settings) or {"status": "unknown", "reason": "", "checks": []}
        return {"offering_id": off.id, "version": v.number, "meta": v.meta, **rep}
