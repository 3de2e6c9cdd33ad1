"""Helpers for the job and agent tests (no tests here): models, offerings, contracts, agents."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from contracts.terms import JobLimits, Terms
from crypto.signing import SigningKey
from marketplace.db.base import utcnow

D_IN = 6


def model_arrays(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A recognisable (random-looking) logistic model: weight (1, D_IN), bias (1,)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1, D_IN)) * 1.37, rng.normal(size=(1,))


def model_npz(weight: np.ndarray, bias: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": weight, "layer0.bias": bias, "layer0.activation": np.array("sigmoid")})
    return buf.getvalue()


def features(n: int = 20, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D_IN))


def to_csv(x: np.ndarray) -> bytes:
    return ("\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n").encode()


def expected(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-(x @ weight.T + bias))))


def terms(*, quota: int = 10_000, kinds: tuple[str, ...] = ("custom", "evaluate", "predict")) -> Terms:
    now = utcnow()
    return Terms(
        modes=frozenset({"remote_job", "he_inference"}),
        quota_units=quota,
        rate_units=100_000,
        rate_window_seconds=60,
        valid_from=now - timedelta(days=1),
        valid_until=now + timedelta(days=30),
        unit_price_minor=3,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset(kinds), 30, 512, 60),
    )


@dataclass
class Setup:
    offering_id: str
    contract_id: str
    weight: np.ndarray
    bias: np.ndarray
    model_path: Path | None = None
    signing_key: SigningKey | None = None  # the provider's offer-signing key


def write_signing_key(path: Path, key: SigningKey) -> Path:
    """Write ``key`` in the key-file format of marketplace.sdk.contracts_api (0600)."""
    import base64
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("ed25519-seed:" + base64.b64encode(key.unsafe_private_bytes()).decode() + "\n")
    return path


def vouch(client: Any, agent_id: str, setup: Setup, seal_public: str, *, key: SigningKey | None = None) -> Any:
    """What a real agent does after hello: register the provider's statement for its sealing key."""
    from marketplace.agent.sealkey import sign_seal_key

    sk = key or setup.signing_key
    assert sk is not None
    st = sign_seal_key(
        sk, offering_id=setup.offering_id, seal_public=seal_public, not_after=utcnow() + timedelta(days=1)
    )
    return client.post_json("/v1/agent/seal-key", {"statements": [st.to_dict()]}, headers={"X-Som-Agent": agent_id})


def offering(
    world: Any,
    tmp_path: Path,
    *,
    hosting: str,
    quota: int = 10_000,
    kinds: tuple[str, ...] = ("custom", "evaluate", "predict"),
) -> Setup:
    """A published offering (marketplace-hosted: model uploaded; provider-hosted: model in a file
    on the 'provider machine' only) and the consumer's contract for it."""
    w, b = model_arrays()
    off = world.provider.create_offering(name=f"risk-{hosting}", task="binary-classification", hosting=hosting)
    path = None
    if hosting == "marketplace":
        world.provider.upload_version(off["id"], model_npz(w, b), format="npz")
    else:
        path = tmp_path / "provider-machine" / "model.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model_npz(w, b))
    world.provider.publish(off["id"])
    p_key = SigningKey.generate()
    offer = world.provider.publish_offer(off["id"], terms(quota=quota, kinds=kinds), signing_key=p_key)
    contract = world.consumer.accept_offer(offer["id"], signing_key=SigningKey.generate())
    return Setup(off["id"], str(contract["id"]), w, b, path, p_key)


def agent_key(world: Any, offering_id: str) -> str:
    return str(world.provider.create_agent_key([offering_id], name="test agent")["key"])


@contextmanager
def running_agent(world: Any, setup: Setup, key: str, tmp_path: Path, **cfg: Any) -> Iterator[Any]:
    """A real ProviderAgent in a thread, speaking HTTP to the in-process app."""
    from fastapi.testclient import TestClient

    from marketplace.agent.runner import AgentConfig, ProviderAgent

    assert setup.model_path is not None and setup.signing_key is not None
    cfg.setdefault("signing_key_path", write_signing_key(setup.model_path.parent / "provider.key", setup.signing_key))
    conf = AgentConfig(
        url="http://testserver",
        api_key=key,
        model_path=setup.model_path,
        seal_key_path=setup.model_path.parent / "seal.key",
        workdir=tmp_path / "agent-work",
        lease_wait=1.0,
        **cfg,
    )
    agent = ProviderAgent(conf, http=TestClient(world.app, raise_server_exceptions=False))  # type: ignore[arg-type]
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    deadline = 50
    while agent.agent_id is None and deadline:
        stop.wait(0.1)
        deadline -= 1
    try:
        yield agent
    finally:
        stop.set()
        t.join(timeout=10)


def usage_rows(world: Any, contract_id: str) -> list[Any]:
    from sqlalchemy import select

    from marketplace.db.models_contracts import UsageRow

    with world.rt.tx() as s:
        return [
            (u.state, u.units)
            for u in s.scalars(
                select(UsageRow).where(UsageRow.contract_id == contract_id).order_by(UsageRow.reserved_at)
            )
        ]


def wait_usage(world: Any, contract_id: str, want: list[Any], timeout: float = 5.0) -> list[Any]:
    """Usage rows once they equal ``want`` (a release follows a job's failure by a moment)."""
    import time

    end = time.monotonic() + timeout
    while True:
        got = usage_rows(world, contract_id)
        if got == want or time.monotonic() > end:
            return got
        time.sleep(0.05)
