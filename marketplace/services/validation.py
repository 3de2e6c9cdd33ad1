"""Versions validated before anyone uses them, and the version a contract computes with.

For: the validation report stored on every version (``offering_versions.validation``): on
upload the artifact checks that already refuse bad uploads (format, operators, declared shape,
finite weights) plus a smoke inference; when the provider declares metrics (``PUT .../versions/
{n}/metadata``: metrics, the data they were measured on, notes, parent version, an evaluation
set), their re-computation on that set, refused beyond the stated tolerance; for a compiled
version, the HE compile report's measured agreement with the plaintext model on the calibration
data, refused below the provider's threshold (within bounds). Publishing an offering whose latest
version's report failed is refused with the report's reason (:func:`check_publishable`).
Contracts pin the version they were accepted on (:func:`version_to_pin`, :func:`version_for`).
Not for: the artifact parsers themselves (:mod:`crypto.he`), compiling (:mod:`.he_plans`).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from marketplace.db.base import utcnow
from marketplace.db.models import Artifact, Offering, OfferingVersion
from marketplace.db.models_contracts import ContractRow
from marketplace.errors import Conflict, Invalid, NotFound

__all__ = [
    "METRICS",
    "Status",
    "check_publishable",
    "evaluate",
    "final_report",
    "forward",
    "get_version",
    "model_artifact",
    "parse_meta",
    "party_contract",
    "upload_report",
    "version_for",
    "version_to_pin",
]


class Status(StrEnum):
    PASSED = "passed"
    FAILED = "failed"


#: Metrics re-computed on the provider's evaluation set: name -> (kind, description).
METRICS = {
    "accuracy": "share of labels predicted right (binary: logit > 0; multi-class: argmax)",
    "error_rate": "1 - accuracy",
    "precision": "binary: true positives / predicted positives",
    "recall": "binary: true positives / actual positives",
    "f1": "binary: harmonic mean of precision and recall",
    "mse": "mean squared error of the first output (regression)",
    "mae": "mean absolute error of the first output (regression)",
}


def forward(data: bytes, fmt: str, x: np.ndarray) -> np.ndarray:
    """The plaintext model's logits on ``x`` (exact activations)."""
    from crypto.he.compiler import _EXACT, load_artifact  # noqa: PLC0415 - crypto.he loads TenSEAL; only when used

    h = np.asarray(x, dtype=np.float64)
    for layer in load_artifact(data, fmt).layers:
        h = h @ layer.weight + layer.bias
        h = _EXACT[layer.activation](h)
    return h


def _check(name: str, ok: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail}


def _summarise(checks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    failed = [c for c in checks if not c["ok"]]
    return {
        "status": (Status.FAILED if failed else Status.PASSED).value,
        "reason": "; ".join(f"{c['name']}: {c['detail']}" for c in failed) if failed else "",
        "checks": checks,
        "validated_at": utcnow().isoformat(),
        **extra,
    }


def upload_report(data: bytes, fmt: str, info: dict[str, Any]) -> dict[str, Any]:
    """The report of an upload that passed the parsers: their checks, and a smoke inference."""
    checks = [
        _check("format", True, f"{fmt} parsed without running code"),
        _check("operators", True, f"supported: {', '.join(info.get('operators', [])) or 'affine layers'}"),
        _check("shape", True, f"input [{info.get('input_dim')}], output [{info.get('output_dim')}]"),
        _check("finite", True, "every weight is finite"),
    ]
    dim = int(info.get("input_dim", 0))
    try:
        x = np.random.default_rng(0).standard_normal((8, dim))
        out = forward(data, fmt, x)
        ok = out.shape == (8, int(info.get("output_dim") or out.shape[-1])) and bool(np.isfinite(out).all())
        checks.append(
            _check(
                "smoke_inference", ok, f"8 random inputs gave {'finite' if ok else 'non-finite or misshapen'} outputs"
            )
        )
    except Exception as e:  # noqa: BLE001 - any failure of the model on real input fails the check
        checks.append(_check("smoke_inference", False, f"the model failed on a random input: {type(e).__name__}"))
    return _summarise(checks)


def _metric(name: str, logits: np.ndarray, y: np.ndarray) -> float:
    if name in ("mse", "mae"):
        err = logits[:, 0] - y
        return float(np.mean(err * err) if name == "mse" else np.mean(np.abs(err)))
    pred = (logits[:, 0] > 0).astype(np.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)
    yi = y.astype(np.int64)
    acc = float(np.mean(pred == yi))
    if name == "accuracy":
        return acc
    if name == "error_rate":
        return 1.0 - acc
    tp = float(np.sum((pred == 1) & (yi == 1)))
    prec = tp / max(float(np.sum(pred == 1)), 1.0)
    rec = tp / max(float(np.sum(yi == 1)), 1.0)
    if name == "precision":
        return prec
    if name == "recall":
        return rec
    return 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)


