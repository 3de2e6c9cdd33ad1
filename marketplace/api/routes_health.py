"""Liveness, version, whether custom-job code can be jailed here (``jail``: ``ok``,
``unavailable`` or ``unsafe_unjailed``; see docs/jobs.md), and whether this process can unwrap
the data keys in the database (``kek``: ``ok`` or ``cannot_unwrap``, then HTTP 503:
:mod:`marketplace.services.keyhealth`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

import marketplace
from marketplace.api.deps import Rt
from marketplace.api.errors import error_body
from marketplace.compute.jail import status
from marketplace.services.keyhealth import KekStatus, kek_status

router = APIRouter(prefix="/v1", tags=["health"])


@router.get(
    "/health",
    summary="Liveness: the API answers, the DB is reachable, the data keys unwrap",
    responses={
        503: {
            "description": "The data keys in the database do not unwrap here (`kek`: `cannot_unwrap`).",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    },
)
def health(rt: Rt) -> Any:
    with rt.engine.connect() as c:
        c.execute(text("SELECT 1"))
    kek, _failed = kek_status(rt)  # which KEK failed is logged, not told to an unauthenticated caller
    body: dict[str, Any] = {
        "status": "ok",
        "version": marketplace.__version__,
        "jail": status(rt.settings.jail_config()),
        "kek": kek,
    }
    if kek is KekStatus.OK:
        return body
    body["status"] = "degraded"
    body.update(
        error_body(
            "kek_unavailable",
            "some data keys do not unwrap with this server's key provider "
            "(a rotation that lost a key, or the wrong key directory / SOM_KEK): restore the keyring "
            "from the key directory's backup (docs/deployment.md, 'Key rotation')",
        )
    )
    return JSONResponse(body, status_code=503)
