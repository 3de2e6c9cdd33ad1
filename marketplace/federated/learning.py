"""Pure numpy binary logistic regression: local training, evaluation, the ``.npz`` artifact.

Parameters are a list ``[w (d,), b (1,)]`` of float64 arrays, the form Flower's NumPyClient
carries. Features are standardised with the federation's published scaler (``mean``, ``scale``)
before training; the artifact folds the scaler into the weights, so the stored model takes raw
features (the catalog's ``som-layers-v1`` npz: one layer, sigmoid output).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence

import numpy as np

__all__ = ["accuracy", "init_params", "load_csv", "predict", "to_npz", "train"]

Params = list[np.ndarray]
MAX_ROWS = 1_000_000


def init_params(dim: int) -> Params:
    return [np.zeros(dim, dtype=np.float64), np.zeros(1, dtype=np.float64)]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))
    return out


def predict(params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    return _sigmoid(x @ params[0] + params[1][0])


def train(
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch: int = 32,
    l2: float = 1e-3,
    seed: int = 0,
) -> Params:
    """Mini-batch gradient descent on the logistic loss (+ ``l2``); returns new parameters."""
    w = np.array(params[0], dtype=np.float64)
    b = float(params[1][0])
    rng = np.random.default_rng(seed)
    n = len(y)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            err = _sigmoid(x[idx] @ w + b) - y[idx]
            w -= lr * (x[idx].T @ err / len(idx) + l2 * w)
            b -= lr * float(err.mean())
    return [w, np.array([b])]


def accuracy(params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return 0.0
    return float(np.mean((predict(params, x) >= 0.5) == (y >= 0.5)))


def load_csv(data: bytes | str, *, dim: int, label: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``dim`` numeric features plus a 0/1 ``label`` column (by header name, else last).

    Raises ValueError naming the row for anything else (the participant's data stays local, so
    this runs on the participant's machine only)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise ValueError("empty CSV")
    col = header.index(label) if label in header else len(header) - 1
    if len(header) != dim + 1:
        raise ValueError(f"expected {dim} feature columns and a label, got {len(header)} columns")
    xs: list[list[float]] = []
    ys: list[float] = []
    for i, row in enumerate(reader, start=2):
        if len(row) != len(header):
            raise ValueError(f"row {i}: expected {len(header)} values, got {len(row)}")
        try:
            vals = [float(v) for v in row]
        except ValueError as e:
            raise ValueError(f"row {i}: {e}") from e
        yv = vals.pop(col)
        if yv not in (0.0, 1.0) or not all(np.isfinite(vals)):
            raise ValueError(f"row {i}: the label must be 0 or 1 and features finite")
        xs.append(vals)
        ys.append(yv)
        if len(ys) > MAX_ROWS:
            raise ValueError(f"more than {MAX_ROWS} rows")
    if not ys:
        raise ValueError("no data rows")
    return np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)


def to_npz(params: Sequence[np.ndarray], mean: np.ndarray, scale: np.ndarray) -> bytes:
    """The model on raw features as a ``som-layers-v1`` npz (scaler folded into the weights)."""
    w = np.asarray(params[0], dtype=np.float64) / scale
    b = float(params[1][0]) - float(np.dot(w, mean))
    buf = io.BytesIO()
    np.savez(
        buf,
        **{"layer0.weight": w.reshape(1, -1), "layer0.bias": np.array([b]), "layer0.activation": np.array("sigmoid")},
    )
    return buf.getvalue()
