"""Shared trained models (real sklearn datasets, no downloads) for the HE tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler


def npz_bytes(layers):
    """layers: list of (weight (d_out, d_in), bias, activation)."""
    arrays = {}
    for i, (w, b, a) in enumerate(layers):
        arrays[f"layer{i}.weight"] = np.asarray(w, dtype=np.float64)
        arrays[f"layer{i}.bias"] = np.asarray(b, dtype=np.float64)
        arrays[f"layer{i}.activation"] = np.array(a)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="session")
def cancer():
    x, y = load_breast_cancer(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0)
    sc = StandardScaler().fit(xtr)
    return sc.transform(xtr), sc.transform(xte), ytr, yte


@pytest.fixture(scope="session")
def digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    return train_test_split(x, y, test_size=0.3, random_state=0)


@pytest.fixture(scope="session")
def lr_cancer(cancer):
    xtr, _, ytr, _ = cancer
    lr = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    return npz_bytes([(lr.coef_, lr.intercept_, "sigmoid")])


@pytest.fixture(scope="session")
def mlr_digits(digits):
    xtr, _, ytr, _ = digits
    lr = LogisticRegression(max_iter=2000).fit(xtr, ytr)
    return npz_bytes([(lr.coef_, lr.intercept_, "softmax")])


@pytest.fixture(scope="session")
def mlp_digits(digits):
    """64-32-10 with x^2 activation, trained in numpy (full-batch Adam, ~1 s)."""
    xtr, _, ytr, _ = digits
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.15, (64, 32))
    b1 = np.zeros(32)
    w2 = rng.normal(0, 0.15, (32, 10))
    b2 = np.zeros(10)
    params = [w1, b1, w2, b2]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    onehot = np.eye(10)[ytr]
    for t in range(1, 401):
        z1 = xtr @ w1 + b1
        h = z1 * z1
        z2 = h @ w2 + b2
        p = np.exp(z2 - z2.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        g2 = (p - onehot) / len(xtr)
        gh = g2 @ w2.T
        g1 = gh * 2 * z1
        grads = [xtr.T @ g1 + 1e-4 * w1, g1.sum(0), h.T @ g2 + 1e-4 * w2, g2.sum(0)]
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] -= 0.01 * (m[i] / (1 - 0.9**t)) / (np.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
    return npz_bytes([(w1.T, b1, "square"), (w2.T, b2, "softmax")])
