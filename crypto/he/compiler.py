"""The HE model compiler: artifact (ONNX or ``.npz`` layers) -> ``CompiledModel`` + ``PublicPlan``.

For: validating an uploaded artifact without calibration data (``validate_artifact``), and
compiling it (``compile_model``): non-polynomial activations are replaced by least-squares
Chebyshev fits over the input range seen on calibration data, the multiplicative depth is
counted, CKKS parameters are chosen at 128-bit security, and the Galois keys of the single-query
layout are listed. Not for: running the model (``evaluate``) or making keys (``context``).

The ``.npz`` layer format (``som-layers-v1``), loaded with ``np.load(allow_pickle=False)``:

* ``layer{i}.weight``: float array of shape (d_out, d_in), like torch ``nn.Linear`` / ONNX Gemm
  with ``transB=1``; ``layer{i}.bias``: float array (d_out,); ``layer{i}.activation``: a 0-d
  string array, one of ``none``, ``relu``, ``sigmoid``, ``tanh``, ``square`` and, for the last
  layer only, ``softmax`` or ``sigmoid`` (then applied by the consumer after decryption).
* layers are numbered 0..L-1 without gaps; no other keys are allowed.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from crypto.errors import HEError
from crypto.hazmat.tenseal_ops import choose_parameters, rotation_key_steps
from crypto.he.onnx_import import ACTIVATIONS, RawLayer, RawModel, parse_onnx
from crypto.he.plan import PublicPlan

__all__ = [
    "DEFAULT_DEGREES",
    "ArtifactInfo",
    "CompiledLayer",
    "CompiledModel",
    "compile_model",
    "load_artifact",
    "validate_artifact",
]

ArtifactFormat = Literal["onnx", "npz"]
DEFAULT_DEGREES = {"none": 1, "square": 2, "relu": 2, "sigmoid": 3, "tanh": 3}
DEFAULT_MAX_BYTES = 64 * 2**20
_MARGIN = 0.05  # widen the calibrated range by 5% on each side


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


_EXACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda z: z,
    "square": lambda z: z * z,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
}


@dataclass(frozen=True)
class ArtifactInfo:
    """What an artifact declares: shapes and operators (no weights)."""

    fmt: str
    input_dim: int
    output_dim: int
    operators: tuple[str, ...]
    layer_shapes: tuple[tuple[int, int], ...]  # (d_in, d_out) per affine layer
    activations: tuple[str, ...]
    postprocess: str | None


def _parse_npz(data: bytes) -> RawModel:
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
        names = list(arrays.files)
        loaded = {n: arrays[n] for n in names}
    except ValueError as e:  # object arrays need pickle: refused
        raise HEError(f"npz refused: it contains pickled (object) arrays ({e})") from e
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise HEError(f"not a valid .npz archive: {type(e).__name__}: {e}") from e
    n_layers = 0
    while f"layer{n_layers}.weight" in loaded:
        n_layers += 1
    expected = {f"layer{i}.{k}" for i in range(n_layers) for k in ("weight", "bias", "activation")}
    if n_layers == 0 or set(names) != expected:
        raise HEError(
            f"npz keys: expected layer{{i}}.weight/.bias/.activation for i=0..L-1, got {sorted(names)}"
        )
    layers: list[RawLayer] = []
    post: str | None = None
    for i in range(n_layers):
        w = loaded[f"layer{i}.weight"]
        b = loaded[f"layer{i}.bias"]
        a = loaded[f"layer{i}.activation"]
        if w.dtype.kind != "f" or w.ndim != 2 or b.dtype.kind != "f" or b.shape != (w.shape[0],):
            raise HEError(
                f"layer{i}: expected float weight (d_out, d_in) and bias (d_out,), got "
                f"{w.dtype}{w.shape} and {b.dtype}{b.shape}"
            )
        if a.dtype.kind != "U" or a.shape != ():
            raise HEError(f"layer{i}.activation: expected a 0-d string array, got {a.dtype}{a.shape}")
        act = str(a)
        if layers and layers[-1].weight.shape[1] != w.shape[1]:
            raise HEError(f"layer{i}: input width {w.shape[1]} != previous output {layers[-1].weight.shape[1]}")
        last = i == n_layers - 1
        if last and act in ("sigmoid", "softmax"):
            post, act = act, "none"
        if act not in ACTIVATIONS:
            raise HEError(f"layer{i}: unsupported activation {act!r}; expected one of {ACTIVATIONS}")
        if not np.all(np.isfinite(w)) or not np.all(np.isfinite(b)):
            raise HEError(f"layer{i}: weights must be finite")
        layers.append(RawLayer(w.T.astype(np.float64), b.astype(np.float64), act))
    return RawModel(tuple(layers), post, tuple(str(x.activation) for x in layers))


def load_artifact(data: bytes, fmt: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> RawModel:
    """Parse an artifact into affine layers. Raises TypeError/ValueError/HEError."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValueError(f"artifact too large: {len(data)} bytes > max {max_bytes}")
    if fmt == "npz":
        raw = _parse_npz(bytes(data))
    elif fmt == "onnx":
        raw = parse_onnx(bytes(data))
    else:
        raise ValueError(f"fmt must be 'onnx' or 'npz', got {fmt!r}")
    if raw.layers[-1].activation not in ("none",):
        raise HEError("the last layer must output logits (final activation: none, sigmoid, softmax)")
    return raw


