"""Ledger routes: checkpoints, the log's key, leaves, proofs, export, compliance filters, receipts.

Who sees what: compliance and admin see the whole log. Anyone authenticated may fetch the log's
key, the latest checkpoint and consistency proofs (they reveal sizes and hashes only).
Consumers and providers may fetch inclusion proofs and receipts for usage leaves of their own
organisation (as consumer or provider); other leaves are 404 for them.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import case, func, select

from contracts._validate import format_time
from marketplace.api.deps import Auth, Page, Rt, actor_of
from marketplace.api.schemas import PageOf
from marketplace.db.models_ledger import LedgerCheckpoint, LedgerLeaf
from marketplace.db.paging import page_rows
from marketplace.errors import Invalid, NotFound
from marketplace.runtime import Runtime
from marketplace.services import audit, ledger
from marketplace.services.identity import Principal

router = APIRouter(prefix="/v1/ledger", tags=["ledger"])

MAX_LEAVES_PER_REQUEST = 1000
#: Leaf indexes and tree sizes are 64-bit signed in the database; larger ones are refused (422).
MAX_INDEX = 2**63 - 1
_FULL = ("compliance", "admin")


class CheckpointPublic(BaseModel):
    size: int
    root_hash: str
    note: str
    created_at: datetime


class LeafPublic(BaseModel):
    index: int
    leaf_hash: str
    leaf: str
    record: dict[str, Any]


class InclusionProof(BaseModel):
    index: int
    size: int
    leaf_hash: str
    proof: list[str]


class ConsistencyProof(BaseModel):
    size1: int
    size2: int
    proof: list[str]


class ContractTotalsPublic(BaseModel):
    contract_id: str
    currency: str | None
    charged_units: int
    amount_minor: int
    usage_records: int
    released_records: int


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _cp_public(cp: ledger.StoredCheckpoint) -> CheckpointPublic:
    return CheckpointPublic(size=cp.size, root_hash=_b64(cp.root_hash), note=cp.note.decode(), created_at=cp.created_at)


def _leaf_public(row: Any) -> LeafPublic:
    data = bytes(row.data)
    return LeafPublic(
        index=int(row.idx), leaf_hash=_b64(bytes(row.leaf_hash)), leaf=_b64(data), record=json.loads(data)
    )


def _leaf(s: Any, index: int) -> Any:
    t = LedgerLeaf.__table__
    cols = (t.c.idx, t.c.leaf_hash, t.c.consumer_org, t.c.provider_org)
    row = s.execute(select(*cols).where(t.c.idx == index)).one_or_none()
    if row is None:
        raise NotFound(f"no leaf {index}")
    return row


def _may_see(p: Principal, row: Any) -> bool:
    if any(p.has(r) for r in _FULL):
        return True
    return p.org_id in (row.consumer_org, row.provider_org)


def _deny(rt: Runtime, p: Principal, request: Request, index: int) -> NotFound:
    audit.emit_detached(rt.sessions, actor_of(p, request), "authz.denied", target=f"ledger:{index}", outcome="denied")
    return NotFound(f"no leaf {index}")


def _leaf_by_hash(rt: Runtime, p: Principal, request: Request, want: bytes) -> tuple[int, Any]:
    """The caller's leaf whose hash is ``want``. A hash that is in the log but not the caller's and
    one that is not in the log get the same 404 (same body, and both audited as ``authz.denied``
    on the hash): a leaf hash from another organisation's world is no existence oracle."""
    with rt.tx() as s:
        try:
            row = _leaf(s, ledger.find_leaf(s, want))
        except NotFound:
            row = None
    if row is None or not _may_see(p, row):
        audit.emit_detached(
            rt.sessions, actor_of(p, request), "authz.denied", target=f"ledger:hash:{want.hex()}", outcome="denied"
        )
        raise NotFound("no leaf with that hash")
    return int(row.idx), row


@router.get("/key", response_class=PlainTextResponse, summary="The log's verifier key (C2SP vkey)")
def get_key(p: Auth, rt: Rt) -> PlainTextResponse:
    return PlainTextResponse(ledger.vkey(rt) + "\n")


@router.get("/checkpoint", response_class=PlainTextResponse, summary="The latest signed checkpoint note")
def get_checkpoint(p: Auth, rt: Rt) -> PlainTextResponse:
    cp = ledger.latest_or_sign(rt)
    return PlainTextResponse(cp.note.decode(), headers={"X-Som-Tree-Size": str(cp.size)})


