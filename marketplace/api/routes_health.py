"""Liveness, version, and whether custom-job code can be jailed here (``jail``: ``ok``,
``unavailable`` or ``unsafe_unjailed``; see docs/jobs.md)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

import marketplace
from marketplace.api.deps import Rt
from marketplace.compute.jail import status

router = APIRouter(prefix="/v1", tags=["health"])


@router.get("/health", summary="Liveness: the API answers and the DB is reachable")
def health(rt: Rt) -> dict[str, str]:
    with rt.engine.connect() as c:
        c.execute(text("SELECT 1"))
    return {"status": "ok", "version": marketplace.__version__, "jail": status(rt.settings.jail_config())}
