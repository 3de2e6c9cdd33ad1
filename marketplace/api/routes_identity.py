"""Organisations, API keys, whoami."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import select

from marketplace.api.deps import AnyAuth, Auth, Page, Rt, actor_of
from marketplace.api.schemas import (
    KeyCreate,
    KeyCreated,
    KeyPublic,
    OrgCreate,
    OrgPublic,
    PageOf,
    WhoAmI,
    WhoAmIUser,
)
from marketplace.db.models import ApiKey, Org
from marketplace.db.paging import page_scalars
from marketplace.errors import Forbidden, NotFound
from marketplace.services import audit
from marketplace.services.identity import create_key, create_org, revoke_key
from marketplace.services.sso import teams_of, user_of_principal

router = APIRouter(prefix="/v1", tags=["identity"])


@router.get("/whoami", response_model=WhoAmI, summary="The calling key, its organisation and roles")
def whoami(p: AnyAuth, rt: Rt) -> WhoAmI:
    with rt.tx() as s:
        org = s.get(Org, p.org_id)
        u = user_of_principal(s, p)
        user = WhoAmIUser(id=u.id, email=u.email, name=u.name, teams=teams_of(s, u.id)) if u else None
        return WhoAmI(
            key_id=p.key_id, org_id=p.org_id, org_name=org.name if org else "", roles=sorted(p.roles), user=user
        )


@router.post("/orgs", response_model=OrgPublic, status_code=201, summary="Create an organisation (admin)")
def create_organisation(body: OrgCreate, p: Auth, rt: Rt, request: Request) -> OrgPublic:
    p.require("admin")
    with rt.tx() as s:
        org = create_org(s, body.name)
        audit.emit(s, actor_of(p, request), "org.create", target=org.id, detail={"name": org.name})
        return OrgPublic.model_validate(org)


@router.get("/orgs", response_model=PageOf[OrgPublic], summary="List organisations (admin: all; others: own)")
def list_orgs(p: Auth, rt: Rt, page: Page) -> PageOf[OrgPublic]:
    with rt.tx() as s:
        stmt = select(Org) if p.has("admin") else select(Org).where(Org.id == p.org_id)
        rows, total = page_scalars(s, stmt.order_by(Org.created_at, Org.id), page)
        return PageOf[OrgPublic].build([OrgPublic.model_validate(r) for r in rows], total, page)


@router.get("/orgs/{org_id}", response_model=OrgPublic, summary="One organisation (own, or any for admin)")
def get_org(org_id: str, p: Auth, rt: Rt, request: Request) -> OrgPublic:
    with rt.tx() as s:
        org = s.get(Org, org_id)
        if org is None or (org.id != p.org_id and not p.has("admin")):
            raise NotFound(f"organisation {org_id} not found", denied=org_id)
        return OrgPublic.model_validate(org)


@router.post(
    "/orgs/{org_id}/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Create an API key (admin; or a member granting at most its own roles)",
)
def create_api_key(org_id: str, body: KeyCreate, p: Auth, rt: Rt, request: Request) -> KeyCreated:
    with rt.tx() as s:
        if not p.has("admin"):
            if org_id != p.org_id or s.get(Org, org_id) is None:
                raise NotFound(f"organisation {org_id} not found", denied=org_id)
            extra = set(body.roles) - set(p.roles)
            if extra:
                raise Forbidden(f"you cannot grant roles you do not hold: {sorted(extra)}", denied=org_id)
        if p.key_id.startswith(
            "usr_"
        ):  # a signed-in user (SSO session): the key is the user's; it stops with their roles
            row, plaintext = create_key(
                s, org_id=org_id, roles=list(body.roles), name=body.name, ttl_days=body.ttl_days, user_id=p.key_id
            )
        else:
            row, plaintext = create_key(
                s, org_id=org_id, roles=list(body.roles), name=body.name, ttl_days=body.ttl_days, created_by=p.key_id
            )
        who = actor_of(p, request)
        audit.emit(s, who, "key.create", target=row.id, detail={"org": org_id, "prefix": row.prefix})
        audit.emit(s, who, "role.grant", target=row.id, detail={"roles": row.roles})
        return KeyCreated(**KeyPublic.model_validate(row).model_dump(), key=plaintext)


@router.get("/keys", response_model=PageOf[KeyPublic], summary="API keys of your organisation (admin: ?org_id=)")
def list_keys(p: Auth, rt: Rt, page: Page, org_id: str | None = None) -> PageOf[KeyPublic]:
    with rt.tx() as s:
        target = org_id if (org_id and p.has("admin")) else p.org_id
        stmt = select(ApiKey).where(ApiKey.org_id == target)
        rows, total = page_scalars(s, stmt.order_by(ApiKey.created_at, ApiKey.id), page)
        return PageOf[KeyPublic].build([KeyPublic.model_validate(r) for r in rows], total, page)


@router.delete("/keys/{key_id}", response_model=KeyPublic, summary="Revoke an API key")
def revoke_api_key(key_id: str, p: Auth, rt: Rt, request: Request) -> KeyPublic:
    with rt.tx() as s:
        row = s.get(ApiKey, key_id)
        if row is None or (row.org_id != p.org_id and not p.has("admin")):
            raise NotFound(f"key {key_id} not found", denied=key_id)
        if not (p.has("admin") or row.id == p.key_id or set(row.roles) <= set(p.roles)):
            raise Forbidden("you can revoke only keys whose roles you hold")
        below = revoke_key(s, row)
        who = actor_of(p, request)
        audit.emit(s, who, "key.revoke", target=row.id, detail={"org": row.org_id})
        for child in below:  # the keys it created, recursively
            audit.emit(s, who, "key.revoke", target=child.id, detail={"org": child.org_id, "cascade_from": row.id})
        return KeyPublic.model_validate(row)
