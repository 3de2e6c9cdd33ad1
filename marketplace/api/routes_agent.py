"""Provider agents: agent keys (``/v1/agents``) and the agent protocol (``/v1/agent``).

The agent connects outbound only: hello (register its sealing key), seal-key (the provider's
signed statements vouching for that key, which consumers verify before sealing), long-poll ``lease`` (up to
~20 s), fetch the work's payload, post the result (octet-stream) or a failure, heartbeat. Agent
keys (kind="agent") are confined to ``/v1/agent/*`` (and whoami) where the principal is resolved:
only the agent protocol routes below take :data:`~marketplace.api.deps.AnyAuth`; every other route
takes ``Auth``, which refuses agent keys, so a key on a provider's machine cannot act as the provider.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import AnyAuth, Auth, Rt, actor_of
from marketplace.api.jsonlimits import BoundedJson
from marketplace.api.middleware import BodyLimit, body_limit
from marketplace.api.schemas import KeyCreated, Strict
from marketplace.db.base import utcnow
from marketplace.db.models import ApiKey
from marketplace.db.models_jobs import Agent
from marketplace.errors import NotFound, UnsupportedMediaType
from marketplace.runtime import Runtime
from marketplace.services import agents, dispatch, he_plans

router = APIRouter(prefix="/v1", tags=["agents"])

AgentId = Annotated[str, Header(alias="X-Som-Agent", max_length=40, description="The id `hello` returned.")]
_BINARY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_BINARY_OUT: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}
}


class AgentKeyCreate(Strict):
    offering_ids: list[str] = Field(min_length=1, max_length=100)
    name: str = Field(default="agent", max_length=200)
    ttl_days: int = Field(default=365, ge=1, le=3650)


class AgentHello(Strict):
    seal_public: str = Field(max_length=80, description="x25519:<base64>; inputs are sealed to it")
    name: str = Field(default="", max_length=200)
    capabilities: list[Annotated[str, Field(max_length=40)]] = Field(
        default_factory=lambda: list(agents.CAPABILITIES), max_length=32
    )
    offering_ids: list[str] | None = None
    version: str = Field(default="", max_length=40)


class AgentPublic(BaseModel):
    id: str
    org_id: str
    key_id: str
    name: str
    offering_ids: list[str]
    capabilities: list[str]
    seal_public: str
    vouched: list[str] = Field(default_factory=list, description="Offerings whose provider vouched for seal_public")
    online: bool
    last_seen_at: datetime
    created_at: datetime


class HelloOut(AgentPublic):
    lease_seconds: float
    heartbeat_seconds: float
    lease_wait_max: float


class SealStatements(Strict):
    statements: list[dict[str, Any]] = Field(
        min_length=1, max_length=100, description="Signed som.seal-key/v1 statements."
    )


class Heartbeat(Strict):
    holding: list[str] = Field(default_factory=list, max_length=1000)


class LeaseRequest(Strict):
    wait: float = Field(default=dispatch.LEASE_WAIT_MAX, ge=0, le=dispatch.LEASE_WAIT_MAX)


class WorkFailure(Strict):
    reason: str = Field(default="error", max_length=40)
    message: str = Field(default="", max_length=4000)


class PlanIn(Strict):
    plan: dict[str, Any]
    report: BoundedJson | None = None


def _public(rt: Runtime, a: Agent) -> dict[str, Any]:
    online = a.stopped_at is None and a.last_seen_at >= utcnow() - timedelta(seconds=rt.settings.agent_offline_seconds)
    return {
        "id": a.id,
        "org_id": a.org_id,
        "key_id": a.key_id,
        "name": a.name,
        "offering_ids": a.offering_ids,
        "capabilities": a.capabilities,
        "seal_public": a.seal_public,
        "online": online,
        "vouched": sorted((a.seal_statements or {}).keys()),
        "last_seen_at": a.last_seen_at,
        "created_at": a.created_at,
    }


# -- for providers ----------------------------------------------------------------------------


@router.post("/agents/keys", response_model=KeyCreated, status_code=201, summary="Create an agent key (provider)")
def create_agent_key(body: AgentKeyCreate, p: Auth, rt: Rt, request: Request) -> KeyCreated:
    with rt.tx() as s:
        row, plaintext = agents.create_agent_key(
            s, p, offering_ids=body.offering_ids, name=body.name, ttl_days=body.ttl_days, who=actor_of(p, request)
        )
        return KeyCreated.model_validate(_key_created(row, plaintext))


def _key_created(row: ApiKey, plaintext: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "org_id": row.org_id,
        "prefix": row.prefix,
        "roles": row.roles,
        "name": row.name,
        "kind": row.kind,
        "offering_ids": row.offering_ids,
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "key": plaintext,
    }


@router.get("/agents", response_model=list[AgentPublic], summary="Your organisation's agents (provider)")
def list_agents(p: Auth, rt: Rt, offering_id: str | None = None, online_only: bool = False) -> list[AgentPublic]:
    p.require("provider")
    with rt.tx() as s:
        rows = s.scalars(select(Agent).where(Agent.org_id == p.org_id).order_by(Agent.last_seen_at.desc()))
        out = [AgentPublic(**_public(rt, a)) for a in rows if offering_id is None or offering_id in a.offering_ids]
    return [a for a in out if a.online or not online_only]


# -- the agent protocol -------------------------------------------------------------------------


@router.post("/agent/hello", response_model=HelloOut, summary="An agent process starts (agent key)")
def hello(body: AgentHello, p: AnyAuth, rt: Rt, request: Request) -> HelloOut:
    a = agents.hello(
        rt,
        p,
        name=body.name,
        seal_public=body.seal_public,
        capabilities=body.capabilities,
        offering_ids=body.offering_ids,
        who=actor_of(p, request),
    )
    lease = rt.settings.agent_lease_seconds
    return HelloOut(
        **_public(rt, a),
        lease_seconds=lease,
        heartbeat_seconds=max(0.2, min(lease, rt.settings.agent_offline_seconds) / 3),
        lease_wait_max=dispatch.LEASE_WAIT_MAX,
    )


@router.post("/agent/seal-key", summary="Register the provider's signed statements vouching for the sealing key")
def seal_key(body: SealStatements, p: AnyAuth, rt: Rt, request: Request, agent_id: AgentId) -> dict[str, Any]:
    return agents.register_seal_statements(rt, p, agent_id, body.statements, who=actor_of(p, request))


@router.post("/agent/heartbeat", summary="Alive; extend the leases of the work held")
def heartbeat(body: Heartbeat, p: AnyAuth, rt: Rt, agent_id: AgentId) -> dict[str, Any]:
    return agents.heartbeat(rt, p, agent_id, holding=body.holding)


@router.post("/agent/bye", status_code=204, summary="The agent stops (goes offline now)")
def bye(p: AnyAuth, rt: Rt, request: Request, agent_id: AgentId) -> Response:
    agents.bye(rt, p, agent_id, actor_of(p, request))
    return Response(status_code=204)


@router.post(
    "/agent/lease",
    summary="Long-poll for work (up to `wait` s): 200 with a work item, or 204",
    responses={204: {"description": "no work within the wait"}},
)
def lease(p: AnyAuth, rt: Rt, agent_id: AgentId, body: LeaseRequest | None = None) -> Any:
    item = dispatch.lease(rt, p, agent_id, wait=(body or LeaseRequest()).wait)
    if item is None:
        return Response(status_code=204)
    return item


@router.get(
    "/agent/work/{work_id}/payload", summary="The work's input (sealed job input or HE request)", responses=_BINARY_OUT
)
def work_payload(work_id: str, p: AnyAuth, rt: Rt, agent_id: AgentId) -> Response:
    data = dispatch.payload(rt, p, agent_id, work_id)
    return Response(content=data, media_type="application/octet-stream")


@router.post(
    "/agent/work/{work_id}/result",
    summary="Post the result (octet-stream)",
    openapi_extra=_BINARY,
    dependencies=[body_limit(BodyLimit.BINARY)],
)
async def work_result(work_id: str, p: AnyAuth, rt: Rt, request: Request, agent_id: AgentId) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype != "application/octet-stream":
        raise UnsupportedMediaType(f"send the result as application/octet-stream, not {ctype}")
    data = await request.body()
    return await run_in_threadpool(dispatch.post_result, rt, p, agent_id, work_id, data)


@router.post("/agent/work/{work_id}/fail", summary="The work cannot be done (the reason goes to the consumer)")
def work_fail(work_id: str, body: WorkFailure, p: AnyAuth, rt: Rt, agent_id: AgentId) -> dict[str, Any]:
    return dispatch.post_failure(rt, p, agent_id, work_id, reason=body.reason, message=body.message)


@router.get("/agent/keysets/{keyset_id}", summary="A consumer's public HE context (cache it)", responses=_BINARY_OUT)
def agent_keyset(keyset_id: str, p: AnyAuth, rt: Rt) -> Response:
    return Response(content=dispatch.load_keyset(rt, p, keyset_id), media_type="application/octet-stream")


@router.post("/agent/offerings/{offering_id}/plan", summary="Publish the PUBLIC HE plan compiled beside the weights")
def agent_plan(offering_id: str, body: PlanIn, p: AnyAuth, rt: Rt, request: Request) -> dict[str, Any]:
    offerings = agents.require_agent(p)
    if offering_id not in offerings:
        raise NotFound(f"offering {offering_id} not found")
    return dict(he_plans.set_agent_plan(rt, p, offering_id, body.plan, body.report, who=actor_of(p, request)))