def validate_artifact(data: bytes, fmt: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> ArtifactInfo:
    """Check an uploaded artifact without calibration data.

    Raises ValueError (size, format name), HEError (malformed, truncated, pickled) or
    UnsupportedOperator (naming the operator).
    """
    raw = load_artifact(data, fmt, max_bytes=max_bytes)
    shapes = tuple((int(x.weight.shape[0]), int(x.weight.shape[1])) for x in raw.layers)
    return ArtifactInfo(
        fmt=fmt,
        input_dim=shapes[0][0],
        output_dim=shapes[-1][1],
        operators=raw.operators,
        layer_shapes=shapes,
        activations=tuple(x.activation for x in raw.layers),
        postprocess=raw.postprocess,
    )


@dataclass(frozen=True)
class CompiledLayer:
    """``act(x @ weight + bias)``; ``coeffs`` is the activation polynomial (power basis) or ()."""

    weight: np.ndarray  # (d_in, d_out)
    bias: np.ndarray
    activation: str
    coeffs: tuple[float, ...]


def _fit(act: str, lo: float, hi: float, degree: int) -> tuple[float, ...]:
    if act == "none":
        return (0.0, 1.0)
    if act == "square":
        return (0.0, 0.0, 1.0)
    xs = np.linspace(lo, hi, 1024)
    cheb = np.polynomial.Chebyshev.fit(xs, _EXACT[act](xs), degree, domain=[lo, hi])
    return tuple(float(c) for c in cheb.convert(kind=np.polynomial.Polynomial).coef)


def _poly(coeffs: tuple[float, ...], z: np.ndarray) -> np.ndarray:
    return np.asarray(np.polynomial.polynomial.polyval(z, np.asarray(coeffs)))


@dataclass(frozen=True)
class CompiledModel:
    """The compute site's private part (weights) and the consumer-visible ``public_plan``."""

    layers: tuple[CompiledLayer, ...]
    public_plan: PublicPlan

    def predict_plain(self, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
        """Plaintext logits: with the polynomial activations, or the original ones if ``exact``."""
        h = np.asarray(x, dtype=np.float64)
        for layer in self.layers:
            h = h @ layer.weight + layer.bias
            if layer.activation != "none" or layer.coeffs:
                h = _EXACT[layer.activation](h) if exact else _poly(layer.coeffs, h)
        return h

    def to_bytes(self) -> bytes:
        """npz (no pickle): weights, biases, polynomial coefficients, plan JSON."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"plan": self.public_plan.to_dict(), "activations": []}
        for i, layer in enumerate(self.layers):
            arrays[f"layer{i}.weight"] = layer.weight
            arrays[f"layer{i}.bias"] = layer.bias
            arrays[f"layer{i}.coeffs"] = np.asarray(layer.coeffs, dtype=np.float64)
            meta["activations"].append(layer.activation)
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CompiledModel:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            meta = json.loads(arrays["meta"].tobytes())
            plan = PublicPlan.from_dict(meta["plan"])
            layers = tuple(
                CompiledLayer(
                    arrays[f"layer{i}.weight"],
                    arrays[f"layer{i}.bias"],
                    str(act),
                    tuple(float(c) for c in arrays[f"layer{i}.coeffs"]),
                )
                for i, act in enumerate(meta["activations"])
            )
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise HEError(f"not a compiled model: {type(e).__name__}: {e}") from e
        if len(layers) != len(plan.layer_dims) - 1:
            raise HEError("compiled model does not match its plan")
        return cls(layers, plan)


def compile_model(
    data: bytes,
    fmt: str,
    *,
    calibration: np.ndarray,
    precision_bits: int = 8,
    noise_bits: int = 12,
    degrees: dict[str, int] | None = None,
    min_scale_bits: int = 40,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> CompiledModel:
    """Compile an artifact for CKKS inference.

    ``calibration``: (n, input_dim) provider-supplied samples; fixes the ranges over which
    Relu/Sigmoid/Tanh are approximated. ``min_scale_bits``: CKKS scale; 40 keeps the CKKS error
    (measured ~1e-6 on logits) far below the 2^-12 flooding noise; 30-33 bits lets depth 3 fit
    N=8192 but leaves ~1e-2 error on the digits MLP, above the promise. Raises as ``validate_artifact``, and ValueError for
    calibration of the wrong shape or non-finite values.
    """
    raw = load_artifact(data, fmt, max_bytes=max_bytes)
    d_in = raw.layers[0].weight.shape[0]
    cal = np.asarray(calibration, dtype=np.float64)
    if cal.ndim != 2 or cal.shape[1] != d_in or cal.shape[0] < 1:
        raise ValueError(f"calibration: expected shape (n, {d_in}), got {cal.shape}")
    if not np.all(np.isfinite(cal)):
        raise ValueError("calibration must be finite")
    degs = {**DEFAULT_DEGREES, **(degrees or {})}
    layers: list[CompiledLayer] = []
    h = cal
    depth = 0
    act_degrees: list[int] = []
    for i, rl in enumerate(raw.layers):
        z = h @ rl.weight + rl.bias
        depth += 1
        if i == len(raw.layers) - 1:
            layers.append(CompiledLayer(rl.weight, rl.bias, "none", ()))
            break
        lo, hi = float(z.min()), float(z.max())
        pad = max(hi - lo, 1e-3) * _MARGIN
        coeffs = _fit(rl.activation, lo - pad, hi + pad, degs[rl.activation])
        deg = len(coeffs) - 1
        act_degrees.append(deg)
        depth += math.ceil(math.log2(deg)) if deg > 1 else 0
        layers.append(CompiledLayer(rl.weight, rl.bias, rl.activation, coeffs))
        h = _poly(coeffs, z)
    params = choose_parameters(depth, min_scale_bits=min_scale_bits)
    dims = (d_in, *(int(x.weight.shape[1]) for x in raw.layers))
    steps = rotation_key_steps(range(1, max(dims[:-1])))
    plan = PublicPlan(
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=params.coeff_mod_bit_sizes,
        scale_bits=params.scale_bits,
        input_dim=d_in,
        output_dim=dims[-1],
        layer_dims=dims,
        activation_degrees=tuple(act_degrees),
        depth=depth,
        galois_steps=tuple(steps),
        postprocess=raw.postprocess,  # type: ignore[arg-type]
        precision_bits=precision_bits,
        noise_bits=noise_bits,
    )
    plan.check()
    return CompiledModel(tuple(layers), plan)
