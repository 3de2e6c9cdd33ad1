"""Helpers for the gateway tests (no tests here): models, offerings with gateway contracts, a real
server, a real ``som agent`` subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contracts.terms import JobLimits, Terms
from crypto.signing import SigningKey
from marketplace.db.base import utcnow
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_jobs_support import write_signing_key

D_IN = 6


def lr_arrays(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1, D_IN)) * 1.37, rng.normal(size=(1,))


def lr_npz(weight: np.ndarray, bias: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": weight, "layer0.bias": bias, "layer0.activation": np.array("sigmoid")})
    return buf.getvalue()


def lr_numpy(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-(x @ weight.T + bias))))


def mlp_onnx(seed: int = 11, hidden: int = 8, classes: int = 3) -> tuple[bytes, tuple[np.ndarray, ...]]:
    """An exported-style ONNX MLP: Gemm(transB) -> Relu -> Gemm(transB) -> Softmax, float32."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(hidden, D_IN)).astype(np.float32)
    b1 = rng.normal(size=(hidden,)).astype(np.float32)
    w2 = rng.normal(size=(classes, hidden)).astype(np.float32)
    b2 = rng.normal(size=(classes,)).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["input", "w1", "b1"], ["h1"], transB=1),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", D_IN])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m.SerializeToString(), (w1, b1, w2, b2)


def mlp_numpy(params: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    w1, b1, w2, b2 = (p.astype(np.float64) for p in params)
    z = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def features(n: int = 20, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D_IN))


def to_csv(x: np.ndarray, *, header: bool = False) -> bytes:
    head = ",".join(f"f{j}" for j in range(x.shape[1])) + "\n" if header else ""
    return (head + "\n".join(",".join(repr(float(v)) for v in row) for row in x) + "\n").encode()


def gateway_terms(
    *, modes: frozenset[str] = frozenset({"gateway"}), quota: int = 100_000, max_batch: int = 64, rate: int = 1_000_000
) -> Terms:
    now = utcnow()
    return Terms(
        modes=modes,
        quota_units=quota,
        rate_units=rate,
        rate_window_seconds=60,
        valid_from=now - timedelta(days=1),
        valid_until=now + timedelta(days=30),
        unit_price_minor=3,
        currency="EUR",
        max_batch=max_batch,
        job_limits=JobLimits(frozenset({"predict"}), 30, 512, 60),
    )


@dataclass
class GW:
    offering_id: str
    contract_id: str | None
    weight: np.ndarray
    bias: np.ndarray
    model_path: Path | None = None
    signing_key: SigningKey | None = None


def gw_offering(
    world: Any,
    tmp_path: Path,
    *,
    hosting: str = "marketplace",
    contract: bool = True,
    consumer: Any = None,
    artifact: tuple[bytes, str] | None = None,
    **terms_kw: Any,
) -> GW:
    """A published offering with an LR model (or ``artifact``) and, if ``contract``, the
    consumer's contract under ``gateway_terms(**terms_kw)``."""
    w, b = lr_arrays()
    data, fmt = artifact or (lr_npz(w, b), "npz")
    off = world.provider.create_offering(name=f"gw-{hosting}", task="binary-classification", hosting=hosting)
    path = None
    if hosting == "marketplace":
        world.provider.upload_version(off["id"], data, format=fmt)
    else:
        path = tmp_path / f"provider-machine-{off['id']}" / f"model.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    world.provider.publish(off["id"])
    p_key = SigningKey.generate()
    cid = None
    if contract:
        offer = world.provider.publish_offer(off["id"], gateway_terms(**terms_kw), signing_key=p_key)
        cid = str((consumer or world.consumer).accept_offer(offer["id"], signing_key=SigningKey.generate())["id"])
    return GW(off["id"], cid, w, b, path, p_key)


def http_client(url: str, key: str) -> Any:
    from marketplace.sdk import SomClient

    return SomClient(url, key)


def usage_states(rt: Any, contract_id: str) -> list[tuple[str, int]]:
    from sqlalchemy import select

    from marketplace.db.models_contracts import UsageRow

    with rt.tx() as s:
        return sorted(
            (u.state, u.units) for u in s.scalars(select(UsageRow).where(UsageRow.contract_id == contract_id))
        )


def used_units(rt: Any, contract_id: str) -> tuple[int, int]:
    from marketplace.db.models_contracts import ContractRow

    with rt.tx() as s:
        c = s.get(ContractRow, contract_id)
        return int(c.used_units), int(c.reserved_units)


@contextmanager
def som_agent(
    world: Any, url: str, gw: GW, tmp_path: Path, *, timeout: float = 60.0
) -> Iterator[subprocess.Popen[bytes]]:
    """A real ``som agent`` process serving ``gw`` (provider-hosted), connected for gateway calls."""
    from marketplace.services.gateway_hub import hub_of

    assert gw.model_path is not None and gw.signing_key is not None
    key = world.provider.create_agent_key([gw.offering_id], name="gateway agent")["key"]
    sk = write_signing_key(gw.model_path.parent / "provider.key", gw.signing_key)
    env = {**os.environ, "SOM_URL": url, "SOM_API_KEY": key}
    log = (tmp_path / f"agent-{gw.offering_id}.log").open("wb")
    proc = subprocess.Popen(  # noqa: S603 - our own CLI, argv list
        [
            sys.executable,
            "-m",
            "marketplace.cli",
            "agent",
            "--model",
            str(gw.model_path),
            "--signing-key",
            str(sk),
            "--lease-wait",
            "2",
            "--workdir",
            str(tmp_path / "agent-work"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    hub = hub_of(world.rt)
    try:
        deadline = time.monotonic() + timeout
        while hub.input_dim(gw.offering_id) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"som agent did not connect: {(tmp_path / f'agent-{gw.offering_id}.log').read_text()[-2000:]}"
                )
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()


def onnx_reference(data: bytes, x: np.ndarray) -> np.ndarray:
    """ONNX Runtime on the uploaded ONNX bytes themselves (float32 model)."""
    import onnxruntime as ort

    m = onnx.load_model_from_string(data)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = m.graph.input[0].name
    return np.asarray(sess.run(None, {name: x.astype(np.float32)})[0], dtype=np.float64)


@contextmanager
def served(tmp_path: Path, db_url: str, **settings: Any) -> Iterator[tuple[Any, str]]:
    from marketplace.api.app import create_app

    settings.setdefault("workers", 1)
    settings.setdefault("agent_offline_seconds", 5.0)
    settings.setdefault("gateway_agent_timeout_seconds", 3.0)
    # these tests burst concurrent calls to check metering and batching, not overload shedding
    settings.setdefault("admission_control", False)
    app = create_app(make_settings(tmp_path, db_url, **settings))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()
