"""The computations of remote jobs, run at the compute site (agent or marketplace worker).

For: ``predict`` (batch inference over CSV/NPY features), ``evaluate`` (aggregate metrics over
labelled data: only the metrics leave), and ``custom`` (approved consumer code in the jail of
:func:`marketplace.services.sandbox.run_isolated`). Model artifacts are the declarative formats of
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
from typing import TYPE_CHECKING, Any

import numpy as np

from marketplace.agent.payload import JobInput, JobResult, code_digest

if TYPE_CHECKING:
    from marketplace.services.jail import JailConfig

__all__ = ["JobFailed", "Limits", "Model", "load_model", "run_job", "sealed_input_error"]


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
    """Parse an artifact (``npz`` or ``onnx``). Raises ValueError / crypto.errors.HEError."""
    from crypto.he.compiler import load_artifact

    raw = load_artifact(data, fmt)
    layers = tuple((np.asarray(x.weight), np.asarray(x.bias), str(x.activation)) for x in raw.layers)
    return Model(data=data, fmt=fmt, layers=layers, postprocess=raw.postprocess)


def sealed_input_error(e: Exception) -> str:
    """The stored message for a sealed input that did not open. It names the kind of failure,
    never text from inside the seal (which the provider and the operator could read)."""
    from crypto.errors import DecryptionError

    if isinstance(e, DecryptionError):
        return "the sealed input did not open: it is not sealed to this compute site's key for this job"
    return "the sealed input did not open: its content is malformed (re-create it with the SDK)"


def _parse_csv(text: str) -> np.ndarray:
    """CSV rows of numbers. Errors name the row and column (1-based lines of the input), never
    the value: the message is stored and shown to the provider."""
    lines = [(i, r) for i, r in enumerate(text.splitlines(), start=1) if r.strip()]
    if lines and any(c.isalpha() and c not in "eE" for c in lines[0][1].replace("nan", "")):
        lines = lines[1:]  # a header row
    out: list[list[float]] = []
    width: int | None = None
    for i, r in lines:
        cells = r.split(",")
        if width is not None and len(cells) != width:
            raise JobFailed("bad_input", f"row {i}: expected {width} columns, got {len(cells)}")
        width = len(cells)
        row: list[float] = []
        for j, v in enumerate(cells, start=1):
            try:
                row.append(float(v))
            except ValueError:
                raise JobFailed("bad_input", f"row {i}, column {j}: not a number") from None
        out.append(row)
    return np.array(out, dtype=np.float64).reshape(len(out), width or 0)


def _read_matrix(job: JobInput, *, labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if job.format == "csv":
            try:
                text = job.data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise JobFailed("bad_input", f"the csv input is not UTF-8 text (at byte {e.start})") from None
            arr = _parse_csv(text)
            if labelled:
                return arr[:, :-1], arr[:, -1]
            return arr, None
        if job.format == "npy":
            arr = np.load(io.BytesIO(job.data), allow_pickle=False)
            arr = np.asarray(arr, dtype=np.float64)
            if labelled:
                return arr[:, :-1], arr[:, -1]
            return arr, None
        with np.load(io.BytesIO(job.data), allow_pickle=False) as f:
            x = np.asarray(f["x"], dtype=np.float64)
            y = np.asarray(f["y"], dtype=np.float64) if labelled else None
        return x, y
    except (ValueError, KeyError, OSError, UnicodeDecodeError, IndexError, zipfile.BadZipFile) as e:
        # numpy's messages quote the input (header text, member names): only the kind is stored
        what = "array 'x' or 'y' missing" if isinstance(e, KeyError) else f"{type(e).__name__}"
        raise JobFailed("bad_input", f"cannot read the {job.format} input ({what})") from None


def _check_rows(x: np.ndarray, model: Model, max_rows: int | None) -> None:
    if x.ndim != 2 or x.shape[1] != model.input_dim:
        raise JobFailed("bad_input", f"expected rows of {model.input_dim} features, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise JobFailed("bad_input", "input has non-finite values")
    if max_rows is not None and x.shape[0] > max_rows:
        raise JobFailed("too_many_rows", f"input has {x.shape[0]} rows; the job declared at most {max_rows}")


def _predict(model: Model, job: JobInput, max_rows: int | None) -> JobResult:
    x, _ = _read_matrix(job, labelled=False)
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


def _evaluate(model: Model, job: JobInput, max_rows: int | None) -> JobResult:
    x, y = _read_matrix(job, labelled=True)
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
    from marketplace.services.jail import JailUnavailable, config_from_env, require
    from marketplace.services.sandbox import run_isolated

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
    jail: JailConfig | None = None,
) -> JobResult:
    """Run one opened job input against ``model``. Raises :class:`JobFailed`.

    ``jail``: how to jail ``custom`` code (default: from the environment,
    :func:`marketplace.services.jail.config_from_env`); where the jail cannot be set up the job
    fails with reason ``jail_unavailable`` unless the config's unsafe switch is on."""
    if job.kind != expected_kind:
        raise JobFailed("bad_input", f"sealed input is a {job.kind!r} job, the marketplace queued a {expected_kind!r} one")
    if job.kind == "predict":
        return _predict(model, job, max_rows)
    if job.kind == "evaluate":
        return _evaluate(model, job, max_rows)
    return _custom(model, job, approved_digest=approved_digest, limits=limits or Limits(), workdir=workdir, jail=jail)