@router.get(
    "/checkpoints", response_model=PageOf[CheckpointPublic], summary="Every signed checkpoint (compliance, admin)"
)
def list_checkpoints(p: Auth, rt: Rt, page: Page) -> PageOf[CheckpointPublic]:
    p.require(*_FULL)
    t = LedgerCheckpoint.__table__
    with rt.tx() as s:
        rows, total = page_rows(s, select(t).order_by(t.c.size), page)
    items = [_cp_public(ledger.checkpoints._to_cp(r)) for r in rows]
    return PageOf[CheckpointPublic].build(items, total, page)


@router.post("/checkpoints", response_model=CheckpointPublic, summary="Sign a checkpoint now (compliance, admin)")
def post_checkpoint(p: Auth, rt: Rt) -> CheckpointPublic:
    p.require(*_FULL)
    cp = ledger.sign_checkpoint(rt)
    return _cp_public(cp)


@router.get("/leaves", response_model=list[LeafPublic], summary="Leaves [start, end) (compliance, admin)")
def get_leaves(
    p: Auth,
    rt: Rt,
    start: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
    end: Annotated[
        int | None, Query(ge=0, le=MAX_INDEX, description=f"Exclusive; at most start+{MAX_LEAVES_PER_REQUEST}.")
    ] = None,
) -> list[LeafPublic]:
    p.require(*_FULL)
    t = LedgerLeaf.__table__
    with rt.tx() as s:
        size = ledger.tree_size(s)
        stop = min(size, start + MAX_LEAVES_PER_REQUEST if end is None else end)
        if end is not None and (end < start or end - start > MAX_LEAVES_PER_REQUEST):
            raise Invalid(f"need start <= end <= start + {MAX_LEAVES_PER_REQUEST}, got [{start}, {end})")
        rows = s.execute(select(t).where(t.c.idx >= start, t.c.idx < stop).order_by(t.c.idx)).all()
    return [_leaf_public(r) for r in rows]


def _parse_hash(text: str) -> bytes:
    try:
        h = (
            bytes.fromhex(text)
            if len(text) == 64
            else base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        )
    except (ValueError, binascii.Error):
        h = b""
    if len(h) != 32:
        raise Invalid("leaf_hash must be 32 bytes, as base64 or 64 hex digits")
    return h


@router.get("/proof/inclusion", response_model=InclusionProof, summary="RFC 9162 inclusion proof")
def get_inclusion(
    p: Auth,
    rt: Rt,
    request: Request,
    index: Annotated[int | None, Query(ge=0, le=MAX_INDEX)] = None,
    leaf_hash: str | None = None,
    size: Annotated[
        int | None, Query(ge=1, le=MAX_INDEX, description="Tree size; default the latest checkpoint's.")
    ] = None,
) -> InclusionProof:
    if (index is None) == (leaf_hash is None):
        raise Invalid("pass exactly one of index and leaf_hash")
    if size is None:
        size = ledger.latest_or_sign(rt).size
    if leaf_hash is not None:
        index, row = _leaf_by_hash(rt, p, request, _parse_hash(leaf_hash))
    else:
        index = int(index or 0)
        with rt.tx() as s:
            row = _leaf(s, index)
        if not _may_see(p, row):
            raise _deny(rt, p, request, index)
    if index >= size:
        raise Invalid(f"leaf {index} is not in the tree of size {size}; sign a newer checkpoint or pass a larger size")
    with rt.tx() as s:
        proof = ledger.inclusion_proof(s, index, size)
    return InclusionProof(index=index, size=size, leaf_hash=_b64(bytes(row.leaf_hash)), proof=[_b64(h) for h in proof])


@router.get("/proof/consistency", response_model=ConsistencyProof, summary="RFC 9162 consistency proof")
def get_consistency(
    p: Auth,
    rt: Rt,
    size1: Annotated[int, Query(ge=0, le=MAX_INDEX)],
    size2: Annotated[
        int | None, Query(ge=0, le=MAX_INDEX, description="Default: the latest checkpoint's size.")
    ] = None,
) -> ConsistencyProof:
    if size2 is None:
        size2 = ledger.latest_or_sign(rt).size
    if size1 > size2:
        raise Invalid(f"need size1 <= size2, got {size1}, {size2}")
    with rt.tx() as s:
        proof = ledger.consistency_proof(s, size1, size2)
    return ConsistencyProof(size1=size1, size2=size2, proof=[_b64(h) for h in proof])


