"""Encrypted (CKKS) inference as a service: compile, key sets, metered inference.

For: the service side of HE inference. ``compile_version`` decrypts a marketplace-hosted model
artifact in memory, compiles it with :func:`crypto.he.compile_model`, stores the public plan and
the compile report ("HE model card") on the version and the compiled model as an
envelope-encrypted artifact (purpose ``"compiled"``). ``create_keyset`` registers a consumer's
*public* key set (validated with :meth:`crypto.he.PublicContext.from_bytes`: a secret key is
refused) bound to one of its contracts. ``infer`` meters one unit per sample
(:func:`crypto.he.wire.count_samples`) with :mod:`marketplace.services.metering`, computes in the
local worker pool (:mod:`marketplace.services.compute`) or on the provider's agent, and returns
the result frame with its usage receipt.

Not for: HTTP (``marketplace.api.routes_he``), the HE math (``crypto.he``), quotas and prices
(``contracts.policy`` via metering). The marketplace never sees a consumer's secret key or
plaintext: it relays and computes on ciphertexts and stores public key material only.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from marketplace.db.base import utcnow
from marketplace.db.models import Artifact, Offering, OfferingVersion
from marketplace.db.models_he import HEAgentPlan, Keyset
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from marketplace.services import audit, catalog, compute, monitoring
from marketplace.services.identity import Principal

__all__ = [
    "AGENT_TIMEOUT_SECONDS",
    "COMPUTE_TIMEOUT_SECONDS",
    "MAX_CALIBRATION_SAMPLES",
    "REPORT_SAMPLES",
    "InferResult",
    "compile_version",
    "create_keyset",
    "delete_keyset",
    "get_plan",
    "infer",
    "keyset_bound",
    "list_keysets",
    "receipt_header",
    "set_agent_plan",
]

log = logging.getLogger("som.he")

MAX_CALIBRATION_SAMPLES = 100_000  # more says nothing new about activation ranges
REPORT_SAMPLES = 512  # the model card measures HE accuracy on this many calibration samples
COMPUTE_TIMEOUT_SECONDS = 600.0
AGENT_TIMEOUT_SECONDS = 120.0
MEDIA_TYPE = "application/octet-stream"

# ------------------------------------------------------------------ helpers


def _plan_cls() -> Any:
    from crypto.he import PublicPlan

    return PublicPlan


def _version(s: Session, offering_id: str, number: int) -> OfferingVersion:
    v = s.scalar(
        select(OfferingVersion).where(
            OfferingVersion.offering_id == offering_id, OfferingVersion.number == number
        )
    )
    if v is None:
        raise NotFound(f"offering {offering_id} has no version {number}")
    return v


def _artifact(s: Session, version_id: str, purpose: str) -> Artifact | None:
    return s.scalar(
        select(Artifact)
        .where(Artifact.version_id == version_id, Artifact.purpose == purpose)
        .order_by(Artifact.created_at.desc(), Artifact.id.desc())
        .limit(1)
    )


@dataclass(frozen=True)
class PlanRef:
    """The plan an offering serves now, and (marketplace-hosted) the compiled version."""

    plan: Any  # crypto.he.PublicPlan
    digest: str
    version: OfferingVersion | None
    report: dict[str, Any] | None


def _current_plan(s: Session, off: Offering) -> PlanRef:
    P = _plan_cls()
    if off.hosting == "provider":
        row = s.get(HEAgentPlan, off.id)
        if row is None:
            raise Conflict(f"offering {off.id} has no HE plan yet: its provider has not published one")
        plan = P.from_dict(row.plan)
        return PlanRef(plan, plan.digest(), None, row.report)
    v = catalog.latest_version(s, off.id)
    if v is None or v.he_plan is None:
        raise Conflict(
            f"offering {off.id} is not compiled for encrypted inference: its provider must "
            "compile the latest version (som offering compile)"
        )
    plan = P.from_dict(v.he_plan)
    return PlanRef(plan, plan.digest(), v, v.he_report)


def get_plan(s: Session, p: Principal, offering_id: str) -> dict[str, Any]:
    """The public plan of a visible offering: ``{"plan", "plan_digest", "report", "version"}``."""
    off = catalog.get_visible(s, p, offering_id)
    ref = _current_plan(s, off)
    return {
        "offering_id": off.id,
        "hosting": off.hosting,
        "version": ref.version.number if ref.version else None,
        "plan": ref.plan.to_dict(),
        "plan_digest": ref.digest,
        "report": ref.report,
    }


def _parse_calibration(data: bytes, input_dim: int) -> np.ndarray:
    if not data:
        raise Invalid("empty calibration data: send a .npy array of shape (n, input_dim)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        raise Invalid(f"calibration refused: {e}") from e
    except (OSError, EOFError) as e:
        raise Invalid(f"calibration must be a .npy array (np.save), got something else ({type(e).__name__})") from e
    if not isinstance(arr, np.ndarray):
        raise Invalid("calibration must be a single .npy array, not an .npz archive")
    if arr.dtype.kind not in "fiu" or arr.ndim != 2 or arr.shape[1] != input_dim or arr.shape[0] < 1:
        raise Invalid(f"calibration: expected a numeric array of shape (n, {input_dim}), got {arr.dtype}{arr.shape}")
    if arr.shape[0] > MAX_CALIBRATION_SAMPLES:
        raise Invalid(f"calibration: at most {MAX_CALIBRATION_SAMPLES} samples, got {arr.shape[0]}")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise Invalid("calibration values must be finite")
    return out


# ------------------------------------------------------------------ compile


def compile_version(
    rt: Any,
    p: Principal,
    offering_id: str,
    number: int,
    calibration: bytes,
    *,
    who: audit.Actor,
    precision_bits: int = 8,
    noise_bits: int = 12,
) -> OfferingVersion:
    """Compile version ``number`` of an offering the caller's org owns (provider role).

    Raises NotFound (not yours / no such version), Conflict (provider-hosted), Invalid (bad
    calibration, or the compiler refused the model). Holds no transaction while compiling.
    """
    p.require("provider")
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id)
        if off.hosting != "marketplace":
            raise Conflict(
                "provider-hosted offerings are compiled by their agent, next to the weights; "
                "publish the plan with PUT /v1/offerings/{id}/he/plan"
            )
        v = _version(s, off.id, number)
        art = _artifact(s, v.id, "model")
        if art is None:
            raise Conflict(f"version {number} has no stored model artifact")
        s.expunge(art)
        fmt, version_id, input_dim = v.format, v.id, int(v.input_shape[0]) if v.input_shape else 0
        audit.emit(s, who, "artifact.decrypt", target=art.id, detail={"purpose": "compile", "version": version_id})
    cal = _parse_calibration(calibration, input_dim)

    from crypto.errors import HEError
    from crypto.he import compile_model, compile_report

    plaintext = catalog.decrypt_artifact(rt, art)
    try:
        model = compile_model(plaintext, fmt, calibration=cal, precision_bits=precision_bits, noise_bits=noise_bits)
        del plaintext
        card = compile_report(model, cal[:REPORT_SAMPLES]).to_dict()
    except (HEError, ValueError, TypeError) as e:
        raise Invalid(f"the model cannot be compiled for HE: {e}") from e
    plan = model.public_plan
    report = {
        **card,
        "plan_digest": plan.digest(),
        "calibration_samples": int(cal.shape[0]),
        "report_samples": int(min(cal.shape[0], REPORT_SAMPLES)),
        "layouts": list(plan.layouts),
        "postprocess": plan.postprocess,
        "compiled_at": utcnow().isoformat(),
    }
    compiled = model.to_bytes()
    with rt.tx() as s:
        v = _version(s, offering_id, number)
        catalog.store_artifact(rt, s, v, "compiled", compiled)
        v.he_plan = plan.to_dict()
        v.he_report = report
        off2 = s.get(Offering, offering_id)
        if off2 is not None:
            off2.updated_at = utcnow()
        audit.emit(
            s, who, "offering.version.compile", target=f"{offering_id}/v{number}",
            detail={"plan_digest": report["plan_digest"], "depth": plan.depth},
        )
        s.flush()
        s.refresh(v)
        s.expunge(v)
    return v


def set_agent_plan(
    rt: Any, p: Principal, offering_id: str, plan_json: dict[str, Any], report: dict[str, Any] | None,
    *, who: audit.Actor,
) -> dict[str, Any]:
    """Publish the public plan a provider-hosted offering's agent compiled (provider, owner)."""
    p.require("provider")
    try:
        plan = _plan_cls().from_dict(plan_json)
    except (TypeError, ValueError) as e:
        raise Invalid(f"not a public HE plan: {e}") from e
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id)
        if off.hosting != "provider":
            raise Conflict("marketplace-hosted offerings are compiled by the marketplace (POST .../compile)")
        row = s.get(HEAgentPlan, off.id)
        if row is None:
            row = HEAgentPlan(offering_id=off.id, plan=plan.to_dict(), report=report, digest=plan.digest())
            s.add(row)
        else:
            row.plan, row.report, row.digest, row.updated_at = plan.to_dict(), report, plan.digest(), utcnow()
        audit.emit(s, who, "offering.he_plan.set", target=off.id, detail={"plan_digest": plan.digest()})
        return get_plan(s, p, off.id)


