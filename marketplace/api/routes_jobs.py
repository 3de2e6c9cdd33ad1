"""Remote-execution jobs: create, submit the sealed input, follow, approve, cancel, fetch.

Two steps to submit, because the sealed input binds the job id (``crypto.sealing.job_info``):
``POST /v1/jobs`` (JSON, ``Idempotency-Key`` header) creates the job and names the compute
site's sealing key; ``POST /v1/jobs/{id}/payload`` (octet-stream, the sealed input) submits it.
Results are sealed bytes for the consumer (``GET /v1/jobs/{id}/result``), with the receipt in
``X-Som-Usage-Id`` / ``X-Som-Receipt``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.middleware import BodyLimit, body_limit
from marketplace.api.schemas import PageOf, Strict
from marketplace.errors import UnsupportedMediaType
from marketplace.services import jobs, metering

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_BINARY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


class JobLimitsIn(Strict):
    cpu_seconds: int | None = Field(default=None, ge=1, le=int(jobs.MAX_LIMITS["cpu_seconds"]))
    memory_mb: int | None = Field(default=None, ge=16, le=int(jobs.MAX_LIMITS["memory_mb"]))
    wall_seconds: float | None = Field(default=None, gt=0, le=jobs.MAX_LIMITS["wall_seconds"])


class JobCreate(Strict):
    offering_id: str = Field(max_length=40)
    kind: Literal["predict", "evaluate", "custom"]
    units: int = Field(default=1, ge=1, le=10_000_000, description="Rows you will send (the most the job may process).")
    code: str | None = Field(
        default=None, max_length=1_000_000, description="custom jobs: main.py, shown to the provider."
    )
    limits: JobLimitsIn | None = None
    timeout_seconds: float | None = Field(default=None, ge=10, le=7 * 86400)
    contract_id: str | None = Field(default=None, max_length=64)


class JobDecision(Strict):
    code_digest: str = Field(max_length=80, description="The digest of the code you reviewed.")
    reason: str = Field(default="", max_length=2000)


class JobPublic(BaseModel):
    id: str
    offering_id: str
    org_id: str
    kind: str
    status: str
    hosting: str
    seal_public: str
    seal_statement: dict[str, Any] | None = Field(
        default=None,
        description="Provider-hosted: the provider's signed som.seal-key/v1 statement vouching for seal_public; "
        "verify it against your contract's provider key before sealing (the SDK does).",
    )
    units: int
    limits: dict[str, Any]
    code: str | None = None
    code_digest: str | None = None
    input_size: int | None = None
    input_digest: str | None = None
    result_size: int | None = None
    result_available: bool
    attempts: int
    error: str | None = None
    error_reason: str | None = None
    contract_id: str | None = None
    usage_id: str | None = None
    charged: bool
    receipt: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime
    result_expires_at: datetime | None = None


def _out(job: Any) -> JobPublic:
    return JobPublic(**jobs.view(job))


@router.post(
    "", response_model=JobPublic, status_code=201, summary="Create a job (consumer); then POST its sealed payload"
)
def create_job(
    body: JobCreate,
    p: Auth,
    rt: Rt,
    request: Request,
    response: Response,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> JobPublic:
    job, created = jobs.create(
        rt,
        p,
        offering_id=body.offering_id,
        kind=body.kind,
        units=body.units,
        limits=body.limits.model_dump(exclude_none=True) if body.limits else None,
        code=body.code,
        timeout_seconds=body.timeout_seconds,
        contract_id=body.contract_id,
        idempotency_key=metering.check_idempotency_key(idempotency_key),
        who=actor_of(p, request),
    )
    if not created:
        response.status_code = 200
    return _out(job)


@router.post(
    "/{job_id}/payload",
    response_model=JobPublic,
    summary="Submit the sealed input (octet-stream)",
    openapi_extra=_BINARY,
    dependencies=[body_limit(BodyLimit.BINARY)],
)
async def submit_payload(job_id: str, p: Auth, rt: Rt, request: Request) -> JobPublic:
    ctype = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip()
    if ctype != "application/octet-stream":
        raise UnsupportedMediaType(f"send the sealed input as application/octet-stream, not {ctype}")
    data = await request.body()
    job = await run_in_threadpool(jobs.submit_input, rt, p, job_id, data, who=actor_of(p, request))
    return _out(job)


@router.get(
    "", response_model=PageOf[JobPublic], summary="Your jobs (consumer) or your offerings' jobs (role=provider)"
)
def list_jobs(
    p: Auth,
    rt: Rt,
    page: Page,
    role: Literal["consumer", "provider"] = "consumer",
    status: Annotated[str | None, Query(max_length=20)] = None,
    offering_id: Annotated[str | None, Query(max_length=40)] = None,
) -> PageOf[JobPublic]:
    with rt.tx() as s:
        rows, total = jobs.list_for(
            s, p, role=role, status=status, offering_id=offering_id, limit=page.limit, offset=page.offset
        )
        return PageOf[JobPublic].build([_out(r) for r in rows], total, page)


@router.get("/{job_id}", response_model=JobPublic, summary="One job (its consumer or its provider)")
def get_job(job_id: str, p: Auth, rt: Rt, request: Request) -> JobPublic:
    with rt.tx() as s:
        return _out(jobs.get_for(s, p, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, summary="Cancel (consumer); reserved units are released")
def cancel_job(job_id: str, p: Auth, rt: Rt, request: Request) -> JobPublic:
    return _out(jobs.cancel(rt, p, job_id, who=actor_of(p, request)))


@router.post("/{job_id}/approve", response_model=JobPublic, summary="Approve a custom job's exact code (provider)")
def approve_job(job_id: str, body: JobDecision, p: Auth, rt: Rt, request: Request) -> JobPublic:
    return _out(
        jobs.decide(
            rt, p, job_id, approve=True, code_digest=body.code_digest, reason=body.reason, who=actor_of(p, request)
        )
    )


@router.post("/{job_id}/reject", response_model=JobPublic, summary="Reject a custom job's code (provider)")
def reject_job(job_id: str, body: JobDecision, p: Auth, rt: Rt, request: Request) -> JobPublic:
    return _out(
        jobs.decide(
            rt, p, job_id, approve=False, code_digest=body.code_digest, reason=body.reason, who=actor_of(p, request)
        )
    )


@router.get(
    "/{job_id}/result",
    summary="The sealed result (consumer); open it with your reply key",
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
def job_result(job_id: str, p: Auth, rt: Rt, request: Request) -> Response:
    job, data = jobs.fetch_result(rt, p, job_id, who=actor_of(p, request))
    headers = {}
    if job.usage_id:
        headers["X-Som-Usage-Id"] = job.usage_id
    if job.receipt:
        headers["X-Som-Receipt"] = metering.receipt_header(job.receipt)
    return Response(content=data, media_type="application/octet-stream", headers=headers)
