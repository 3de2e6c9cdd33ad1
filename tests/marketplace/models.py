"""Small real models for tests: trained on scikit-learn's bundled data sets (no downloads)."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np


@lru_cache(maxsize=1)
def breast_cancer_lr() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """(X_train, X_test, y_test, weight (30,), bias, ...) of a standardized logistic regression."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-9
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    clf = LogisticRegression(max_iter=2000, C=0.5).fit(Xtr, ytr)
    return Xtr, Xte, yte, clf.coef_[0].copy(), clf.intercept_.copy(), float(clf.score(Xte, yte))


def npz_bytes(weight: np.ndarray, bias: np.ndarray, activation: str = "sigmoid") -> bytes:
    """One affine layer in the som-layers-v1 .npz format (weight is (d_out, d_in))."""
    w = np.atleast_2d(weight).astype(np.float64)
    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            "layer0.weight": w,
            "layer0.bias": np.asarray(bias, dtype=np.float64).reshape(-1),
            "layer0.activation": np.array(activation),
        },
    )
    return buf.getvalue()


def onnx_bytes(weight: np.ndarray, bias: np.ndarray, *, op: str = "Gemm") -> bytes:
    """A one-layer ONNX model: Gemm (transB=1) + Sigmoid, or an unsupported ``op`` in its place."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.atleast_2d(weight).astype(np.float32)
    b = np.asarray(bias, dtype=np.float32).reshape(-1)
    d_out, d_in = w.shape
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1), helper.make_node("Sigmoid", ["z"], ["y"])]
    else:
        nodes = [helper.make_node(op, ["x"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "lr",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()
