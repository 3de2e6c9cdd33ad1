"""The computations of remote jobs, run at the compute site (agent or marketplace worker).

For: ``predict`` (batch inference over CSV/NPY/NPZ features, bounded before parsing: CSV rows,
columns and cell lengths; ``.npy``/``.npz`` headers, sizes and rows against the paid units via
:mod:`crypto.safe_arrays`, before any data is decompressed), ``evaluate`` (aggregate metrics over
labelled data: only the metrics leave), and ``custom`` (approved consumer code in the jail of
:func:`marketplace.compute.sandbox.run_isolated`). Model artifacts are the declarative formats of
:mod:`crypto.he.compiler` (``.npz`` layers or ONNX), loaded without pickle.
Not for: deciding whether code may run (approval is the marketplace's state machine) or sealing.

Errors: :class:`JobFailed` with a short ``reason`` (``bad_input``, ``too_many_rows``,
``cpu_limit``, ``memory_limit``, ``timeout``, ``jail_unavailable``, ``error``) and a message for
the consumer. The message is stored in the clear and shown to the provider too, so it never
contains input values (nor a custom job's stderr): it names rows and columns
(``row 3, column 2: not a number``).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crypto.errors import DecryptionError
from crypto.safe_arrays import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RATIO,
    inspect_npy,
    inspect_npz,
    read_npy,
)
from marketplace.compute.jail import JailConfig, JailUnavailable, config_from_env, require
from marketplace.compute.payload import JobInput, JobResult, code_digest
from marketplace.compute.sandbox import run_isolated

__all__ = ["InputLimits", "JobFailed", "Limits", "Model", "load_model", "run_job", "sealed_input_error"]


class JobFailed(Exception):
    """The job cannot produce a result; ``reason`` is machine-readable, ``message`` is for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 60
    memory_mb: int = 1024
    wall_seconds: float = 120.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Limits:
        return cls(int(d.get("cpu_seconds", 60)), int(d.get("memory_mb", 1024)), float(d.get("wall_seconds", 120.0)))


