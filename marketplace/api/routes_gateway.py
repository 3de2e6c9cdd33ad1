"""Gateway routes: plaintext inference (consumer) and the agents' gateway channel.

``POST /v1/offerings/{id}/predict`` takes ``application/json`` (``{"rows": [[...], ...]}``) or
``text/csv`` and answers predictions in the same format (or the one ``Accept`` asks for) with
``X-Som-Receipt``, ``X-Som-Usage-Id``, ``X-Som-Units`` and ``Server-Timing`` (queue, model,
metering, total in ms). ``Idempotency-Key`` is required, as for every metered request.

``POST /v1/agent/gateway/exchange`` (agent keys): post the answers to the requests taken last
time, receive the next ones (long-poll up to ``wait`` s). See :mod:`marketplace.services.gateway_hub`.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request, Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import AnyAuth, Auth, Rt, actor_of
from marketplace.api.routes_agent import AgentId
from marketplace.api.schemas import Strict
from marketplace.errors import MarketplaceError
from marketplace.runtime import Runtime
from marketplace.services import agents, dispatch, gateway, gateway_input, metering
from marketplace.services.gateway_hub import hub_of
from marketplace.services.identity import Principal

router = APIRouter(prefix="/v1", tags=["gateway"])

_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["rows"],
                    "additionalProperties": False,
                    "properties": {"rows": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
                }
            },
            "text/csv": {"schema": {"type": "string"}},
        },
    }
}
_OUT: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/json": {}, "text/csv": {"schema": {"type": "string"}}},
        "description": "Predictions; the usage receipt is in X-Som-Receipt",
    },
}


def _accept(header: str | None, media: str) -> str:
    h = (header or "").lower()
    if "text/csv" in h and "application/json" not in h:
        return gateway_input.CSV
    if "application/json" in h and "text/csv" not in h:
        return gateway_input.JSON
    return media


@router.post(
    "/offerings/{offering_id}/predict",
    summary="Plaintext inference under a gateway contract (consumer; metered per row)",
    openapi_extra=_BODY,
    responses=_OUT,
)
async def predict(
    offering_id: Annotated[str, Path(max_length=64)],
    p: Auth,
    rt: Rt,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    contract_id: Annotated[str | None, Header(alias="X-Som-Contract", max_length=64)] = None,
) -> Response:
    t0 = time.perf_counter()
    try:
        media = gateway_input.media_type_of(request.headers.get("content-type"))
        accept = _accept(request.headers.get("accept"), media)
        body = await request.body()
        ans = await run_in_threadpool(
            gateway.predict,
            rt,
            p,
            offering_id,
            body,
            media_type=media,
            accept=accept,
            idempotency_key=idempotency_key,
            contract_id=contract_id,
            who=actor_of(p, request),
        )
    except MarketplaceError as e:
        if "Server-Timing" not in e.headers:
            e.headers = {
                **e.headers,
                "Server-Timing": gateway.server_timing({"total": (time.perf_counter() - t0) * 1e3}),
            }
        raise
    timing = {**ans.timing, "total": (time.perf_counter() - t0) * 1e3}
    headers = {"X-Som-Units": str(ans.units), "Server-Timing": gateway.server_timing(timing)}
    if ans.version is not None:
        headers["X-Som-Version"] = str(ans.version)
    if ans.usage_id:
        headers["X-Som-Usage-Id"] = ans.usage_id
    if ans.receipt:
        headers["X-Som-Receipt"] = metering.receipt_header(ans.receipt)
    if ans.replay:
        headers["X-Som-Replay"] = "true"
    return Response(content=ans.body, media_type=ans.media_type, headers=headers)


# -- the agents' side ----------------------------------------------------------------------


class AnswerIn(Strict):
    id: str = Field(max_length=40)
    outputs: list[list[float]] | None = Field(default=None, max_length=100_000)
    error: str | None = Field(default=None, max_length=500)
    model_ms: float = Field(default=0.0, ge=0, le=3_600_000)


class ExchangeIn(Strict):
    answers: list[AnswerIn] = Field(default_factory=list, max_length=1024)
    wait: float = Field(default=dispatch.LEASE_WAIT_MAX, ge=0, le=dispatch.LEASE_WAIT_MAX)
    max: int = Field(default=64, ge=1, le=1024, description="Most requests to take")
    input_dims: dict[str, int] = Field(default_factory=dict, max_length=100, description="offering -> input width")


_known: dict[tuple[str, str], frozenset[str]] = {}
_known_lock = threading.Lock()


def _agent_offerings(rt: Runtime, p: Principal, agent_id: str) -> frozenset[str]:
    """The offerings this agent instance (of this key) serves: checked once per (key, agent)."""
    allowed = agents.require_agent(p)
    k = (p.key_id, agent_id)
    with _known_lock:
        hit = _known.get(k)
    if hit is not None:
        return hit
    with rt.tx() as s:
        a = agents.agent_of(s, p, agent_id)
        served = frozenset(a.offering_ids or []) & allowed
    with _known_lock:
        if len(_known) > 10_000:
            _known.clear()
        _known[k] = served
    return served


@router.post(
    "/agent/gateway/exchange", summary="Answer gateway requests taken; long-poll for the next ones (agent key)"
)
def exchange(body: ExchangeIn, p: AnyAuth, rt: Rt, agent_id: AgentId) -> dict[str, Any]:
    offerings = _agent_offerings(rt, p, agent_id)
    hub = hub_of(rt)
    if body.input_dims:
        hub.announce(offerings, body.input_dims)
    accepted = 0
    for a in body.answers:
        accepted += hub.answer(agent_id, offerings, a.id, outputs=a.outputs, error=a.error, model_s=a.model_ms / 1e3)
    got = hub.take(agent_id, offerings, wait=body.wait, limit=body.max)
    return {
        "accepted": accepted,
        "requests": [{"id": r.id, "offering_id": r.offering_id, "rows": r.rows.tolist()} for r in got],
    }


class ServerTimingFallback:
    """Adds ``Server-Timing: total`` to gateway responses that were answered before the route
    ran (401 from authentication, 422 from header validation)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).endswith("/predict"):
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()

        async def _send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"server-timing" for k, _ in headers):
                    ms = (time.perf_counter() - t0) * 1e3
                    headers.append((b"server-timing", gateway.server_timing({"total": ms}).encode()))
                    message["headers"] = headers
            await send(message)

        await self.app(scope, receive, _send)
