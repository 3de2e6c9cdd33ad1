"""HE plans: compiling a marketplace-hosted version, the plan a provider's agent publishes.

For: ``compile_version`` decrypts a marketplace-hosted model artifact in memory, compiles it with
:func:`crypto.he.compile_model`, stores the public plan and the compile report ("HE model
card") on the version and the compiled model as an envelope-encrypted artifact (purpose
``"compiled"``); ``set_agent_plan`` records the public plan a provider-hosted offering's agent
compiled next to the weights; ``current_plan`` answers which plan an offering serves now.
Not for: key sets (:mod:`marketplace.services.keysets`) or inference
(:mod:`marketplace.services.he`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.errors import HEError
from crypto.he import PublicPlan, compile_model, compile_report
from crypto.safe_arrays import inspect_npy, read_npy
from marketplace.db.base import utcnow
from marketplace.db.models import Artifact, Hosting, Offering, OfferingVersion
from marketplace.db.models_he import HEAgentPlan
from marketplace.errors import Conflict, Invalid, NotFound
from marketplace.runtime import Runtime
from marketplace.services import audit, catalog, validation
from marketplace.services.identity import Principal

__all__ = [
    "MAX_CALIBRATION_SAMPLES",
    "REPORT_SAMPLES",
    "PlanRef",
    "compile_version",
    "current_plan",
    "get_plan",
    "latest_artifact",
    "set_agent_plan",
]

MAX_CALIBRATION_SAMPLES = 100_000  # more says nothing new about activation ranges
REPORT_SAMPLES = 512  # the model card measures HE accuracy on this many calibration samples


def _version(s: Session, offering_id: str, number: int) -> OfferingVersion:
    v = s.scalar(
        select(OfferingVersion).where(OfferingVersion.offering_id == offering_id, OfferingVersion.number == number)
    )
    if v is None:
        raise NotFound(f"offering {offering_id} has no version {number}")
    return v


def latest_artifact(s: Session, version_id: str, purpose: str) -> Artifact | None:
    return s.scalar(
        select(Artifact)
        .where(Artifact.version_id == version_id, Artifact.purpose == purpose)
        .order_by(Artifact.created_at.desc(), Artifact.id.desc())
        .limit(1)
    )


@dataclass(frozen=True)
class PlanRef:
    """The plan an offering serves now, and (marketplace-hosted) the compiled version."""

    plan: PublicPlan
    digest: str
    version: OfferingVersion | None
    report: dict[str, Any] | None


def current_plan(s: Session, off: Offering, contract_id: str | None = None) -> PlanRef:
    """The plan ``off`` serves now (under ``contract_id``: the version it pinned). Raises Conflict when it has none."""
    P = PublicPlan
    if off.hosting == Hosting.PROVIDER:
        row = s.get(HEAgentPlan, off.id)
        if row is None:
            raise Conflict(f"offering {off.id} has no HE plan yet: its provider has not published one")
        plan = P.from_dict(row.plan)
        return PlanRef(plan, plan.digest(), None, row.report)
    v = validation.version_for(s, off.id, contract_id)
    if v is None or v.he_plan is None:
        raise Conflict(
            f"offering {off.id} is not compiled for encrypted inference: its provider must "
            "compile the latest version (som offering compile)"
        )
    plan = P.from_dict(v.he_plan)
    return PlanRef(plan, plan.digest(), v, v.he_report)


def get_plan(s: Session, p: Principal, offering_id: str, contract_id: str | None = None) -> dict[str, Any]:
    """The public plan of a visible offering: ``{"plan", "plan_digest", "report", "version"}``
    (with ``contract_id``, one of the caller's: the plan of the version that contract pinned)."""
    off = catalog.get_visible(s, p, offering_id)
    ref = current_plan(s, off, validation.party_contract(s, p, off.id, contract_id))
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
    try:  # the header decides (dtype, shape, size) before any data is read; never pickle
        h = inspect_npy(data)
    except ValueError as e:
        raise Invalid(f"calibration must be a numeric .npy array (np.save) of shape (n, {input_dim}): {e}") from e
    if len(h.shape) != 2 or h.shape[1] != input_dim or h.shape[0] < 1:
        raise Invalid(f"calibration: expected a numeric array of shape (n, {input_dim}), got {h.dtype}{h.shape}")
    if h.shape[0] > MAX_CALIBRATION_SAMPLES:
        raise Invalid(f"calibration: at most {MAX_CALIBRATION_SAMPLES} samples, got {h.shape[0]}")
    arr = read_npy(data, h)
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise Invalid("calibration values must be finite")
    return out


def compile_version(
    rt: Runtime,
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
        if off.hosting != Hosting.MARKETPLACE:
            raise Conflict(
                "provider-hosted offerings are compiled by their agent, next to the weights; "
                "publish the plan with PUT /v1/offerings/{id}/he/plan"
            )
        v = _version(s, off.id, number)
        art = latest_artifact(s, v.id, "model")
        if art is None:
            raise Conflict(f"version {number} has no stored model artifact")
        s.expunge(art)
        fmt, version_id, input_dim = v.format, v.id, int(v.input_shape[0]) if v.input_shape else 0
        audit.emit(s, who, "artifact.decrypt", target=art.id, detail={"purpose": "compile", "version": version_id})
    cal = _parse_calibration(calibration, input_dim)
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
        v.validation = validation.final_report(v, rt.settings)  # adds the HE agreement check
        off2 = s.get(Offering, offering_id)
        if off2 is not None:
            off2.updated_at = utcnow()
        audit.emit(
            s,
            who,
            "offering.version.compile",
            target=f"{offering_id}/v{number}",
            detail={"plan_digest": report["plan_digest"], "depth": plan.depth},
        )
        s.flush()
        s.refresh(v)
        s.expunge(v)
    return v


def set_agent_plan(
    rt: Runtime,
    p: Principal,
    offering_id: str,
    plan_json: dict[str, Any],
    report: dict[str, Any] | None,
    *,
    who: audit.Actor,
) -> dict[str, Any]:
    """Publish the public plan a provider-hosted offering's agent compiled (provider, owner)."""
    p.require("provider")
    try:
        plan = PublicPlan.from_dict(plan_json)
    except (TypeError, ValueError) as e:
        raise Invalid(f"not a public HE plan: {e}") from e
    with rt.tx() as s:
        off = catalog.get_owned(s, p, offering_id)
        if off.hosting != Hosting.PROVIDER:
            raise Conflict("marketplace-hosted offerings are compiled by the marketplace (POST .../compile)")
        row = s.get(HEAgentPlan, off.id)
        if row is None:
            row = HEAgentPlan(offering_id=off.id, plan=plan.to_dict(), report=report, digest=plan.digest())
            s.add(row)
        else:
            row.plan, row.report, row.digest, row.updated_at = plan.to_dict(), report, plan.digest(), utcnow()
        audit.emit(s, who, "offering.he_plan.set", target=off.id, detail={"plan_digest": plan.digest()})
        return get_plan(s, p, off.id)