# ------------------------------------------------------------------ contracts


@dataclass(frozen=True)
class ContractRef:
    id: str
    offering_id: str
    consumer_org_id: str
    status: str
    ended: bool  # terminated or past its validity window: its key sets are revoked
    modes: tuple[str, ...]


def _contract(s: Session, contract_id: str, *, now: datetime) -> ContractRef | None:
    from marketplace.db.models_contracts import ContractRow

    row = s.get(ContractRow, contract_id)
    if row is None:
        return None
    terms = row.terms or {}
    expired = False
    try:
        from contracts._validate import parse_time

        expired = now >= parse_time(terms.get("valid_until"), "valid_until")
    except Exception:  # noqa: BLE001 - unreadable terms: treat as ended, never as valid
        expired = True
    return ContractRef(
        id=row.id,
        offering_id=row.offering_id,
        consumer_org_id=row.consumer_org_id,
        status=row.status,
        ended=row.status == "terminated" or expired,
        modes=tuple(terms.get("modes") or ()),
    )


def _resolve_contract(s: Session, p: Principal, *, contract_id: str | None, offering_id: str | None, now: datetime) -> ContractRef:
    from marketplace.db.models_contracts import ContractRow

    if contract_id:
        c = _contract(s, contract_id, now=now)
        if c is None or c.consumer_org_id != p.org_id or (offering_id and c.offering_id != offering_id):
            raise NotFound(f"contract {contract_id} not found")
        return c
    if not offering_id:
        raise Invalid("give contract_id (or offering_id to use your single active contract for it)")
    ids = list(
        s.scalars(
            select(ContractRow.id).where(
                ContractRow.consumer_org_id == p.org_id,
                ContractRow.offering_id == offering_id,
                ContractRow.status == "active",
            )
        )
    )
    live = [c for c in (_contract(s, i, now=now) for i in ids) if c is not None and not c.ended]
    if not live:
        raise NotFound(f"no active contract of yours for offering {offering_id}; accept an offer first")
    if len(live) > 1:
        raise Conflict(f"you have {len(live)} active contracts for offering {offering_id}; give contract_id")
    return live[0]


