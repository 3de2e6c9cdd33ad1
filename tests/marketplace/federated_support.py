"""Helpers of the federated tests and bench (no tests here): the non-IID breast-cancer split,
an offering with a parent version, and organisations holding a ``federated`` contract."""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from crypto.signing import SigningKey
from marketplace.federated import learning


@dataclass
class Split:
    parts: list[tuple[np.ndarray, np.ndarray]]  # each organisation's (x, y), disjoint
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


def breast_cancer_split(n_orgs: int = 3, seed: int = 0) -> Split:
    """Disjoint, non-IID parts: organisation i holds mostly one class (label skew) and, within
    it, the rows of one range of the first feature (tumour radius: covariate skew)."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    y = y.astype(np.float64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = len(y) * 3 // 10
    test, train = order[:n_test], order[n_test:]
    # the published scaler: computed on the provider's held-out set, not on anyone's training rows
    mean, scale = x[test].mean(0), x[test].std(0) + 1e-12
    pos, neg = train[y[train] == 1], train[y[train] == 0]
    pos = pos[np.argsort(x[pos, 0])]
    neg = neg[np.argsort(x[neg, 0])]
    shares = np.linspace(0.8, 0.2, n_orgs) if n_orgs > 1 else np.array([0.5])
    pos_cuts = np.array_split(pos, n_orgs)
    neg_cuts = np.array_split(neg, n_orgs)[::-1]
    parts = []
    for i in range(n_orgs):
        idx = np.concatenate([pos_cuts[i], neg_cuts[i]])
        # thin the minority class so each part is label-skewed to ~shares[i] positives
        p_i, n_i = len(pos_cuts[i]), len(neg_cuts[i])
        want_neg = int(p_i * (1 - shares[i]) / shares[i]) if shares[i] > 0.5 else n_i
        want_pos = int(n_i * shares[i] / (1 - shares[i])) if shares[i] < 0.5 else p_i
        idx = np.concatenate([pos_cuts[i][:want_pos], neg_cuts[i][:want_neg]])
        parts.append((x[idx], y[idx]))
    return Split(parts, x[test], y[test], mean, scale)


def local_accuracy(split: Split, i: int, *, epochs: int = 50, lr: float = 0.1) -> float:
    x, y = split.parts[i]
    p = learning.train(learning.init_params(x.shape[1]), (x - split.mean) / split.scale, y, epochs=epochs, lr=lr)
    return learning.accuracy(p, (split.x_test - split.mean) / split.scale, split.y_test)


def central_accuracy(split: Split, *, epochs: int = 50, lr: float = 0.1) -> float:
    x = np.concatenate([p[0] for p in split.parts])
    y = np.concatenate([p[1] for p in split.parts])
    p = learning.train(learning.init_params(x.shape[1]), (x - split.mean) / split.scale, y, epochs=epochs, lr=lr)
    return learning.accuracy(p, (split.x_test - split.mean) / split.scale, split.y_test)


def model_accuracy(npz: bytes, split: Split) -> float:
    z = np.load(io.BytesIO(npz), allow_pickle=False)
    params = [z["layer0.weight"][0], z["layer0.bias"]]
    return learning.accuracy(params, split.x_test, split.y_test)


def to_csv(x: np.ndarray, y: np.ndarray) -> str:
    head = ",".join(f"f{i}" for i in range(x.shape[1])) + ",label"
    return head + "\n" + "\n".join(",".join(repr(float(v)) for v in row) + f",{int(t)}" for row, t in zip(x, y)) + "\n"


def federated_terms(**kw: Any) -> Any:
    from tests.marketplace.test_contracts_support import make_terms

    return make_terms(modes=("federated", "he_inference"), **kw)


def open_offering(world: Any, dim: int = 30) -> tuple[str, SigningKey]:
    """A published marketplace-hosted offering with a zero logistic regression as version 1."""
    off = world.provider.create_offering(name="tumour-lr", task="binary-classification", hosting="marketplace")
    world.provider.upload_version(
        off["id"],
        learning.to_npz(learning.init_params(dim), np.zeros(dim), np.ones(dim)),
        format="npz",
        input_shape=[dim],
    )
    world.provider.publish(off["id"])
    return off["id"], SigningKey.generate()


def participant_orgs(
    world: Any,
    offering_id: str,
    signing_key: SigningKey,
    n: int,
    *,
    modes: tuple[str, ...] = ("federated", "he_inference"),
) -> list[tuple[str, str]]:
    """``n`` consumer organisations, each with an accepted contract in ``modes``: (org id, key)."""
    from marketplace.sdk import SomClient
    from tests.marketplace.test_contracts_support import make_terms

    offer = world.provider.publish_offer(offering_id, make_terms(modes=modes), signing_key=signing_key)
    out = []
    for i in range(n):
        org = world.admin.create_org(f"hospital-{i}-{secrets.token_hex(4)}")
        key = world.admin.create_key(org["id"], ["consumer"], name=f"hospital-{i}")["key"]
        c = SomClient("http://testserver", key, http=world.client(key)._http)
        c.accept_offer(offer["id"], signing_key=SigningKey.generate())
        out.append((org["id"], key))
    return out


@dataclass
class Federation:
    id: str
    offering_id: str
    orgs: list[tuple[str, str]]  # (org id, key)
    signing_key: SigningKey | None = None  # the provider's offer-signing key


def open_federation(
    world: Any, recipe: dict[str, Any], *, n: int = 3, terms: dict[str, Any] | None = None, split: Split | None = None
) -> Federation:
    off, sk = open_offering(world, 30)
    orgs = participant_orgs(world, off, sk, n)
    split = split or breast_cancer_split(n)
    full = {"dim": 30, "mean": split.mean.tolist(), "scale": split.scale.tolist(), **recipe}
    fed = world.provider.create_federation(off, full, terms=terms or {}, name="tumour")
    return Federation(fed["id"], off, orgs, sk)


def run_participants(
    url: str, fed: Federation, split: Split, *, stops: dict[int, Any] | None = None, wait: float = 2.0
) -> list[Any]:
    """One participant thread per organisation (the SDK over HTTP to ``url``); started, not joined.
    Returns the threads; each has ``.result`` when done."""
    import threading

    from marketplace.federated import participant
    from marketplace.sdk import SomClient

    threads = []
    for i, (_, key) in enumerate(fed.orgs):
        c = SomClient(url, key)
        x, y = split.parts[i]
        stop = (stops or {}).get(i)

        def body(c: Any = c, x: Any = x, y: Any = y, stop: Any = stop, t: list[Any] = threads, i: int = i) -> None:
            t[i].result = participant.run(c, fed.id, x, y, stop=stop, wait=wait, seed=i)

        th = threading.Thread(target=body, daemon=True)
        th.result = None  # type: ignore[attr-defined]
        threads.append(th)
    return threads


def wait_joined(world: Any, fed: Federation, n: int, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while len(world.provider.federation(fed.id)["participants"]) < n:
        assert time.monotonic() < deadline, "participants did not join"
        time.sleep(0.05)


def wait_finished(world: Any, fed: Federation, timeout: float = 120.0) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        st = world.provider.federation(fed.id)
        if st["status"] not in ("open", "running"):
            return dict(st)
        assert time.monotonic() < deadline, f"federation still {st['status']} after {timeout}s"
        time.sleep(0.1)
