"""Gateway execution on ONNX Runtime: one warm ``InferenceSession`` per model version.

For: the compute side of the plaintext inference gateway. A model artifact (``.npz`` layers or
ONNX) is parsed by :func:`crypto.he.compiler.load_artifact` (the one validated parser: affine
layers + activations, no pickle, no custom operators) and rebuilt as a canonical ONNX graph with
:mod:`onnx.helper` (``MatMul`` -> ``Add`` -> activation per layer, then the post-processing), in
float64 like every other path of the marketplace. ONNX Runtime is handed only those bytes: never
a path, never the uploaded protobuf, never an external-data reference (refused before the
session is built), with :func:`session_options` that switch off profiling, the optimized-model
dump and thread spinning.

Marketplace-hosted models run in worker processes (:class:`GatewayPool`, spawned like the HE
pool of :mod:`marketplace.compute.he`): a worker receives the *encrypted* artifact's blob
address, wrapped key and AAD, decrypts in its own memory only, builds the session and keeps it
in a small LRU by version id; it reports whether it (re)loaded, and the API process audits that
decrypt. Provider-hosted models are built by the agent from the file beside it
(:func:`session_for_layers`).

Not for: authorization, metering or parsing requests (:mod:`marketplace.services.gateway`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from marketplace.compute.pool import ComputeError, WorkerPool
from marketplace.compute.store import StoreSpec, open_store

__all__ = [
    "OPSET",
    "GatewayAnswer",
    "GatewayPool",
    "GatewayTask",
    "LoadedModel",
    "get_pool",
    "layers_to_onnx",
    "load_model_bytes",
    "run_gateway_task",
    "session_for_layers",
    "session_options",
    "threads_per_worker",
]

log = logging.getLogger("som.gateway")

OPSET = 17
_ACT_OPS = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}


def threads_per_worker(workers: int, configured: int = 0) -> int:
    """ORT intra-op threads for one of ``workers`` processes: ``configured`` if > 0, else the
    machine's cores shared out (at least 1)."""
    if configured > 0:
        return configured
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def session_options(threads: int) -> ort.SessionOptions:
    """Options for a session built from bytes: no file output of any kind, no spinning threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_profiling = False
    so.optimized_model_filepath = ""  # never write the optimized graph anywhere
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.add_session_config_entry("session.load_model_format", "ONNX")
    return so


def layers_to_onnx(layers: Sequence[Any], postprocess: str | None) -> bytes:
    """A canonical float64 ONNX graph for affine ``layers`` (``.weight`` (d_in, d_out), ``.bias``,
    ``.activation``) and the final ``postprocess`` (None, "sigmoid", "softmax"). Input ``x``
    (n, d_in), output ``y`` (n, d_out). Every initializer is embedded (no external data)."""
    if not layers:
        raise ValueError("a model needs at least one layer")
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    h = "x"
    for i, layer in enumerate(layers):
        w = np.ascontiguousarray(np.asarray(layer.weight, dtype=np.float64))
        b = np.ascontiguousarray(np.asarray(layer.bias, dtype=np.float64).reshape(-1))
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ValueError(f"layer{i}: weight {w.shape} and bias {b.shape} do not fit")
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        nodes += [
            helper.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"B{i}"], [f"z{i}"]),
        ]
        h = f"z{i}"
        act = str(layer.activation)
        if act in _ACT_OPS:
            nodes.append(helper.make_node(_ACT_OPS[act], [h], [f"a{i}"]))
            h = f"a{i}"
        elif act == "square":
            nodes.append(helper.make_node("Mul", [h, h], [f"a{i}"]))
            h = f"a{i}"
        elif act != "none":
            raise ValueError(f"layer{i}: unsupported activation {act!r}")
    if postprocess == "sigmoid":
        nodes.append(helper.make_node("Sigmoid", [h], ["post"]))
        h = "post"
    elif postprocess == "softmax":
        nodes.append(helper.make_node("Softmax", [h], ["post"], axis=-1))
        h = "post"
    elif postprocess is not None:
        raise ValueError(f"unsupported post-processing {postprocess!r}")
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    d_in = int(np.asarray(layers[0].weight).shape[0])
    d_out = int(np.asarray(layers[-1].weight).shape[1])
    graph = helper.make_graph(
        nodes,
        "som_gateway",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", d_in])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n", d_out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="som-gateway")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _refuse_external_data(data: bytes) -> None:
    m = onnx.load_model_from_string(data)
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
            raise ValueError(f"initializer {t.name!r} refers to external data: refused")


@dataclass(frozen=True)
class LoadedModel:
    """A warm session and the shape it answers."""

    session: ort.InferenceSession
    input_dim: int
    output_dim: int

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(["y"], {"x": np.ascontiguousarray(x, dtype=np.float64)})[0]
        return np.asarray(out, dtype=np.float64)


def session_for_layers(layers: Sequence[Any], postprocess: str | None, *, threads: int) -> LoadedModel:
    """Build the canonical graph for ``layers`` and a session on it (from bytes only)."""
    data = layers_to_onnx(layers, postprocess)
    _refuse_external_data(data)
    sess = ort.InferenceSession(data, sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    return LoadedModel(sess, int(np.asarray(layers[0].weight).shape[0]), int(np.asarray(layers[-1].weight).shape[1]))


def load_model_bytes(plaintext: bytes, fmt: str, *, threads: int) -> LoadedModel:
    """Parse an artifact (validated parser) and build its session."""
    from crypto.he.compiler import load_artifact  # heavy (imports the HE stack): only on load

    raw = load_artifact(plaintext, fmt)
    return session_for_layers(raw.layers, raw.postprocess, threads=threads)


# ---------------------------------------------------------------- worker process side


@dataclass(frozen=True)
class GatewayTask:
    """One gateway evaluation: where the encrypted model is, and the (stacked) rows."""

    store: StoreSpec
    version_id: str
    fmt: str
    model_blob: str
    wrapped_key: bytes
    aad: str
    rows: np.ndarray
    threads: int = 1
    cache_size: int = 8

    def __repr__(self) -> str:
        return f"GatewayTask(version_id={self.version_id!r}, rows={self.rows.shape})"


@dataclass(frozen=True)
class GatewayAnswer:
    outputs: np.ndarray
    model_s: float  # the ORT run alone
    loaded: bool  # this call decrypted and loaded the model (audit it)


_sessions: OrderedDict[str, LoadedModel] = OrderedDict()
_sessions_lock = threading.Lock()


def _session(task: GatewayTask) -> tuple[LoadedModel, bool]:
    with _sessions_lock:
        hit = _sessions.get(task.version_id)
        if hit is not None:
            _sessions.move_to_end(task.version_id)
            return hit, False
    # lazy imports: loaded in the gateway worker process only, not in the API process
    from crypto.envelope import WrappedKey, decrypt_artifact

    blobs, provider = open_store(task.store)
    wrapped = WrappedKey.from_json(task.wrapped_key.decode())
    plaintext = decrypt_artifact(blobs.get(task.model_blob), wrapped, provider=provider, aad=task.aad.encode())
    try:
        m = load_model_bytes(plaintext, task.fmt, threads=task.threads)
    finally:
        del plaintext
    with _sessions_lock:
        _sessions[task.version_id] = m
        _sessions.move_to_end(task.version_id)
        while len(_sessions) > max(1, task.cache_size):
            _sessions.popitem(last=False)
    return m, True


def run_gateway_task(task: GatewayTask) -> GatewayAnswer:
    """Evaluate ``task`` (in a worker process; also callable in-process). Raises ComputeError."""
    # lazy import: the worker process only
    from crypto.errors import CryptoError

    try:
        model, loaded = _session(task)
        if task.rows.ndim != 2 or task.rows.shape[1] != model.input_dim:
            raise ComputeError("invalid", f"expected rows of {model.input_dim} columns, got {task.rows.shape[1:]}")
        t0 = time.perf_counter()
        out = model.run(task.rows)
        return GatewayAnswer(out, time.perf_counter() - t0, loaded)
    except ComputeError:
        raise
    except CryptoError as e:
        raise ComputeError("internal", f"model unavailable ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001 - a worker must answer, never crash the pool
        raise ComputeError("internal", type(e).__name__) from None


def _warm() -> int:
    # lazy import: heavy (the HE stack); warm it once per worker process only
    import crypto.he.compiler  # noqa: F401  (import the parser and ORT once per worker)

    return 0


class GatewayPool(WorkerPool[GatewayTask, GatewayAnswer]):
    """The gateway worker pool: warm ONNX Runtime sessions in spawned processes (:func:`run_gateway_task`)."""

    def __init__(self, workers: int) -> None:
        super().__init__(workers, name="gateway", task=run_gateway_task, warm=_warm)


_pool_lock = threading.Lock()


def get_pool(rt: Any) -> GatewayPool:
    """The runtime's gateway pool (``settings.workers`` processes; shut down with the runtime).
    Always local processes: a broker round trip would cost more than the model."""
    with _pool_lock:
        pool: GatewayPool | None = rt.gateway_pool
        if pool is None:
            pool = rt.gateway_pool = GatewayPool(rt.settings.workers)
            rt.on_close(pool.shutdown)
    return pool