# ------------------------------------------------------------------ key sets


def keyset_public(k: Keyset) -> dict[str, Any]:
    return {
        "id": k.id,
        "org_id": k.org_id,
        "offering_id": k.offering_id,
        "contract_id": k.contract_id,
        "plan_digest": k.plan_digest,
        "size": k.size,
        "digest": k.blob,
        "layouts": list(k.layouts),
        "created_at": k.created_at,
        "revoked_at": k.revoked_at,
        "revoked_reason": k.revoked_reason,
        "status": "revoked" if k.revoked_at else "active",
    }


def create_keyset(
    rt: Any, p: Principal, data: bytes, *, contract_id: str | None, offering_id: str | None,
    who: audit.Actor, now: datetime | None = None,
) -> dict[str, Any]:
    """Register a public key set for one of the caller's contracts (consumer role).

    Raises NotFound (no such contract of yours), Forbidden (contract ended or without
    he_inference), Conflict (offering not compiled), Invalid (not a public key set for the
    offering's plan; a key set carrying a secret key is refused).
    """
    p.require("consumer")
    now = now or utcnow()
    if not data:
        raise Invalid("empty key set: send SecretContext.public_keyset_bytes() as application/octet-stream")
    with rt.tx() as s:
        c = _resolve_contract(s, p, contract_id=contract_id, offering_id=offering_id, now=now)
        if c.ended:
            raise Forbidden(f"contract {c.id} has ended; key sets cannot be registered for it", reason="contract_ended")
        if c.modes and "he_inference" not in c.modes:
            raise Forbidden(f"contract {c.id} does not allow he_inference", reason="mode_not_allowed")
        off = s.get(Offering, c.offering_id)
        if off is None:  # pragma: no cover - FK
            raise NotFound(f"offering {c.offering_id} not found")
        ref = _current_plan(s, off)
    from crypto.errors import HEError
    from crypto.he import PublicContext

    try:
        ctx = PublicContext.from_bytes(data, plan=ref.plan)
    except HEError as e:
        raise Invalid(f"key set refused: {e}") from e
    layouts = list(ctx.layouts)
    del ctx
    addr = rt.blobs.put(data)
    with rt.tx() as s:
        k = Keyset(
            org_id=p.org_id, offering_id=c.offering_id, contract_id=c.id, plan_digest=ref.digest,
            blob=addr, size=len(data), layouts=layouts, created_by=p.key_id,
        )
        s.add(k)
        s.flush()
        audit.emit(
            s, who, "keyset.create", target=k.id,
            detail={"contract_id": c.id, "offering_id": c.offering_id, "size": len(data), "layouts": layouts},
        )
        return keyset_public(k)


