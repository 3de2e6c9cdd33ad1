"""Encrypted (CKKS) inference as a service: metered evaluation on a consumer's ciphertexts.

For: ``infer`` meters one unit per sample (:func:`crypto.he.wire.count_samples`) with
:mod:`marketplace.services.metering`, computes in the local worker pool
(:mod:`marketplace.compute.he`) or on the provider's agent, and returns the result frame
with its usage receipt. Plans live in :mod:`marketplace.services.he_plans`, key sets in
:mod:`marketplace.services.keysets`.

Not for: HTTP (``marketplace.api.routes_he``), the HE math (``crypto.he``), quotas and prices
(``contracts.policy`` via metering). The marketplace never sees a consumer's secret key or
plaintext: it relays and computes on ciphertexts and stores public key material only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crypto.he import PublicPlan, wire
from marketplace.compute.he import ComputeError, HETask
from marketplace.db.base import utcnow
from marketplace.db.models import Hosting
from marketplace.errors import Conflict, Forbidden, Invalid, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit, catalog, dispatch, metering, monitoring
from marketplace.services.he_plans import current_plan, latest_artifact
from marketplace.services.identity import Principal
from marketplace.services.keysets import keyset_public, own_keyset, refresh_revocation

__all__ = ["AGENT_TIMEOUT_SECONDS", "COMPUTE_TIMEOUT_SECONDS", "InferResult", "infer", "receipt_header"]

log = logging.getLogger("som.he")

COMPUTE_TIMEOUT_SECONDS = 600.0
AGENT_TIMEOUT_SECONDS = 120.0
MEDIA_TYPE = "application/octet-stream"


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
    return metering.receipt_header(receipt) if receipt else ""


@dataclass(frozen=True)
class _Prepared:
    offering_id: str
    hosting: Hosting
    keyset: dict[str, Any]
    plan: PublicPlan
    plan_json: str
    version_id: str | None
    version_number: int | None
    compiled: tuple[str, bytes, str, str] | None  # artifact id, wrapped key, aad, blob


def _prepare(
    rt: Runtime,
    p: Principal,
    offering_id: str,
    *,
    keyset_id: str,
    contract_id: str | None,
    now: datetime,
) -> _Prepared:
    with rt.tx() as s:
        off = catalog.get_visible(s, p, offering_id)
        k = own_keyset(s, p, keyset_id)
        if k.offering_id != off.id:
            raise Conflict(f"key set {k.id} is for offering {k.offering_id}, not {off.id}")
        if contract_id and contract_id != k.contract_id:
            raise Forbidden(
                f"key set {k.id} is bound to contract {k.contract_id}, not {contract_id}",
                reason="keyset_contract_mismatch",
            )
        refresh_revocation(s, k, now=now)
        if k.revoked_at is not None:
            raise Forbidden(f"keyset revoked ({k.revoked_reason}); register a new key set", reason="keyset_revoked")
        ref = current_plan(s, off, k.contract_id)
        if k.plan_digest != ref.digest:
            raise Conflict(
                f"key set {k.id} was made for plan {k.plan_digest}, but the offering now serves "
                f"{ref.digest}: generate keys for the new plan and register them"
            )
        compiled = None
        if off.hosting == Hosting.MARKETPLACE:
            art = latest_artifact(s, ref.version.id, "compiled") if ref.version is not None else None
            if art is None:
                raise Conflict(f"offering {off.id} has no compiled model; its provider must compile it")
            compiled = (art.id, bytes(art.wrapped_key), art.aad, art.blob)
        return _Prepared(
            offering_id=off.id,
            hosting=off.hosting,
            keyset=keyset_public(k),
            plan=ref.plan,
            plan_json=ref.plan.to_json(),
            version_id=ref.version.id if ref.version else None,
            version_number=ref.version.number if ref.version else None,
            compiled=compiled,
        )


def _compute(rt: Runtime, prep: _Prepared, body: bytes) -> bytes:
    """Raises Invalid (the request does not fit), Unavailable (no worker/agent)."""
    if prep.hosting == Hosting.PROVIDER:
        meta = {
            "keyset_id": prep.keyset["id"],
            "plan_digest": prep.keyset["plan_digest"],
            "version": prep.version_number,
        }
        try:
            out: bytes = dispatch.run_on_agent(
                rt,
                offering_id=prep.offering_id,
                kind="he_infer",
                payload=body,
                meta=meta,
                timeout=AGENT_TIMEOUT_SECONDS,
            )
        except (Unavailable, Invalid):
            raise
        except Exception as e:  # noqa: BLE001 - whatever the agent path raised, answer cleanly
            if getattr(e, "status", 0) in (409, 422):
                raise Invalid(f"the provider's agent refused the request: {getattr(e, 'message', e)}") from e
            raise Unavailable(f"the provider's agent did not answer ({type(e).__name__})") from e
        try:
            wire.decode(out, prep.plan, kind=wire.KIND_RESPONSE)
        except (ValueError, TypeError) as e:
            raise Unavailable(f"the provider's agent sent a malformed result: {e}") from e
        return out
    if prep.compiled is None or prep.version_id is None:
        raise Unavailable("no compiled model for this offering")
    _art_id, wrapped, aad, blob = prep.compiled
    task = HETask(
        store=rt.store_spec,
        version_id=prep.version_id,
        model_blob=blob,
        wrapped_key=wrapped,
        aad=aad,
        keyset_id=prep.keyset["id"],
        keyset_blob=prep.keyset["digest"],
        plan_json=prep.plan_json,
        request=body,
    )
    try:
        return rt.executor.run_he(task, timeout=COMPUTE_TIMEOUT_SECONDS)
    except ComputeError as e:
        if e.kind == "invalid":
            raise Invalid(f"ciphertexts do not fit the plan and key set: {e.message}") from None
        raise Unavailable(f"compute failed: {e.message}") from None


def infer(
    rt: Runtime,
    p: Principal,
    offering_id: str,
    body: bytes,
    *,
    idempotency_key: str | None,
    keyset_id: str | None,
    contract_id: str | None,
    who: audit.Actor,
    now: datetime | None = None,
) -> InferResult:
    """Metered encrypted inference: one unit per sample; charged only on success; replays.

    Raises Invalid (no idempotency key / key set header, malformed ciphertexts: 422, never
    charged), NotFound, Forbidden (keyset revoked or bound to another contract), PolicyDenied,
    Conflict, Unavailable.
    """
    t0 = time.perf_counter()
    p.require("consumer")
    idempotency_key = metering.check_idempotency_key(idempotency_key)
    if not keyset_id:
        raise Invalid("the X-Som-Keyset header is required (register one with POST /v1/keysets)")
    now = now or utcnow()
    prep = _prepare(rt, p, offering_id, keyset_id=keyset_id, contract_id=contract_id, now=now)
    try:
        units = wire.count_samples(body, prep.plan)
    except (ValueError, TypeError) as e:
        raise Invalid(f"malformed HE request frame: {e}") from e
    request_digest = metering.request_digest("he_infer", prep.offering_id, prep.keyset["id"], body)
    with metering.reserved(
        rt,
        p,
        offering_id=prep.offering_id,
        mode="he_inference",
        units=units,
        idempotency_key=idempotency_key,
        request_digest=request_digest,
        contract_id=prep.keyset["contract_id"],
        keyset_id=prep.keyset["id"],
    ) as use:
        if use.replay is not None:
            r = use.replay
            return InferResult(r.body, r.media_type, r.usage_id, r.receipt, True, units)
        tm = time.perf_counter()
        try:
            out = _compute(rt, prep, body)
        except BaseException as e:
            _observe(prep, t0, tm, time.perf_counter(), ok=False, error_class=type(e).__name__)
            _audit_decrypt(rt, who, prep, units, outcome="failure")
            raise
        tc = time.perf_counter()
        _audit_decrypt(rt, who, prep, units, outcome="success")
        charged = use.commit(out, media_type=MEDIA_TYPE)
    _observe(prep, t0, tm, tc, ok=True)
    return InferResult(out, MEDIA_TYPE, charged.usage_id, charged.receipt, False, units)


def _observe(prep: _Prepared, t0: float, tm: float, tc: float, *, ok: bool, error_class: str | None = None) -> None:
    """One HE inference for monitoring: model = the computation (worker or agent, waiting for
    one included: the pool does not report its queue), overhead = everything else (lookups,
    metering, audit). Phases: [t0, tm) overhead, [tm, tc) model, [tc, now) overhead."""
    now = time.perf_counter()
    monitoring.record_inference(
        prep.offering_id,
        prep.version_number or 0,
        "he_inference",
        queue_s=0.0,
        model_s=tc - tm,
        overhead_s=(tm - t0) + (now - tc),
        ok=ok,
        error_class=error_class,
    )


def _audit_decrypt(rt: Runtime, who: audit.Actor, prep: _Prepared, units: int, *, outcome: str) -> None:
    if prep.compiled is None:
        return
    with rt.tx() as s:
        audit.emit(
            s,
            who,
            "artifact.decrypt",
            target=prep.compiled[0],
            outcome=outcome,
            detail={"purpose": "he_infer", "version": prep.version_id, "keyset_id": prep.keyset["id"], "units": units},
        )
