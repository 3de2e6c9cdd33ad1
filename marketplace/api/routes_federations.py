"""Federated training (``/v1/federations``): the provider opens and starts a federation; holders
of a ``federated`` contract join and run the participant loop (``som agent --federation``):
long-poll ``messages/next`` for the coordinator's Flower message, post the ClientApp's reply.
Non-participants get 404 for everything of a federation (its existence is not disclosed).
"""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import Auth, Rt, actor_of
from marketplace.api.schemas import Strict
from marketplace.db.models_federated import Federation, FederationParticipant
from marketplace.errors import Conflict, Invalid, NotFound, PayloadTooLarge, UnsupportedMediaType
from marketplace.federated.errors import ReplyRefused
from marketplace.services import federations, ledger

router = APIRouter(prefix="/v1/federations", tags=["federations"])

WAIT_MAX = 20.0
_BINARY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class FederationCreate(Strict):
    offering_id: str = Field(max_length=40)
    name: str = Field(default="", max_length=200)
    parent_version_id: str | None = Field(default=None, max_length=40)
    recipe: dict[str, Any]
    terms: dict[str, Any] = Field(default_factory=dict)


class JoinIn(Strict):
    samples: int = Field(ge=0, le=10**9, description="Training rows the participant holds (declared).")


class PollIn(Strict):
    wait: float = Field(default=WAIT_MAX, ge=0, le=WAIT_MAX)


class FederationOut(BaseModel):
    id: str
    offering_id: str
    org_id: str
    name: str
    parent_version_id: str
    recipe: dict[str, Any]
    terms: dict[str, Any]
    status: str
    rounds_done: int
    epsilon_spent: float
    result_version_id: str | None
    error: str | None
    participants: list[dict[str, Any]]
    created_at: datetime


class RoundOut(BaseModel):
    number: int
    participants: list[str]
    metrics: dict[str, Any]
    epsilon: float
    ledger_indexes: list[int]
    completed_at: datetime


def _part(pt: FederationParticipant) -> dict[str, Any]:
    return {
        "org_id": pt.org_id,
        "node_id": pt.node_id,
        "samples": pt.samples,
        "rounds": pt.rounds,
        "units": pt.units,
        "credit_minor": pt.credit_minor,
        "epsilon_spent": pt.epsilon_spent,
    }


def _coordinator() -> Any:
    # Imported on first use (start-up cost): Flower takes seconds to load, and a server that runs no federation
    # should not pay for it at start.
    from marketplace.federated import coordinator

    return coordinator


def _out(f: Federation, parts: list[FederationParticipant]) -> FederationOut:
    return FederationOut(
        id=f.id,
        offering_id=f.offering_id,
        org_id=f.org_id,
        name=f.name,
        parent_version_id=f.parent_version_id,
        recipe=f.recipe,
        terms=f.terms,
        status=f.status,
        rounds_done=f.rounds_done,
        epsilon_spent=f.epsilon_spent,
        result_version_id=f.result_version_id,
        error=f.error,
        participants=[_part(p) for p in parts],
        created_at=f.created_at,
    )


@router.post("", response_model=FederationOut, status_code=201, summary="Open a federation on an offering (provider)")
def create(body: FederationCreate, p: Auth, rt: Rt, request: Request) -> FederationOut:
    with rt.tx() as s:
        f = federations.create(
            s,
            p,
            offering_id=body.offering_id,
            recipe=body.recipe,
            terms=body.terms,
            name=body.name,
            parent_version_id=body.parent_version_id,
            who=actor_of(p, request),
        )
        return _out(f, [])


@router.get("", response_model=list[FederationOut], summary="Federations your organisation runs or takes part in")
def list_federations(p: Auth, rt: Rt) -> list[FederationOut]:
    with rt.tx() as s:
        out = []
        for f in federations.list_for(s, p):
            mine = federations.participant_of(s, p, f.id, required=False) if f.org_id != p.org_id else None
            out.append(_out(f, federations.participants(s, f.id) if mine is None else [mine]))
        return out


