"""Translate an ONNX graph into affine layers separated by activations.

For: the small feed-forward graphs the HE compiler supports (Gemm, MatMul, Add, Sub, Mul,
Flatten, Identity, with Relu/Sigmoid/Tanh or a square ``Mul(h, h)`` between affine blocks, and a final Sigmoid
or Softmax
that becomes consumer-side post-processing). Consecutive affine operators are folded into one
layer. Not for: convolutions, control flow, or graphs with more than one input or output.
Anything else raises ``UnsupportedOperator`` naming the operator.

Loading is safe by construction (:func:`load_onnx`, the one loader every caller goes through):
the bytes are parsed as a protobuf message only, and any tensor anywhere in the model (graph
initializers, sparse initializers, node attributes, subgraphs, functions, training info) that
names external data (``data_location == EXTERNAL`` or ``external_data`` entries) is refused before
any tensor is read. No path from the model ever reaches the file system, so the error is the same
whether a referenced file exists or not. Never call ``onnx.load``, ``load_external_data_*`` or
``numpy_helper.to_array`` with a ``base_dir`` on artifact bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import numpy_helper

from crypto.errors import HEError, UnsupportedOperator

__all__ = ["ACTIVATIONS", "EXTERNAL_DATA_REFUSED", "MAX_WIDTH", "RawLayer", "RawModel", "load_onnx", "parse_onnx"]

#: The one message for a model that names external data (no oracle on the named file).
EXTERNAL_DATA_REFUSED = "ONNX tensors with external data are refused: embed the weights in the model file"
_MAX_MESSAGES = 1_000_000
#: Widest layer (features) accepted: the affine folding holds (width x width) matrices.
MAX_WIDTH = 4096

ACTIVATIONS = ("relu", "sigmoid", "tanh", "square", "none")
_ACT_OPS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh"}
_SUPPORTED = {"Gemm", "MatMul", "Add", "Sub", "Mul", "Flatten", "Identity", "Softmax", *_ACT_OPS}


@dataclass(frozen=True)
class RawLayer:
    """An affine map ``x @ weight + bias`` (weight is (d_in, d_out)) then ``activation``."""

    weight: np.ndarray
    bias: np.ndarray
    activation: str


@dataclass(frozen=True)
class RawModel:
    layers: tuple[RawLayer, ...]
    postprocess: str | None
    operators: tuple[str, ...]


def _dim_of(value_info: onnx.ValueInfoProto) -> int | None:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) >= 1 and dims[-1].HasField("dim_value"):
        return int(dims[-1].dim_value)
    return None


def _attr(node: onnx.NodeProto, name: str, default: float | int) -> float | int:
    for a in node.attribute:
        if a.name == name:
            return float(a.f) if a.type == onnx.AttributeProto.FLOAT else int(a.i)
    return default


def _verify_no_external_data(model: onnx.ModelProto) -> None:
    """Raise HEError if any TensorProto anywhere in ``model`` uses external data.

    Walks every set message field (iteratively: subgraphs nest), so tensors in attributes,
    subgraphs of If/Loop/Scan, functions and training info are all covered."""
    stack: list[Any] = [model]
    seen = 0
    while stack:
        msg = stack.pop()
        seen += 1
        if seen > _MAX_MESSAGES:
            raise HEError("ONNX model too complex")
        if isinstance(msg, onnx.TensorProto) and (
            msg.data_location == onnx.TensorProto.EXTERNAL or len(msg.external_data) > 0
        ):
            raise HEError(EXTERNAL_DATA_REFUSED)
        for field, value in msg.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if isinstance(value, Message):
                stack.append(value)
            else:  # a repeated field (ONNX has no map fields holding tensors)
                stack.extend(v for v in value if isinstance(v, Message))


def load_onnx(data: bytes) -> onnx.ModelProto:
    """Parse ONNX bytes as a message, refusing external data anywhere. Raises HEError.

    Nothing here touches the file system (``ModelProto.ParseFromString`` only)."""
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except Exception as e:  # protobuf DecodeError, RecursionError on absurd nesting, ...
        raise HEError(f"not a valid ONNX model: {type(e).__name__}") from e
    _verify_no_external_data(model)
    return model


def _to_array(t: onnx.TensorProto) -> np.ndarray:
    if t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0:  # checked by load_onnx too
        raise HEError(EXTERNAL_DATA_REFUSED)
    try:
        return np.asarray(numpy_helper.to_array(t), dtype=np.float64)
    except (ValueError, TypeError, KeyError) as e:
        raise HEError(f"initializer {t.name[:80]!r} cannot be read as numbers") from e


def parse_onnx(data: bytes) -> RawModel:
    """Parse ONNX bytes (via :func:`load_onnx`). Raises HEError (malformed, external data) or UnsupportedOperator."""
    model = load_onnx(data)
    try:
        return _interpret(model)
    except (IndexError, KeyError, TypeError, OverflowError) as e:  # a malformed graph, never a 500
        raise HEError(f"malformed ONNX graph: {type(e).__name__}") from e


def _interpret(model: onnx.ModelProto) -> RawModel:
    g = model.graph
    inits = {t.name: _to_array(t) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise HEError(f"expected 1 input and 1 output, got {len(inputs)} and {len(g.output)}")
    d_in = _dim_of(inputs[0])
    if d_in is None:
        raise HEError("the graph input needs a static last dimension (the feature count)")
    if not 1 <= d_in <= MAX_WIDTH:
        raise HEError(f"the graph input has {d_in} features; at most {MAX_WIDTH} are supported")
    out_name = g.output[0].name

    cur = inputs[0].name
    dim = d_in
    w = np.eye(dim)
    b = np.zeros(dim)
    layers: list[RawLayer] = []
    post: str | None = None
    ops: list[str] = []

    def const(name: str) -> np.ndarray:
        if name not in inits:
            raise HEError(f"operand {name!r} must be an initializer (constant weight)")
        return inits[name]

    for node in g.node:
        op = node.op_type
        ops.append(op)
        if post is not None:
            raise HEError(f"{post.capitalize()} must be the last operator, found {op!r} after it")
        ins = list(node.input)
        if op not in _SUPPORTED:
            raise UnsupportedOperator(op, node.name)
        if cur not in ins:
            raise HEError(f"node {node.name or op!r} does not consume the running tensor")
        if op in ("Flatten", "Identity"):
            pass
        elif op == "Gemm":
            if ins[0] != cur or _attr(node, "transA", 0):
                raise HEError("Gemm must take the running tensor as A without transA")
            mat = const(ins[1])
            if _attr(node, "transB", 0):
                mat = mat.T
            mat = mat * float(_attr(node, "alpha", 1.0))
            c = const(ins[2]) * float(_attr(node, "beta", 1.0)) if len(ins) > 2 and ins[2] else 0.0
            if mat.ndim != 2 or mat.shape[0] != dim:
                raise ValueError(f"Gemm weight: expected ({dim}, k), got {mat.shape}")
            if mat.shape[1] > MAX_WIDTH:
                raise HEError(f"Gemm output width {mat.shape[1]} > {MAX_WIDTH}")
            w, b = w @ mat, b @ mat + np.broadcast_to(c, (mat.shape[1],))
            dim = mat.shape[1]
        elif op == "MatMul":
            if ins[0] != cur:
                raise HEError("MatMul must take the running tensor as its first operand")
            mat = const(ins[1])
            if mat.ndim != 2 or mat.shape[0] != dim:
                raise ValueError(f"MatMul weight: expected ({dim}, k), got {mat.shape}")
            if mat.shape[1] > MAX_WIDTH:
                raise HEError(f"MatMul output width {mat.shape[1]} > {MAX_WIDTH}")
            w, b = w @ mat, b @ mat
            dim = mat.shape[1]
        elif op == "Mul" and ins[0] == cur and len(ins) > 1 and ins[1] == cur:  # x * x
            layers.append(RawLayer(w, b, "square"))
            w, b = np.eye(dim), np.zeros(dim)
        elif op in ("Add", "Sub", "Mul"):
            other = ins[1] if ins[0] == cur else ins[0]
            c = np.broadcast_to(const(other).reshape(-1), (dim,)).astype(np.float64)
            if op == "Add":
                b = b + c
            elif op == "Mul":
                w, b = w * c, b * c
            elif ins[0] == cur:
                b = b - c
            else:
                w, b = -w, c - b
        elif op in _ACT_OPS or op == "Softmax":
            if node.output[0] == out_name and op in ("Sigmoid", "Softmax"):
                post = op.lower()
            elif op == "Softmax":
                raise UnsupportedOperator(op, node.name)
            else:
                layers.append(RawLayer(w, b, _ACT_OPS[op]))
                w, b = np.eye(dim), np.zeros(dim)
        cur = node.output[0]
    if cur != out_name:
        raise HEError("the graph output is not the end of the operator chain")
    layers.append(RawLayer(w, b, "none"))
    return RawModel(tuple(layers), post, tuple(ops))