@router.get("/receipts/{index}", summary="A receipt for one leaf (leaf, inclusion proof, checkpoint)")
def get_receipt(p: Auth, rt: Rt, request: Request, index: Annotated[int, Path(ge=0, le=MAX_INDEX)]) -> dict[str, Any]:
    with rt.tx() as s:
        row = _leaf(s, index)
    if not _may_see(p, row):
        raise _deny(rt, p, request, index)
    return ledger.receipt(rt, index)


class JSONLResponse(StreamingResponse):
    media_type = "application/jsonl"


@router.get(
    "/export",
    summary="Every leaf as JSONL: {index, leaf (base64 of the hashed bytes)} (compliance, admin)",
    response_class=JSONLResponse,
    responses={200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}}},
)
def export(p: Auth, rt: Rt, size: Annotated[int | None, Query(ge=0, le=MAX_INDEX)] = None) -> StreamingResponse:
    p.require(*_FULL)
    with rt.tx() as s:
        have = ledger.tree_size(s)
    end = have if size is None else min(size, have)

    def lines() -> Iterator[bytes]:
        buf: list[bytes] = []
        for idx, data in ledger.iter_leaves(rt, 0, end):
            buf.append(b'{"index":%d,"leaf":"%s"}\n' % (idx, base64.b64encode(data)))
            if len(buf) >= 1000:
                yield b"".join(buf)
                buf.clear()
        if buf:
            yield b"".join(buf)

    return JSONLResponse(lines(), headers={"X-Som-Tree-Size": str(end)})


def _time_arg(t: datetime | None) -> str | None:
    """``t`` in UTC (naive means UTC) in the leaves' time format; any offset is accepted."""
    if t is None:
        return None
    try:
        return format_time(t.astimezone(UTC) if t.tzinfo is not None else t.replace(tzinfo=UTC))
    except (OverflowError, ValueError) as e:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise Invalid(f"time out of range: {t.isoformat()}") from e


@router.get("/usage", response_model=PageOf[LeafPublic], summary="Usage leaves, filtered (compliance, admin)")
def get_usage(
    p: Auth,
    rt: Rt,
    page: Page,
    contract_id: str | None = None,
    consumer_org: str | None = None,
    provider_org: str | None = None,
    offering_id: str | None = None,
    mode: Literal["federated", "gateway", "he_inference", "remote_job"] | None = None,
    outcome: Literal["charged", "released"] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> PageOf[LeafPublic]:
    p.require(*_FULL)
    t = LedgerLeaf.__table__
    stmt = select(t).where(t.c.schema == "som.usage/v1")
    for col, val in (
        (t.c.contract_id, contract_id),
        (t.c.consumer_org, consumer_org),
        (t.c.provider_org, provider_org),
        (t.c.offering_id, offering_id),
        (t.c.mode, mode),
        (t.c.outcome, outcome),
    ):
        if val is not None:
            stmt = stmt.where(col == val)
    lo, hi = _time_arg(since), _time_arg(until)
    if lo is not None:
        stmt = stmt.where(t.c.time >= lo)
    if hi is not None:
        stmt = stmt.where(t.c.time < hi)
    with rt.tx() as s:
        rows, total = page_rows(s, stmt.order_by(t.c.idx), page)
    items = [_leaf_public(r) for r in rows]
    return PageOf[LeafPublic].build(items, total, page)


@router.get(
    "/totals", response_model=list[ContractTotalsPublic], summary="Usage totals per contract (compliance, admin)"
)
def get_totals(p: Auth, rt: Rt) -> list[ContractTotalsPublic]:
    p.require(*_FULL)
    t = LedgerLeaf.__table__
    charged = t.c.outcome == "charged"
    stmt = (
        select(
            t.c.contract_id,
            func.max(t.c.currency),
            func.coalesce(func.sum(case((charged, t.c.units), else_=0)), 0),
            func.coalesce(func.sum(case((charged, t.c.amount_minor), else_=0)), 0),
            func.count(),
            func.coalesce(func.sum(case((charged, 0), else_=1)), 0),
        )
        .where(t.c.schema == "som.usage/v1")
        .group_by(t.c.contract_id)
        .order_by(t.c.contract_id)
    )
    with rt.tx() as s:
        rows = s.execute(stmt).all()
    return [
        ContractTotalsPublic(
            contract_id=r[0],
            currency=r[1],
            charged_units=int(r[2]),
            amount_minor=int(r[3]),
            usage_records=int(r[4]),
            released_records=int(r[5]),
        )
        for r in rows
    ]