def _refresh_revocation(s: Session, k: Keyset, *, now: datetime) -> None:
    if k.revoked_at is not None:
        return
    c = _contract(s, k.contract_id, now=now)
    if c is None or c.ended:
        k.revoked_at = now
        k.revoked_reason = "contract_ended"


def list_keysets(rt: Any, p: Principal, *, limit: int, offset: int, now: datetime | None = None) -> tuple[list[dict[str, Any]], int]:
    now = now or utcnow()
    with rt.tx() as s:
        rows = list(s.scalars(select(Keyset).where(Keyset.org_id == p.org_id).order_by(Keyset.created_at, Keyset.id)))
        for k in rows:
            _refresh_revocation(s, k, now=now)
        return [keyset_public(k) for k in rows[offset : offset + limit]], len(rows)


def get_keyset(rt: Any, p: Principal, keyset_id: str) -> dict[str, Any]:
    with rt.tx() as s:
        k = _own_keyset(s, p, keyset_id)
        _refresh_revocation(s, k, now=utcnow())
        return keyset_public(k)


def _own_keyset(s: Session, p: Principal, keyset_id: str) -> Keyset:
    k = s.get(Keyset, keyset_id)
    if k is None:
        raise NotFound(f"key set {keyset_id} not found")
    if k.org_id != p.org_id:
        raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)
    return k


def delete_keyset(rt: Any, p: Principal, keyset_id: str, *, who: audit.Actor) -> dict[str, Any]:
    """Revoke a key set of the caller's org (the row stays for the audit trail)."""
    with rt.tx() as s:
        k = _own_keyset(s, p, keyset_id)
        if k.revoked_at is None:
            k.revoked_at = utcnow()
            k.revoked_reason = "deleted"
            audit.emit(s, who, "keyset.revoke", target=k.id, detail={"reason": "deleted"})
        return keyset_public(k)


def keyset_content(rt: Any, p: Principal, keyset_id: str) -> bytes:
    """The key set bytes: for its owner, or for an agent key serving its offering."""
    with rt.tx() as s:
        k = s.get(Keyset, keyset_id)
        allowed = k is not None and (
            k.org_id == p.org_id
            or (p.kind == "agent" and p.offering_ids is not None and k.offering_id in p.offering_ids)
        )
        if k is None:
            raise NotFound(f"key set {keyset_id} not found")
        if not allowed:
            raise NotFound(f"key set {keyset_id} not found", denied=keyset_id)
        addr = k.blob
    data: bytes = rt.blobs.get(addr)
    return data


# ------------------------------------------------------------------ inference


