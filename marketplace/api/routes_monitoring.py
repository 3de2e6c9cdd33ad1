"""Monitoring routes: ``GET /metrics`` (Prometheus) and ``/v1/monitoring/*`` (adoption, latency).

``/metrics`` is not API (no API key; not in the OpenAPI document). It is guarded by
``SOM_METRICS_TOKEN``: when set, a scrape must send ``Authorization: Bearer <token>`` (401
otherwise); when unset, only loopback clients may scrape (403 otherwise). The reports are for a
provider (its own offerings, 404 for any other), a consumer (its own contracts) and compliance
(the marketplace).
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import Auth, Rt
from marketplace.errors import Forbidden, Unauthenticated
from marketplace.runtime import Runtime
from marketplace.services import monitoring, monitoring_query

__all__ = ["metrics", "mount_metrics", "router"]

router = APIRouter(prefix="/v1/monitoring", tags=["monitoring"])

From = Annotated[
    datetime | None, Query(alias="from", description="Start (ISO 8601; default: a step-dependent span before `to`).")
]
To = Annotated[datetime | None, Query(description="End (ISO 8601; default now).")]
StepQ = Annotated[
    monitoring_query.Step, Query(description="Bucket size: minute (max 31 days), hour (366), day (3660).")
]


def _check_scraper(request: Request, rt: Runtime) -> None:
    token = rt.settings.metrics_token
    if token is not None and token.get_secret_value():
        auth = request.headers.get("authorization", "")
        scheme, _, presented = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token.get_secret_value().encode()
        ):
            raise Unauthenticated(
                "GET /metrics needs Authorization: Bearer <SOM_METRICS_TOKEN>", headers={"WWW-Authenticate": "Bearer"}
            )
        return
    if not monitoring.is_loopback(request.client.host if request.client else None):
        raise Forbidden("GET /metrics answers loopback clients only; set SOM_METRICS_TOKEN to scrape from elsewhere")


def metrics(request: Request, rt: Rt) -> Response:
    _check_scraper(request, rt)
    return Response(monitoring.exposition(), media_type=monitoring.CONTENT_TYPE)


@router.get("/offerings", summary="Your offerings with their totals (provider)")
async def offerings(
    p: Auth, rt: Rt, frm: From = None, to: To = None, step: StepQ = monitoring_query.Step.DAY
) -> dict[str, Any]:
    win = monitoring_query.window(frm, to, step)
    return await run_in_threadpool(monitoring_query.offerings_summary, rt, p, win)


@router.get("/offerings/{offering_id}", summary="Adoption and latency of one of your offerings (provider)")
async def offering(
    p: Auth,
    rt: Rt,
    offering_id: Annotated[str, Path(max_length=40)],
    frm: From = None,
    to: To = None,
    step: StepQ = monitoring_query.Step.HOUR,
    version: Annotated[int | None, Query(ge=0, le=2**31 - 1, description="Only this version.")] = None,
) -> dict[str, Any]:
    win = monitoring_query.window(frm, to, step)
    return await run_in_threadpool(monitoring_query.offering_report, rt, p, offering_id, win, version=version)


@router.get("/contracts", summary="Your usage and latency per contract (consumer)")
async def contracts(
    p: Auth, rt: Rt, frm: From = None, to: To = None, step: StepQ = monitoring_query.Step.HOUR
) -> dict[str, Any]:
    win = monitoring_query.window(frm, to, step)
    return await run_in_threadpool(monitoring_query.contracts_report, rt, p, win)


@router.get("/marketplace", summary="Marketplace-wide usage and latency (compliance, admin)")
async def marketplace(
    p: Auth, rt: Rt, frm: From = None, to: To = None, step: StepQ = monitoring_query.Step.HOUR
) -> dict[str, Any]:
    p.require("compliance", "admin")
    win = monitoring_query.window(frm, to, step)
    return await run_in_threadpool(monitoring_query.marketplace_report, rt, p, win)


def mount_metrics(app: FastAPI) -> None:
    """``GET /metrics`` (a route of its own: not part of the API document). The background flusher
    of latency aggregates and the adoption roll-up is started by :func:`marketplace.api.app.create_app`."""
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
