"""The application factory. ``create_app(settings)`` does the work; importing does none.

Routers are discovered: every ``marketplace/api/routes_*.py`` exposes ``router`` and may expose
``setup(rt, app)`` (start background work, register hooks). Features add a module, not an edit here.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType

from fastapi import FastAPI

import marketplace
import marketplace.api as _api
from marketplace.api.admission import AdmissionLimits, AdmissionMiddleware
from marketplace.api.errors import install_error_handlers
from marketplace.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from marketplace.runtime import Runtime
from marketplace.settings import Settings

__all__ = ["create_app", "route_modules"]

BINARY_SUFFIXES = ("/versions", "/infer", "/keysets", "/payload", "/result", "/compile", "/results")


def route_modules() -> list[ModuleType]:
    mods = []
    for m in sorted(pkgutil.iter_modules(_api.__path__), key=lambda m: m.name):
        if m.name.startswith("routes_"):
            mods.append(importlib.import_module(f"marketplace.api.{m.name}"))
    return mods


def _configure_logging(rt: Runtime) -> None:
    logger = logging.getLogger("som")
    path = str(rt.log_path)
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == path for h in logger.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app: open the DB (upgrading it), the key provider, the blob store, the routes."""
    from marketplace.custody import announce

    rt = runtime or Runtime(settings or Settings())
    _configure_logging(rt)
    custody_notice = announce(rt.settings, rt.key_dir)  # where the keys are; a warning when unsafe
    mods = route_modules()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for fn in app.state.on_start:
            fn()
        try:
            yield
        finally:
            for fn in reversed(app.state.on_stop):
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
    app.state.on_start = []
    app.state.on_stop = [rt.close] if runtime is None else []
    install_error_handlers(app)
    for mod in mods:
        app.include_router(mod.router)
    for mod in mods:
        setup = getattr(mod, "setup", None)
        if setup is not None:
            setup(rt, app)

    s = rt.settings

    def limit_for(path: str) -> int:
        if path.endswith(("/infer", "/keysets")):
            return s.max_ciphertext_bytes
        if path.endswith(BINARY_SUFFIXES):
            return max(s.max_upload_bytes, s.max_sealed_bytes) + 1024
        return s.max_request_bytes

    if s.admission_control:  # innermost: a shed request was still given a request id
        limits = AdmissionLimits(
            concurrency=s.admission_compute_concurrency, queue=s.admission_queue,
            queue_timeout=s.admission_queue_timeout_seconds, retry_after=s.admission_retry_after_seconds,
        )
        app.add_middleware(AdmissionMiddleware, limits=limits)
    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(RequestIdMiddleware)
    return app