@dataclass(frozen=True)
class Model:
    """A loaded artifact: the raw bytes (for custom jobs) and its affine layers."""

    data: bytes
    fmt: str
    layers: tuple[tuple[np.ndarray, np.ndarray, str], ...]  # (weight (d_in, d_out), bias, activation)
    postprocess: str | None

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Exact plaintext forward pass, including the final sigmoid/softmax."""
        h = np.asarray(x, dtype=np.float64)
        for w, b, act in self.layers:
            h = h @ w + b
            if act == "relu":
                h = np.maximum(h, 0.0)
            elif act == "sigmoid":
                h = 1.0 / (1.0 + np.exp(-h))
            elif act == "tanh":
                h = np.tanh(h)
            elif act == "square":
                h = h * h
        if self.postprocess == "sigmoid":
            h = 1.0 / (1.0 + np.exp(-h))
        elif self.postprocess == "softmax":
            e = np.exp(h - h.max(axis=1, keepdims=True))
            h = e / e.sum(axis=1, keepdims=True)
        return h


def load_model(data: bytes, fmt: str) -> Model:
    """Parse an artifact (``npz`` or ``onnx``) with the one safe loader of :mod:`crypto.he.compiler`
    (``.npz`` checked before decompression, ONNX external data refused). Raises ValueError / crypto.errors.HEError."""
    from crypto.he.compiler import load_artifact  # start-up cost: imports TenSEAL and ONNX (0.4 s)

    raw = load_artifact(data, fmt)
    layers = tuple((np.asarray(x.weight), np.asarray(x.bias), str(x.activation)) for x in raw.layers)
    return Model(data=data, fmt=fmt, layers=layers, postprocess=raw.postprocess)


def sealed_input_error(e: Exception) -> str:
    """The stored message for a sealed input that did not open. It names the kind of failure,
    never text from inside the seal (which the provider and the operator could read)."""
    if isinstance(e, DecryptionError):
        return "the sealed input did not open: it is not sealed to this compute site's key for this job"
    return "the sealed input did not open: its content is malformed (re-create it with the SDK)"


@dataclass(frozen=True)
class InputLimits:
    """Bounds on a job input, applied from metadata before the data is parsed or decompressed."""

    max_decompressed: int = DEFAULT_MAX_BYTES
    max_ratio: float = DEFAULT_MAX_RATIO
    max_cell_chars: int = 64


def _too_many(n: int | str, max_rows: int | None) -> JobFailed:
    return JobFailed("too_many_rows", f"input has {n} rows; the job declared at most {max_rows}")


def _check_shape(shape: tuple[int, ...], width: int, max_rows: int | None) -> None:
    """Shape from the .npy header against the model and the paid units, before any data is read."""
    if len(shape) != 2 or shape[1] != width:
        raise JobFailed("bad_input", f"expected rows of {width} columns, got shape {shape}")
    if max_rows is not None and shape[0] > max_rows:
        raise _too_many(shape[0], max_rows)


def _read_csv(data: bytes, *, width: int, max_rows: int | None, limits: InputLimits) -> np.ndarray:
    # Rows, columns and cell lengths are bounded before anything is converted; errors name rows
    # and columns, never the values in them.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JobFailed("bad_input", "cannot read the csv input: it is not UTF-8") from e
    if max_rows is not None and text.count("\n") > max_rows + 2:  # a header line, a last newline
        raise _too_many("more than " + str(max_rows + 1), max_rows)
    lines = [ln.rstrip("\r") for ln in text.split("\n")]
    rows = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if rows and any(c.isalpha() and c not in "eE" for c in rows[0][1].replace("nan", "")):
        rows = rows[1:]  # a header row
    if max_rows is not None and len(rows) > max_rows:
        raise _too_many(len(rows), max_rows)
    if not rows:
        raise JobFailed("bad_input", "the csv input has no rows")
    out = np.empty((len(rows), width), dtype=np.float64)
    for r, (line_no, ln) in enumerate(rows):
        n = ln.count(",") + 1
        if n != width:
            raise JobFailed("bad_input", f"csv line {line_no}: expected {width} columns, got {n}")
        for c, cell in enumerate(ln.split(",")):
            if len(cell) > limits.max_cell_chars:
                raise JobFailed(
                    "bad_input",
                    f"csv line {line_no}, column {c + 1}: cell longer than {limits.max_cell_chars} characters",
                )
            try:
                out[r, c] = float(cell)
            except ValueError:
                raise JobFailed("bad_input", f"csv line {line_no}, column {c + 1}: not a number") from None
    return out


def _read_matrix(
    job: JobInput, *, labelled: bool, d_in: int, max_rows: int | None, limits: InputLimits
) -> tuple[np.ndarray, np.ndarray | None]:
    width = d_in + (1 if labelled else 0)
    try:
        if job.format == "csv":
            arr = _read_csv(job.data, width=width, max_rows=max_rows, limits=limits)
        elif job.format == "npy":
            h = inspect_npy(job.data, max_bytes=limits.max_decompressed)
            _check_shape(h.shape, width, max_rows)
            arr = read_npy(job.data, h).astype(np.float64)
        else:
            ar = inspect_npz(
                job.data,
                names=("x", "y"),
                required=("x", "y") if labelled else ("x",),
                max_bytes=limits.max_decompressed,
                max_ratio=limits.max_ratio,
            )
            _check_shape(ar.headers["x"].shape, d_in, max_rows)
            if labelled and ar.headers["y"].shape not in ((ar.headers["x"].shape[0],), (ar.headers["x"].shape[0], 1)):
                raise JobFailed("bad_input", "evaluate needs one label per row (the last CSV column, or y in the npz)")
            x = ar.read("x").astype(np.float64)
            y = ar.read("y").astype(np.float64).reshape(-1) if labelled else None
            return x, y
    except ValueError as e:
        raise JobFailed("bad_input", f"cannot read the {job.format} input: {e}") from e
    if labelled:
        return arr[:, :-1], arr[:, -1]
    return arr, None


def _check_rows(x: np.ndarray, model: Model, max_rows: int | None) -> None:
    if x.ndim != 2 or x.shape[1] != model.input_dim:
        raise JobFailed("bad_input", f"expected rows of {model.input_dim} features, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise JobFailed("bad_input", "input has non-finite values")
    if max_rows is not None and x.shape[0] > max_rows:
        raise JobFailed("too_many_rows", f"input has {x.shape[0]} rows; the job declared at most {max_rows}")


def _predict(model: Model, job: JobInput, max_rows: int | None, limits: InputLimits) -> JobResult:
    x, _ = _read_matrix(job, labelled=False, d_in=model.input_dim, max_rows=max_rows, limits=limits)
    _check_rows(x, model, max_rows)
    y = model.predict(x)
    if job.format == "csv":
        body = "\n".join(",".join(repr(float(v)) for v in row) for row in y).encode() + b"\n"
        fmt = "csv"
    else:
        buf = io.BytesIO()
        np.save(buf, y, allow_pickle=False)
        body, fmt = buf.getvalue(), "npy"
    return JobResult(job_id=job.job_id, kind="predict", body=body, format=fmt, metrics={"rows": int(x.shape[0])})


def _evaluate(model: Model, job: JobInput, max_rows: int | None, limits: InputLimits) -> JobResult:
    x, y = _read_matrix(job, labelled=True, d_in=model.input_dim, max_rows=max_rows, limits=limits)
    _check_rows(x, model, max_rows)
    if y is None or y.shape[0] != x.shape[0]:
        raise JobFailed("bad_input", "evaluate needs one label per row (the last CSV column, or y in the npz)")
    p = model.predict(x)
    n = int(x.shape[0])
    metrics: dict[str, Any] = {"n": n}
    if p.shape[1] == 1 and model.postprocess == "sigmoid" or (p.shape[1] == 1 and set(np.unique(y)) <= {0.0, 1.0}):
        prob = p[:, 0] if model.postprocess == "sigmoid" else 1.0 / (1.0 + np.exp(-p[:, 0]))
        pred = (prob >= 0.5).astype(np.float64)
        eps = 1e-12
        metrics["accuracy"] = float(np.mean(pred == y))
        metrics["log_loss"] = float(-np.mean(y * np.log(prob + eps) + (1 - y) * np.log(1 - prob + eps)))
        tp = float(np.sum((pred == 1) & (y == 1)))
        metrics["precision"] = tp / max(float(np.sum(pred == 1)), 1.0)
        metrics["recall"] = tp / max(float(np.sum(y == 1)), 1.0)
    elif p.shape[1] > 1:
        metrics["accuracy"] = float(np.mean(np.argmax(p, axis=1) == y.astype(np.int64)))
    else:
        err = p[:, 0] - y
        metrics["mse"] = float(np.mean(err**2))
        metrics["mae"] = float(np.mean(np.abs(err)))
    return JobResult(job_id=job.job_id, kind="evaluate", metrics=metrics, format="json")


def _custom(
    model: Model, job: JobInput, *, approved_digest: str | None, limits: Limits, workdir: Path, jail: JailConfig | None
) -> JobResult:
    if job.code is None or approved_digest is None or code_digest(job.code) != approved_digest:
        raise JobFailed("not_approved", "the sealed code is not the code the provider approved")
    try:
        cfg = require(jail if jail is not None else config_from_env())
    except JailUnavailable as e:
        raise JobFailed("jail_unavailable", str(e)) from e
    ext = {"csv": "csv", "npy": "npy", "npz": "npz"}[job.format]
    try:
        res = run_isolated(
            job.code,
            inputs={f"model.{model.fmt}": model.data, f"data.{ext}": job.data},
            workdir=workdir,
            cpu_seconds=limits.cpu_seconds,
            memory_mb=limits.memory_mb,
            wall_seconds=limits.wall_seconds,
            jail=cfg,
        )
    except OSError as e:  # the job's cgroup or scratch folder could not be made
        raise JobFailed("jail_unavailable", f"the job jail could not be set up: {e}") from e
    if not res.ok:
        # The consumer's stderr is the consumer's output: it is not stored in the clear (the job's
        # error is read by the provider and the operator). Only the sandbox's own verdict is.
        raise JobFailed(res.reason, res.message)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in sorted(res.outputs.items()):
            z.writestr(name, data)
    return JobResult(
        job_id=job.job_id,
        kind="custom",
        body=buf.getvalue(),
        format="zip",
        metrics={"cpu_seconds": round(res.cpu_seconds, 3), "wall_seconds": round(res.wall_seconds, 3)},
        stdout=res.stdout,
        stderr=res.stderr,
        outputs=tuple(sorted(res.outputs)),
    )


def run_job(
    model: Model,
    job: JobInput,
    *,
    expected_kind: str,
    max_rows: int | None = None,
    approved_digest: str | None = None,
    limits: Limits | None = None,
    workdir: Path,
    input_limits: InputLimits | None = None,
    jail: JailConfig | None = None,
) -> JobResult:
    """Run one opened job input against ``model``. Raises :class:`JobFailed`.

    ``input_limits`` bound the parsing of predict/evaluate inputs (defaults: crypto.safe_arrays').
    ``jail``: how to jail ``custom`` code (default: from the environment,
    :func:`marketplace.compute.jail.config_from_env`); where the jail cannot be set up the job
    fails with reason ``jail_unavailable`` unless the config's unsafe switch is on."""
    if job.kind != expected_kind:
        raise JobFailed(
            "bad_input", f"sealed input is a {job.kind!r} job, the marketplace queued a {expected_kind!r} one"
        )
    if job.kind == "predict":
        with np.errstate(over="ignore", under="ignore"):  # exp of a large finite input saturates: fine
            return _predict(model, job, max_rows, input_limits or InputLimits())
    if job.kind == "evaluate":
        with np.errstate(over="ignore", under="ignore"):
            return _evaluate(model, job, max_rows, input_limits or InputLimits())
    return _custom(model, job, approved_digest=approved_digest, limits=limits or Limits(), workdir=workdir, jail=jail)