@dataclass(frozen=True)
class InferResult:
    body: bytes
    media_type: str
    usage_id: str | None
    receipt: dict[str, Any] | None
    replay: bool
    units: int


def receipt_header(receipt: dict[str, Any] | None) -> str:
    """``X-Som-Receipt``: base64url of the receipt's RFC 8785 canonical JSON ("" if none)."""
    from marketplace.services import metering

    return metering.receipt_header(receipt) if receipt else ""


def keyset_bound(s: Session, contract_id: str, keyset_id: str) -> bool:
    """Metering's key-set check: registered for ``contract_id`` and not revoked."""
    k = s.get(Keyset, keyset_id)
    return k is not None and k.contract_id == contract_id and k.revoked_at is None


@dataclass(frozen=True)
class _Prepared:
    offering_id: str
    hosting: str
    keyset: dict[str, Any]
    plan: Any
    plan_json: str
    version_id: str | None
    version_number: int | None
    compiled: tuple[str, bytes, str, str] | None  # artifact id, wrapped key, aad, blob


def _prepare(
    rt: Any, p: Principal, offering_id: str, *, keyset_id: str, contract_id: str | None, now: datetime,
) -> _Prepared:
    with rt.tx() as s:
        off = catalog.get_visible(s, p, offering_id)
        k = _own_keyset(s, p, keyset_id)
        if k.offering_id != off.id:
            raise Conflict(f"key set {k.id} is for offering {k.offering_id}, not {off.id}")
        if contract_id and contract_id != k.contract_id:
            raise Forbidden(
                f"key set {k.id} is bound to contract {k.contract_id}, not {contract_id}",
                reason="keyset_contract_mismatch",
            )
        _refresh_revocation(s, k, now=now)
        if k.revoked_at is not None:
            raise Forbidden(f"keyset revoked ({k.revoked_reason}); register a new key set", reason="keyset_revoked")
        ref = _current_plan(s, off)
        if k.plan_digest != ref.digest:
            raise Conflict(
                f"key set {k.id} was made for plan {k.plan_digest}, but the offering now serves "
                f"{ref.digest}: generate keys for the new plan and register them"
            )
        compiled = None
        if off.hosting == "marketplace":
            art = _artifact(s, ref.version.id, "compiled") if ref.version is not None else None
            if art is None:
                raise Conflict(f"offering {off.id} has no compiled model; its provider must compile it")
            compiled = (art.id, bytes(art.wrapped_key), art.aad, art.blob)
        return _Prepared(
            offering_id=off.id, hosting=off.hosting, keyset=keyset_public(k), plan=ref.plan,
            plan_json=ref.plan.to_json(), version_id=ref.version.id if ref.version else None,
            version_number=ref.version.number if ref.version else None, compiled=compiled,
        )


def _compute(rt: Any, prep: _Prepared, body: bytes) -> bytes:
    """Raises Invalid (the request does not fit), Unavailable (no worker/agent)."""
    if prep.hosting == "provider":
        from marketplace.services import agents

        meta = {"keyset_id": prep.keyset["id"], "plan_digest": prep.keyset["plan_digest"], "version": prep.version_number}
        try:
            out: bytes = agents.run_on_agent(
                rt, offering_id=prep.offering_id, kind="he_infer", payload=body, meta=meta, timeout=AGENT_TIMEOUT_SECONDS,
            )
        except (Unavailable, Invalid):
            raise
        except Exception as e:  # noqa: BLE001 - whatever the agent path raised, answer cleanly
            if getattr(e, "status", 0) in (409, 422):
                raise Invalid(f"the provider's agent refused the request: {getattr(e, 'message', e)}") from e
            raise Unavailable(f"the provider's agent did not answer ({type(e).__name__})") from e
        from crypto.he import wire

        try:
            wire.decode(out, prep.plan, kind=wire.KIND_RESPONSE)
        except (ValueError, TypeError) as e:
            raise Unavailable(f"the provider's agent sent a malformed result: {e}") from e
        return out
    if prep.compiled is None or prep.version_id is None:
        raise Unavailable("no compiled model for this offering")
    _art_id, wrapped, aad, blob = prep.compiled
    task = compute.HETask(
        store=compute.store_spec(rt), version_id=prep.version_id, model_blob=blob, wrapped_key=wrapped,
        aad=aad, keyset_id=prep.keyset["id"], keyset_blob=prep.keyset["digest"], plan_json=prep.plan_json,
        request=body,
    )
    try:
        return compute.get_pool(rt).run(task, timeout=COMPUTE_TIMEOUT_SECONDS)
    except compute.ComputeError as e:
        if e.kind == "invalid":
            raise Invalid(f"ciphertexts do not fit the plan and key set: {e.message}") from None
        raise Unavailable(f"compute failed: {e.message}") from None