@router.get("/{fed_id}", response_model=FederationOut, summary="A federation (its provider or a participant)")
def status(fed_id: str, p: Auth, rt: Rt) -> FederationOut:
    with rt.tx() as s:
        f, mine = federations.get_for(s, p, fed_id)
        parts = federations.participants(s, fed_id) if mine is None else [mine]  # participants see only themselves
        return _out(f, parts)


@router.post("/{fed_id}/join", summary="Join with an active contract in mode 'federated'")
def join(fed_id: str, body: JoinIn, p: Auth, rt: Rt, request: Request) -> dict[str, Any]:
    with rt.tx() as s:
        pt = federations.join(s, p, fed_id, samples=body.samples, who=actor_of(p, request))
        return {"federation_id": fed_id, **_part(pt)}


@router.post("/{fed_id}/start", status_code=202, summary="Start the rounds (provider)")
def start(fed_id: str, p: Auth, rt: Rt) -> dict[str, Any]:
    p.require("provider")
    with rt.tx() as s:
        f, mine = federations.get_for(s, p, fed_id)
        if mine is not None or f.org_id != p.org_id:
            raise NotFound(f"federation {fed_id} not found")
        if f.status != "open":
            raise Conflict(f"federation {fed_id} is {f.status}")
    _coordinator().start(rt, fed_id)
    return {"id": fed_id, "status": "running"}


@router.get("/{fed_id}/rounds", response_model=list[RoundOut], summary="Completed rounds")
def rounds(fed_id: str, p: Auth, rt: Rt) -> list[RoundOut]:
    with rt.tx() as s:
        federations.get_for(s, p, fed_id)
        return [
            RoundOut(
                number=r.number,
                participants=r.participants,
                metrics=r.metrics,
                epsilon=r.epsilon,
                ledger_indexes=r.ledger_indexes,
                completed_at=r.completed_at,
            )
            for r in federations.rounds_of(s, fed_id)
        ]


@router.get("/{fed_id}/receipts", summary="Ledger receipts of your organisation's contributions")
def receipts(fed_id: str, p: Auth, rt: Rt) -> list[dict[str, Any]]:
    with rt.tx() as s:
        pt = federations.participant_of(s, p, fed_id)
        assert pt is not None
        idx = [i for r in federations.rounds_of(s, fed_id) if pt.org_id in r.participants for i in r.ledger_indexes]
    out = [ledger.receipt(rt, i) for i in idx]
    return [r for r in out if json.loads(base64.b64decode(r["leaf"])).get("org") == pt.org_id]


@router.post(
    "/{fed_id}/messages/next",
    summary="Long-poll the coordinator's next Flower message (participant)",
    responses={204: {"description": "nothing within the wait"}},
)
def next_message(fed_id: str, p: Auth, rt: Rt, body: PollIn | None = None) -> Response:
    with rt.tx() as s:
        f, _ = federations.get_for(s, p, fed_id)
        pt = federations.active_participant(s, p, fed_id)
        node, state = pt.node_id, f.status
    headers = {"X-Som-Federation-Status": state}
    if state not in federations.OPEN:
        return Response(status_code=204, headers=headers)
    data = _coordinator().mailbox_for(rt, fed_id).next_for(node, (body or PollIn()).wait)
    if data is None:
        return Response(status_code=204, headers=headers)
    return Response(content=data, media_type="application/octet-stream", headers=headers)


@router.post(
    "/{fed_id}/replies", status_code=202, summary="Post the ClientApp's reply (participant)", openapi_extra=_BINARY
)
async def reply(fed_id: str, p: Auth, rt: Rt, request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype != "application/octet-stream":
        raise UnsupportedMediaType(f"send the reply as application/octet-stream, not {ctype}")
    data = await request.body()

    def _node() -> int:
        with rt.tx() as s:
            federations.get_for(s, p, fed_id)
            return federations.active_participant(s, p, fed_id).node_id

    node = await run_in_threadpool(_node)
    box = _coordinator().mailbox_for(rt, fed_id)
    if len(data) > box.max_reply_bytes:
        raise PayloadTooLarge(f"reply of {len(data)} bytes exceeds {box.max_reply_bytes}")
    try:
        await run_in_threadpool(box.reply, node, data)
    except ReplyRefused as e:
        raise Invalid(f"reply refused: {e}") from e
    return {"accepted": True}
