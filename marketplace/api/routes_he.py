"""HE inference routes: compile a version, register key sets, run metered encrypted inference.

Ciphertexts and key sets travel as ``application/octet-stream`` (never base64 in JSON). The
usage receipt of an inference comes back in the ``X-Som-Receipt`` header (base64url of its
canonical JSON) with ``X-Som-Usage-Id``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.middleware import BodyLimit, body_limit
from marketplace.api.schemas import PageOf, VersionPublic
from marketplace.errors import PayloadTooLarge, UnsupportedMediaType
from marketplace.services import he, he_plans, keysets

router = APIRouter(prefix="/v1", tags=["he"])

_BINARY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
_BINARY_OUT = {"200": {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


class KeysetPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: str
    org_id: str
    offering_id: str
    contract_id: str
    plan_digest: str
    size: int
    digest: str = Field(description="sha256 of the key set bytes")
    layouts: list[str]
    status: str
    created_at: datetime
    revoked_at: datetime | None
    revoked_reason: str | None


class HEPlanPublic(BaseModel):
    offering_id: str
    hosting: str
    version: int | None
    plan: dict[str, Any]
    plan_digest: str
    report: dict[str, Any] | None


class HEPlanSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan: dict[str, Any]
    report: dict[str, Any] | None = None


def _octet(request: Request) -> None:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if ctype != "application/octet-stream":
        raise UnsupportedMediaType(f"send binary data as application/octet-stream, not {ctype}")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, streamed, refused with 413 as soon as it passes ``limit``."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    return bytes(buf)


@router.post(
    "/offerings/{offering_id}/versions/{number}/compile",
    response_model=VersionPublic,
    summary="Compile a model version for HE inference (provider; body: .npy calibration data)",
    openapi_extra=_BINARY,
    dependencies=[body_limit(BodyLimit.BINARY)],
)
async def compile_version(
    offering_id: str, number: Annotated[int, Path(ge=1, le=2**31 - 1)], p: Auth, rt: Rt, request: Request
) -> VersionPublic:
    p.require("provider")
    _octet(request)
    data = await _read_limited(request, rt.settings.max_upload_bytes)
    v = await run_in_threadpool(
        he_plans.compile_version,
        rt,
        p,
        offering_id,
        number,
        data,
        who=actor_of(p, request),
    )
    return VersionPublic.model_validate(v)


@router.get("/offerings/{offering_id}/he", response_model=HEPlanPublic, summary="The public HE plan and model card")
def get_he_plan(offering_id: str, p: Auth, rt: Rt, request: Request, contract_id: str | None = None) -> HEPlanPublic:
    with rt.tx() as s:
        return HEPlanPublic(**he_plans.get_plan(s, p, offering_id, contract_id))


@router.put(
    "/offerings/{offering_id}/he/plan",
    response_model=HEPlanPublic,
    summary="Publish the HE plan a provider-hosted offering's agent compiled (provider)",
)
def set_he_plan(offering_id: str, body: HEPlanSet, p: Auth, rt: Rt, request: Request) -> HEPlanPublic:
    out = he_plans.set_agent_plan(rt, p, offering_id, body.plan, body.report, who=actor_of(p, request))
    return HEPlanPublic(**out)


@router.post(
    "/keysets",
    response_model=KeysetPublic,
    status_code=201,
    summary="Register a public key set for one of your contracts (consumer; octet-stream)",
    openapi_extra=_BINARY,
    dependencies=[body_limit(BodyLimit.CIPHERTEXT)],
)
async def create_keyset(
    p: Auth,
    rt: Rt,
    request: Request,
    contract_id: Annotated[str | None, Query(max_length=64)] = None,
    offering_id: Annotated[str | None, Query(max_length=40)] = None,
) -> KeysetPublic:
    p.require("consumer")
    _octet(request)
    data = await _read_limited(request, rt.settings.max_ciphertext_bytes)
    out = await run_in_threadpool(
        keysets.create_keyset, rt, p, data, contract_id=contract_id, offering_id=offering_id, who=actor_of(p, request)
    )
    return KeysetPublic(**out)


@router.get("/keysets", response_model=PageOf[KeysetPublic], summary="Your organisation's key sets")
def list_keysets(p: Auth, rt: Rt, page: Page) -> PageOf[KeysetPublic]:
    rows, total = keysets.list_keysets(rt, p, page)
    return PageOf[KeysetPublic].build([KeysetPublic(**r) for r in rows], total, page)


@router.get("/keysets/{keyset_id}", response_model=KeysetPublic, summary="One key set")
def get_keyset(keyset_id: str, p: Auth, rt: Rt, request: Request) -> KeysetPublic:
    return KeysetPublic(**keysets.get_keyset(rt, p, keyset_id))


@router.get(
    "/keysets/{keyset_id}/content",
    summary="The key set bytes (its owner, or the agent serving its offering)",
    responses=_BINARY_OUT,  # type: ignore[arg-type]
)
def keyset_content(keyset_id: str, p: Auth, rt: Rt, request: Request) -> Response:
    data = keysets.keyset_content(rt, p, keyset_id)
    return Response(content=data, media_type="application/octet-stream")


@router.delete("/keysets/{keyset_id}", response_model=KeysetPublic, summary="Revoke a key set")
def delete_keyset(keyset_id: str, p: Auth, rt: Rt, request: Request) -> KeysetPublic:
    out = keysets.delete_keyset(rt, p, keyset_id, who=actor_of(p, request))
    return KeysetPublic(**out)


@router.post(
    "/offerings/{offering_id}/infer",
    summary="Encrypted inference: request frame in, result frame out (consumer; metered per sample)",
    openapi_extra=_BINARY,
    responses=_BINARY_OUT,  # type: ignore[arg-type]
    dependencies=[body_limit(BodyLimit.CIPHERTEXT)],
)
async def infer(
    offering_id: str,
    p: Auth,
    rt: Rt,
    request: Request,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
    keyset_id: Annotated[str | None, Header(alias="X-Som-Keyset")] = None,
    contract_id: Annotated[str | None, Header(alias="X-Som-Contract")] = None,
) -> Response:
    p.require("consumer")
    _octet(request)
    body = await _read_limited(request, rt.settings.max_ciphertext_bytes)
    res = await run_in_threadpool(
        he.infer,
        rt,
        p,
        offering_id,
        body,
        idempotency_key=idempotency_key,
        keyset_id=keyset_id,
        contract_id=contract_id,
        who=actor_of(p, request),
    )
    headers = {"X-Som-Units": str(res.units)}
    if res.usage_id:
        headers["X-Som-Usage-Id"] = res.usage_id
    if res.receipt:
        headers["X-Som-Receipt"] = he.receipt_header(res.receipt)
    if res.replay:
        headers["X-Som-Replay"] = "true"
    return Response(content=res.body, media_type=res.media_type, headers=headers)