def _eval_set(body: dict[str, Any], dim: int, max_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
    ev = body.get("evaluation")
    if ev is None:
        return None
    if not isinstance(ev, dict) or set(ev) != {"x", "y"}:
        raise Invalid('evaluation must be {"x": [[...], ...], "y": [...]}')
    try:
        x = np.asarray(ev["x"], dtype=np.float64)
        y = np.asarray(ev["y"], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise Invalid(f"evaluation: numbers expected ({e})") from e
    if x.ndim != 2 or x.shape[1] != dim or y.shape != (x.shape[0],) or not 1 <= x.shape[0] <= max_rows:
        raise Invalid(f"evaluation: x must be 1..{max_rows} rows of {dim} numbers and y one number per row")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise Invalid("evaluation: every number must be finite")
    return x, y


def parse_meta(body: dict[str, Any], settings: Any) -> dict[str, Any]:
    """The stored metadata of a version (no evaluation set): checked, with its bounds applied."""
    metrics = body.get("metrics") or {}
    if not isinstance(metrics, dict) or len(metrics) > 20:
        raise Invalid("metrics must be an object of at most 20 name -> number")
    for k, v in metrics.items():
        if k not in METRICS:
            raise Invalid(f"metric {k!r} cannot be re-computed; declare one of {sorted(METRICS)}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v):
            raise Invalid(f"metric {k!r} must be a finite number")
    tol = body.get("tolerance", settings.validation_tolerance_default)
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol <= settings.validation_tolerance_max:
        raise Invalid(f"tolerance must be a number in [0, {settings.validation_tolerance_max}]")
    he_min = body.get("he_min_agreement", settings.validation_he_agreement_default)
    floor = settings.validation_he_agreement_floor
    if isinstance(he_min, bool) or not isinstance(he_min, int | float) or not floor <= he_min <= 1:
        raise Invalid(f"he_min_agreement must be a number in [{floor}, 1]")
    text = {k: body.get(k) or "" for k in ("measured_on", "notes")}
    for k, v in text.items():
        if not isinstance(v, str) or len(v) > 4000:
            raise Invalid(f"{k} must be a string of at most 4000 characters")
    parent = body.get("parent")
    if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int) or parent < 1):
        raise Invalid("parent must be a version number")
    return {
        "metrics": {k: float(v) for k, v in metrics.items()},
        **text,
        "parent": parent,
        "tolerance": float(tol),
        "he_min_agreement": float(he_min),
    }


def evaluate(
    data: bytes, fmt: str, info: dict[str, Any], body: dict[str, Any], settings: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metadata, report): the declared metrics re-computed on the provider's evaluation set."""
    meta = parse_meta(body, settings)
    ev = _eval_set(body, int(info.get("input_dim", 0)), settings.validation_eval_max_rows)
    base = upload_report(data, fmt, info)
    checks = list(base["checks"])
    measured: dict[str, Any] = {}
    if meta["metrics"] and ev is None:
        checks.append(_check("metrics", False, "declared metrics need an evaluation set to be re-computed"))
    elif ev is not None:
        x, y = ev
        logits = forward(data, fmt, x)
        for name, declared in meta["metrics"].items():
            got = _metric(name, logits, y)
            ok = abs(got - declared) <= meta["tolerance"] + 1e-12
            measured[name] = {"declared": declared, "measured": round(got, 6), "tolerance": meta["tolerance"], "ok": ok}
            checks.append(
                _check(
                    f"metric:{name}",
                    ok,
                    f"declared {declared:g}, measured {got:.4g} on "
                    f"{x.shape[0]} evaluation rows (tolerance {meta['tolerance']:g})",
                )
            )
    return meta, _summarise(checks, metrics=measured, evaluation_rows=0 if ev is None else int(ev[0].shape[0]))


def final_report(v: OfferingVersion, settings: Any) -> dict[str, Any] | None:
    """The version's report with the HE check when it is compiled (agreement vs the threshold)."""
    rep = v.validation
    if rep is None:
        return None
    checks = [c for c in rep.get("checks", []) if c.get("name") != "he_agreement"]
    if v.he_report is not None:
        thr = float((v.meta or {}).get("he_min_agreement", settings.validation_he_agreement_default))
        got = float(v.he_report.get("argmax_agreement", 0.0))
        checks.append(
            _check(
                "he_agreement",
                got >= thr,
                f"HE agrees with the plaintext model on {got:.4f} of "
                f"{v.he_report.get('report_samples', '?')} calibration samples (threshold {thr:g}); "
                f"max logit error {float(v.he_report.get('max_abs_error_vs_exact', 0.0)):.3g}",
            )
        )
    keep = {k: rep[k] for k in ("metrics", "evaluation_rows") if k in rep}
    out = _summarise(checks, **keep)
    out["validated_at"] = rep.get("validated_at", out["validated_at"])
    return out


def get_version(s: Session, offering_id: str, number: int) -> OfferingVersion:
    v = s.scalar(
        select(OfferingVersion).where(OfferingVersion.offering_id == offering_id, OfferingVersion.number == number)
    )
    if v is None:
        raise NotFound(f"offering {offering_id} has no version {number}")
    return v


def latest(s: Session, offering_id: str) -> OfferingVersion | None:
    return s.scalar(
        select(OfferingVersion)
        .where(OfferingVersion.offering_id == offering_id)
        .order_by(OfferingVersion.number.desc())
        .limit(1)
    )


def check_publishable(s: Session, off: Offering, settings: Any = None) -> None:
    """Raise Conflict with the report's reason when the latest version's validation failed."""
    v = latest(s, off.id)
    if v is None or v.validation is None:
        return
    rep = final_report(v, settings or _defaults())
    v.validation = rep
    if rep is not None and rep["status"] == Status.FAILED.value:
        raise Conflict(f"version {v.number} failed validation: {rep['reason']}", reason="validation_failed")


def _defaults() -> Any:
    # lazy import: only the bounds, when no runtime is at hand
    from marketplace.settings import Settings  # noqa: PLC0415 - the bounds only, when no runtime is at hand

    return Settings()


def version_to_pin(s: Session, offering_id: str) -> int | None:
    """The version a contract accepted now pins: the latest whose validation did not fail."""
    for v in s.scalars(
        select(OfferingVersion)
        .where(OfferingVersion.offering_id == offering_id)
        .order_by(OfferingVersion.number.desc())
    ):
        if (v.validation or {}).get("status") != Status.FAILED.value:
            return int(v.number)
    return None


def version_for(s: Session, offering_id: str, contract_id: str | None) -> OfferingVersion | None:
    """The version a use under ``contract_id`` computes with: the pinned one; else the latest."""
    c = s.get(ContractRow, contract_id) if contract_id else None
    if c is not None and c.version_number is not None:
        v = s.scalar(
            select(OfferingVersion).where(
                OfferingVersion.offering_id == offering_id, OfferingVersion.number == c.version_number
            )
        )
        if v is None:
            raise NotFound(f"contract {c.id} pins version {c.version_number}, which no longer exists")
        return v
    return latest(s, offering_id)


def party_contract(s: Session, p: Any, offering_id: str, contract_id: str | None) -> str | None:
    """``contract_id`` if the caller's organisation is a party to it, on ``offering_id`` (else 404)."""
    if not contract_id:
        return None
    c = s.get(ContractRow, contract_id)
    if c is None or c.offering_id != offering_id or p.org_id not in (c.consumer_org_id, c.provider_org_id):
        raise NotFound(f"contract {contract_id} not found", denied=contract_id)
    return c.id


def model_artifact(s: Session, v: OfferingVersion) -> Artifact | None:
    return s.scalar(
        select(Artifact)
        .where(Artifact.version_id == v.id, Artifact.purpose == "model")
        .order_by(Artifact.created_at.desc())
        .limit(1)
    )
