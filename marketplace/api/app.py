"""The application factory. ``create_app(settings)`` does the work; importing does none.

:data:`ROUTERS` is the table of contents of the HTTP surface: a new feature adds its router
there. Everything with a lifetime (the ledger's checkpointer, the jobs' background threads, the
HE compute pool) is started and stopped in :func:`create_app`'s lifespan, the one place
lifecycles are wired; route modules have no ``setup`` hooks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

import marketplace
from marketplace.api import (
    routes_agent,
    routes_audit,
    routes_auth,
    routes_catalog,
    routes_contracts,
    routes_docs,
    routes_federations,
    routes_gateway,
    routes_he,
    routes_health,
    routes_identity,
    routes_jobs,
    routes_ledger,
    routes_monitoring,
    routes_sharing,
    routes_web,
)
from marketplace.api.admission import AdmissionLimits, AdmissionMiddleware
from marketplace.api.errors import install_error_handlers
from marketplace.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, route_limits
from marketplace.api.middleware_metrics import HttpMetricsMiddleware
from marketplace.api.routes_gateway import ServerTimingFallback
from marketplace.custody import announce
from marketplace.runtime import Runtime
from marketplace.services import jobs, ledger, monitoring_store
from marketplace.settings import Settings, SettingsError

__all__ = ["ROUTERS", "create_app"]

#: Every router of the API, in the order they are included.
ROUTERS: tuple[APIRouter, ...] = (
    routes_health.router,
    routes_identity.router,
    routes_catalog.router,
    routes_sharing.router,
    routes_contracts.router,
    routes_he.router,
    routes_gateway.router,
    routes_jobs.router,
    routes_agent.router,
    routes_federations.router,
    routes_ledger.router,
    routes_audit.router,
    routes_monitoring.router,
    routes_auth.router,
    routes_docs.router,
    routes_web.router,
)


def _configure_logging(rt: Runtime) -> None:
    logger = logging.getLogger("som")
    path = str(rt.log_path)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _lifecycle(rt: Runtime, *, owned: bool) -> tuple[list[Callable[[], None]], list[Callable[[], None]]]:
    """What the lifespan starts (in order) and stops (in reverse order): the jobs' background
    threads, the ledger's checkpointer, the monitoring flusher, the compute executor."""
    flusher = monitoring_store.Flusher(rt, rt.settings.monitoring_flush_seconds)
    on_start = [lambda: jobs.ensure_background(rt), rt.checkpointer.start, flusher.start]
    on_stop = [rt.close] if owned else []
    on_stop += [rt.shutdown_executor, rt.checkpointer.stop, flusher.stop]
    return on_start, on_stop


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app: open the DB (upgrading it), the key provider, the blob store, the routes."""
    rt = runtime or Runtime(settings or Settings())
    _configure_logging(rt)
    custody_notice = announce(rt.settings, rt.key_dir)  # where the keys are; a warning when unsafe
    try:  # a database restored behind what this log already signed must not start (docs/deployment.md)
        ledger.check_on_start(rt)
    except ledger.LedgerIntegrityError as e:
        raise SettingsError(e.message) from e
    on_start, on_stop = _lifecycle(rt, owned=runtime is None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for fn in on_start:
            fn()
        try:
            yield
        finally:
            for fn in reversed(on_stop):
                fn()

    app = FastAPI(
        title="Share-of-Model",
        version=marketplace.__version__,
        description=(
            "Privacy-preserving model marketplace: catalog, contracts, homomorphically encrypted "
            "inference, sealed remote jobs, and a tamper-evident usage ledger. "
            "Authenticate with `Authorization: Bearer som_...`. Errors are "
            '`{"error": {"code", "message"}}`.'
        ),
        lifespan=lifespan,
        docs_url=None,  # served by routes_docs from local files, with the UI's security headers
        redoc_url=None,
    )
    app.state.runtime = rt
    app.state.custody_notice = custody_notice
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    # every path template served, for the metrics' route labels (routers are included lazily)
    app.state.route_paths = tuple(getattr(r, "path", "") for router in ROUTERS for r in router.routes)
    routes_monitoring.mount_metrics(app)  # GET /metrics: Prometheus text, not part of the API document
    routes_auth.configure_oidc(rt, app)  # SSO when SOM_OIDC_ISSUER is set (docs/sso.md)
    routes_docs.mount_assets(app)
    routes_web.mount_ui(app)
    app.add_middleware(ServerTimingFallback)  # gateway answers always carry Server-Timing
    app.add_middleware(BodyLimitMiddleware, limit_for=route_limits(ROUTERS, rt.settings))
    s = rt.settings
    if s.admission_control:  # inside the body limit: a shed request was still given a request id
        limits = AdmissionLimits(
            concurrency=s.admission_compute_concurrency,
            queue=s.admission_queue,
            queue_timeout=s.admission_queue_timeout_seconds,
            retry_after=s.admission_retry_after_seconds,
        )
        app.add_middleware(AdmissionMiddleware, limits=limits)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(HttpMetricsMiddleware)  # outermost: times and counts every answer, 413s too
    return app