def infer(
    rt: Any, p: Principal, offering_id: str, body: bytes, *, idempotency_key: str | None,
    keyset_id: str | None, contract_id: str | None, who: audit.Actor, now: datetime | None = None,
) -> InferResult:
    """Metered encrypted inference: one unit per sample; charged only on success; replays.

    Raises Invalid (no idempotency key / key set header, malformed ciphertexts: 422, never
    charged), NotFound, Forbidden (keyset revoked or bound to another contract), PolicyDenied,
    Conflict, Unavailable.
    """
    from marketplace.services import metering

    t0 = time.perf_counter()
    p.require("consumer")
    idempotency_key = metering.check_idempotency_key(idempotency_key)
    if not keyset_id:
        raise Invalid("the X-Som-Keyset header is required (register one with POST /v1/keysets)")
    now = now or utcnow()
    prep = _prepare(rt, p, offering_id, keyset_id=keyset_id, contract_id=contract_id, now=now)
    from crypto.he import wire

    try:
        units = wire.count_samples(body, prep.plan)
    except (ValueError, TypeError) as e:
        raise Invalid(f"malformed HE request frame: {e}") from e
    request_digest = metering.request_digest("he_infer", prep.offering_id, prep.keyset["id"], body)
    res = metering.begin(
        rt, p, offering_id=prep.offering_id, mode="he_inference", units=units, idempotency_key=idempotency_key,
        request_digest=request_digest, contract_id=prep.keyset["contract_id"], keyset_id=prep.keyset["id"],
    )
    replay = getattr(res, "replay", None)
    if replay is not None:
        return InferResult(replay.body, replay.media_type, replay.usage_id, replay.receipt, True, units)
    tm = time.perf_counter()
    try:
        out = _compute(rt, prep, body)
    except BaseException as e:
        _observe(prep, t0, tm, time.perf_counter(), ok=False, error_class=type(e).__name__)
        reason = e.message if isinstance(e, Invalid | Unavailable) else type(e).__name__
        try:
            metering.release(rt, res, reason=str(reason)[:200])
        finally:
            if prep.compiled is not None:
                _audit_decrypt(rt, who, prep, units, outcome="failure")
        raise
    tc = time.perf_counter()
    if prep.compiled is not None:
        _audit_decrypt(rt, who, prep, units, outcome="success")
    charged = metering.commit(rt, res, result=out, media_type=MEDIA_TYPE)
    _observe(prep, t0, tm, tc, ok=True)
    return InferResult(
        out, MEDIA_TYPE, getattr(charged, "usage_id", None), getattr(charged, "receipt", None), False, units
    )


def _observe(prep: _Prepared, t0: float, tm: float, tc: float, *, ok: bool, error_class: str | None = None) -> None:
    """One HE inference for monitoring: model = the computation (worker or agent, waiting for
    one included: the pool does not report its queue), overhead = everything else (lookups,
    metering, audit). Phases: [t0, tm) overhead, [tm, tc) model, [tc, now) overhead."""
    now = time.perf_counter()
    monitoring.record_inference(
        prep.offering_id, prep.version_number or 0, "he_inference", queue_s=0.0, model_s=tc - tm,
        overhead_s=(tm - t0) + (now - tc), ok=ok, error_class=error_class,
    )


def _audit_decrypt(rt: Any, who: audit.Actor, prep: _Prepared, units: int, *, outcome: str) -> None:
    if prep.compiled is None:
        return
    with rt.tx() as s:
        audit.emit(
            s, who, "artifact.decrypt", target=prep.compiled[0], outcome=outcome,
            detail={"purpose": "he_infer", "version": prep.version_id, "keyset_id": prep.keyset["id"], "units": units},
        )
