"""Translate an ONNX graph into affine layers separated by activations.

For: the small feed-forward graphs the HE compiler supports (Gemm, MatMul, Add, Sub, Mul,
Flatten, Identity, with Relu/Sigmoid/Tanh or a square ``Mul(h, h)`` between affine blocks, and a final Sigmoid or Softmax
that becomes consumer-side post-processing). Consecutive affine operators are folded into one
layer. Not for: convolutions, control flow, or graphs with more than one input or output.
Anything else raises ``UnsupportedOperator`` naming the operator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from crypto.errors import HEError, UnsupportedOperator

__all__ = ["ACTIVATIONS", "RawLayer", "RawModel", "parse_onnx"]

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


def parse_onnx(data: bytes) -> RawModel:
    """Parse ONNX bytes. Raises HEError (malformed) or UnsupportedOperator."""
    try:
        model = onnx.load_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise HEError(f"not a valid ONNX model: {type(e).__name__}") from e
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise HEError(f"expected 1 input and 1 output, got {len(inputs)} and {len(g.output)}")
    d_in = _dim_of(inputs[0])
    if d_in is None:
        raise HEError("the graph input needs a static last dimension (the feature count)")
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
            w, b = w @ mat, b @ mat + np.broadcast_to(c, (mat.shape[1],))
            dim = mat.shape[1]
        elif op == "MatMul":
            if ins[0] != cur:
                raise HEError("MatMul must take the running tensor as its first operand")
            mat = const(ins[1])
            if mat.ndim != 2 or mat.shape[0] != dim:
                raise ValueError(f"MatMul weight: expected ({dim}, k), got {mat.shape}")
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
