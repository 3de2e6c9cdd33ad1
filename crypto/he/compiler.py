"""The HE model compiler: artifact (ONNX or ``.npz`` layers) -> ``CompiledModel`` + ``PublicPlan``.

For: validating an uploaded artifact without calibration data (``validate_artifact``), and
compiling it (``compile_model``): non-polynomial activations are replaced by least-squares
polynomial fits weighted by the pre-activations seen on calibration data, the multiplicative depth is
counted, CKKS parameters are chosen at 128-bit security by *measurement* (candidates from the
cheapest ring up are tried on a sample of the calibration data with real keys; the first whose
measured encrypted-vs-plaintext error meets the requested precision wins, and the plan promises
what was measured), and the Galois keys of the single-query layout are listed. Not for: running the model
(``evaluate``) or making keys (``context``).

The ``.npz`` layer format (``som-layers-v1``), checked before decompression and read without
pickle by :mod:`crypto.safe_arrays` (ONNX goes through :func:`crypto.he.onnx_import.load_onnx`):

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
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import tenseal as ts

from crypto.errors import HEError
from crypto.hazmat import tenseal_ops as ops
from crypto.hazmat.tenseal_ops import CkksParameters
from crypto.he import circuit
from crypto.he.onnx_import import ACTIVATIONS, RawLayer, RawModel, parse_onnx
from crypto.he.plan import PublicPlan
from crypto.safe_arrays import DEFAULT_MAX_BYTES as DEFAULT_MAX_DECOMPRESSED
from crypto.safe_arrays import inspect_npz, layer_names

__all__ = [
    "DEFAULT_DEGREES",
    "SAFETY_FACTOR",
    "ArtifactInfo",
    "CompiledLayer",
    "CompiledModel",
    "ParameterSearch",
    "ParameterTrial",
    "compile_model",
    "load_artifact",
    "validate_artifact",
]

ArtifactFormat = Literal["onnx", "npz"]
DEFAULT_DEGREES = {"none": 1, "square": 2, "relu": 2, "sigmoid": 3, "tanh": 3}
DEFAULT_MAX_BYTES = 64 * 2**20
_MARGIN = 0.05  # widen the calibrated range by 5% on each side
# The promise covers SAFETY_FACTOR x the measured CKKS error (inputs unlike the calibration
# sample, maxima over more samples) plus 8 sigma of flooding noise (P(|N(0,1)| > 8) ~ 1e-15).
SAFETY_FACTOR = 4.0
_FLOOD_SIGMAS = 8.0
_MIN_AGREEMENT = 0.99
# The flooding noise must dominate the (weight-dependent) CKKS error: sigma >= 4 x measured error.
_FLOOD_OVER_ERROR = 4.0
# Activation fits: this share of the least-squares weight is on a uniform grid over the range
# (keeps the fit defined when calibration has few distinct values); the rest on the data.
_GRID_WEIGHT = 1e-3


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


def _layer_kinds(name: str) -> frozenset[str]:
    return frozenset("U") if name.endswith(".activation") else frozenset("f")


def _parse_npz(data: bytes, *, max_bytes: int) -> RawModel:
    # Every member name, dtype and size is checked from the zip metadata and .npy headers before
    # anything is decompressed (crypto.safe_arrays); object arrays (pickle) never load.
    try:
        archive = inspect_npz(data, names=layer_names, kinds=_layer_kinds, max_bytes=max_bytes)
        names = archive.names
        for n, h in archive.headers.items():
            if n.endswith(".activation") and (h.shape != () or h.nbytes > 64):
                raise ValueError(f"{n}: expected a 0-d string array, got {h.dtype}{h.shape}")
        loaded = {n: archive.read(n) for n in names}
    except ValueError as e:
        raise HEError(f"npz refused: {e}") from e
    n_layers = 0
    while f"layer{n_layers}.weight" in loaded:
        n_layers += 1
    expected = {f"layer{i}.{k}" for i in range(n_layers) for k in ("weight", "bias", "activation")}
    if n_layers == 0 or set(names) != expected:
        raise HEError(f"npz keys: expected layer{{i}}.weight/.bias/.activation for i=0..L-1, got {sorted(names)}")
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


def load_artifact(
    data: bytes, fmt: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
) -> RawModel:
    """Parse an artifact into affine layers. Raises TypeError/ValueError/HEError.

    ``max_bytes`` caps the artifact, ``max_decompressed`` what an ``.npz`` declares uncompressed."""
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ValueError(f"artifact too large: {len(data)} bytes > max {max_bytes}")
    if fmt == "npz":
        raw = _parse_npz(bytes(data), max_bytes=max_decompressed)
    elif fmt == "onnx":
        raw = parse_onnx(bytes(data))
    else:
        raise ValueError(f"fmt must be 'onnx' or 'npz', got {fmt!r}")
    if raw.layers[-1].activation not in ("none",):
        raise HEError("the last layer must output logits (final activation: none, sigmoid, softmax)")
    return raw


def validate_artifact(
    data: bytes, fmt: str, *, max_bytes: int = DEFAULT_MAX_BYTES, max_decompressed: int = DEFAULT_MAX_DECOMPRESSED
) -> ArtifactInfo:
    """Check an uploaded artifact without calibration data.

    Raises ValueError (size, format name), HEError (malformed, truncated, pickled) or
    UnsupportedOperator (naming the operator).
    """
    raw = load_artifact(data, fmt, max_bytes=max_bytes, max_decompressed=max_decompressed)
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


def _fit(act: str, z: np.ndarray, lo: float, hi: float, degree: int) -> tuple[float, ...]:
    """Least-squares polynomial for ``act`` weighted by the calibration distribution.

    Nearly all the weight is on the calibration pre-activations ``z`` themselves, so the fit is
    good where the data is (Relu on the breast-cancer MLP: 100% test agreement of the polynomial
    network with the exact model, vs 96.5% for a uniform Chebyshev fit over the range; 99.4%
    with 1-2% of the weight on a uniform grid); ``_GRID_WEIGHT`` on a grid over ``[lo, hi]``."""
    if act == "none":
        return (0.0, 1.0)
    if act == "square":
        return (0.0, 0.0, 1.0)
    pts = np.asarray(z, dtype=np.float64).ravel()
    if pts.size > 20000:  # a deterministic, evenly spaced subsample
        pts = pts[np.linspace(0, pts.size - 1, 20000).astype(int)]
    grid = np.linspace(lo, hi, 256)
    xs = np.concatenate([pts, grid])
    w = np.concatenate([np.full(pts.size, (1 - _GRID_WEIGHT) / pts.size), np.full(grid.size, _GRID_WEIGHT / grid.size)])
    fit = np.polynomial.Polynomial.fit(xs, _EXACT[act](xs), degree, w=np.sqrt(w), domain=[lo, hi])
    return tuple(float(c) for c in fit.convert().coef)


def _poly(coeffs: tuple[float, ...], z: np.ndarray) -> np.ndarray:
    return np.asarray(np.polynomial.polynomial.polyval(z, np.asarray(coeffs)))


def _forward(layers: Sequence[CompiledLayer], x: np.ndarray, *, exact: bool = False) -> np.ndarray:
    h = np.asarray(x, dtype=np.float64)
    for layer in layers:
        h = h @ layer.weight + layer.bias
        if layer.activation != "none" or layer.coeffs:
            h = _EXACT[layer.activation](h) if exact else _poly(layer.coeffs, h)
    return h


@dataclass(frozen=True)
class ParameterTrial:
    """One candidate parameter set and what was measured with it on the calibration sample."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    max_abs_error: float  # HE (re-randomised, no flooding) vs the polynomial network
    agreement: float  # argmax (or sign) agreement HE vs polynomial network
    precision_bits: int  # what could be promised: floor(-log2(SAFETY x error + 8 sigma))
    accepted: bool
    seconds: float


@dataclass(frozen=True)
class ParameterSearch:
    """How the compiler chose the CKKS parameters (recorded in the compile report)."""

    requested_precision_bits: int
    samples: int
    safety_factor: float
    headroom_bits: int
    trials: tuple[ParameterTrial, ...]

    @property
    def chosen(self) -> ParameterTrial:
        return next(t for t in self.trials if t.accepted)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for t in d["trials"]:
            t["coeff_mod_bit_sizes"] = list(t["coeff_mod_bit_sizes"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ParameterSearch:
        trials = tuple(
            ParameterTrial(**{**t, "coeff_mod_bit_sizes": tuple(t["coeff_mod_bit_sizes"])}) for t in d["trials"]
        )
        return cls(
            int(d["requested_precision_bits"]),
            int(d["samples"]),
            float(d["safety_factor"]),
            int(d["headroom_bits"]),
            trials,
        )


@dataclass(frozen=True)
class CompiledModel:
    """The compute site's private part (weights) and the consumer-visible ``public_plan``.

    ``search`` records the measured parameter choice (None for models built by hand)."""

    layers: tuple[CompiledLayer, ...]
    public_plan: PublicPlan
    search: ParameterSearch | None = None

    def predict_plain(self, x: np.ndarray, *, exact: bool = False) -> np.ndarray:
        """Plaintext logits: with the polynomial activations, or the original ones if ``exact``."""
        return _forward(self.layers, x, exact=exact)

    def to_bytes(self) -> bytes:
        """npz (no pickle): weights, biases, polynomial coefficients, plan JSON."""
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"plan": self.public_plan.to_dict(), "activations": []}
        if self.search is not None:
            meta["search"] = self.search.to_dict()
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
            search = ParameterSearch.from_dict(meta["search"]) if "search" in meta else None
        except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise HEError(f"not a compiled model: {type(e).__name__}: {e}") from e
        if len(layers) != len(plan.layer_dims) - 1:
            raise HEError("compiled model does not match its plan")
        return cls(layers, plan, search)


def _labels(z: np.ndarray) -> np.ndarray:
    return np.asarray(z[:, 0] > 0) if z.shape[1] == 1 else np.asarray(z.argmax(axis=1))


def _measure(layers: tuple[CompiledLayer, ...], params: CkksParameters, depth: int, x: np.ndarray) -> np.ndarray:
    """Encrypt ``x`` (n <= slots) under fresh keys, run the circuit, add a re-randomising
    encryption of zero at the last level (as ``evaluate`` does; no flooding), decrypt."""
    ctx = ops.new_secret_context(params)
    n, s = x.shape[0], params.slots
    pad = np.zeros((s, x.shape[1]))
    pad[:n] = x
    xs = [ts.ckks_vector(ctx, pad[:, j].tolist()) for j in range(x.shape[1])]
    outs = circuit.run_batch(layers, xs, n_valid=n, slots=s, primes=ops.data_primes(ctx), scale_bits=params.scale_bits)
    zero = ops.encrypt_zero_at_last_level(ctx, s, levels_down=depth)
    return np.stack([np.asarray((v + zero).decrypt())[:n] for v in outs], axis=1)


def compile_model(
    data: bytes,
    fmt: str,
    *,
    calibration: np.ndarray,
    precision_bits: int = 8,
    noise_bits: int = 12,
    degrees: dict[str, int] | None = None,
    min_scale_bits: int = 20,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_poly_modulus_degree: int = 32768,
) -> CompiledModel:
    """Compile an artifact for CKKS inference.

    ``calibration``: (n, input_dim) provider-supplied samples; fixes the ranges over which
    Relu/Sigmoid/Tanh are approximated, the headroom of the first prime, and is the data on which
    candidate parameters are measured (up to one ciphertext's worth of samples, evenly spaced).
    ``precision_bits``: the requested output precision: every candidate (cheapest ring first,
    at most ``max_poly_modulus_degree``, scales of at least ``min_scale_bits``) is run with real
    keys, and the first with ``SAFETY_FACTOR x max error + 8 x 2^-noise_bits <= 2^-precision_bits``,
    >= 99% argmax agreement with the plaintext network and flooding std >= 4 x max error (so the
    weight-dependent CKKS error is drowned in noise) is chosen; the plan then promises
    ``floor(-log2(that bound))`` bits (>= the request). Raises as ``validate_artifact``,
    ValueError for calibration of the wrong shape, non-finite values or a precision the flooding
    noise alone exceeds (``precision_bits > noise_bits - 3``), and HEError if no candidate meets
    the precision (the message gives the best measured).
    """
    if not isinstance(precision_bits, int) or not isinstance(noise_bits, int):
        raise TypeError("precision_bits and noise_bits must be int")
    if not 1 <= precision_bits <= noise_bits - 3:
        raise ValueError(
            f"precision_bits must be in [1, noise_bits - 3 = {noise_bits - 3}] (8 sigma of the "
            f"2^-{noise_bits} flooding noise must fit in the promise), got {precision_bits}"
        )
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
    hidden_max = 0.0
    for i, rl in enumerate(raw.layers):
        z = h @ rl.weight + rl.bias
        depth += 1
        if i == len(raw.layers) - 1:
            layers.append(CompiledLayer(rl.weight, rl.bias, "none", ()))
            break
        lo, hi = float(z.min()), float(z.max())
        pad = max(hi - lo, 1e-3) * _MARGIN
        coeffs = _fit(rl.activation, z, lo - pad, hi + pad, degs[rl.activation])
        while len(coeffs) > 2 and coeffs[-1] == 0.0:  # the top power must be non-zero
            coeffs = coeffs[:-1]
        deg = len(coeffs) - 1
        act_degrees.append(deg)
        depth += math.ceil(math.log2(deg)) if deg > 1 else 0
        layers.append(CompiledLayer(rl.weight, rl.bias, rl.activation, coeffs))
        hidden_max = max(hidden_max, float(np.abs(z).max()) ** max(deg, 1))
        h = _poly(coeffs, z)
        hidden_max = max(hidden_max, float(np.abs(h).max()))
    poly_cal = _forward(layers, cal)
    out_max = float(np.abs(poly_cal).max())
    # the result must stay below 2^(headroom - 1) at the last level: 16x above the calibration max
    headroom = max(8, math.ceil(math.log2(max(out_max, 1.0))) + 5)
    if headroom > ops.MAX_PRIME_BITS - min_scale_bits:
        raise HEError(f"outputs up to {out_max:.3g} on calibration data do not fit a CKKS prime")
    cands = [
        p
        for p in ops.candidate_parameters(depth, headroom_bits=headroom, min_scale_bits=min_scale_bits)
        if p.poly_modulus_degree <= max_poly_modulus_degree
        and p.slots >= max(d_in, *(x.weight.shape[1] for x in raw.layers))
        # hidden values live at >= 2 primes: below 2^(scale + headroom - 1) with 4x margin
        and hidden_max < 2.0 ** (p.scale_bits + headroom - 3)
    ]
    if not cands:
        raise HEError(f"no 128-bit CKKS parameters for depth {depth} (N <= {max_poly_modulus_degree})")
    sigma = 2.0**-noise_bits
    trials: list[ParameterTrial] = []
    chosen: ParameterTrial | None = None
    sample_n = 0
    for params in cands:
        m = min(cal.shape[0], params.slots)
        idx = np.unique(np.linspace(0, cal.shape[0] - 1, m).round().astype(int))
        x, ref = cal[idx], poly_cal[idx]
        sample_n = len(idx)
        t0 = time.perf_counter()
        he = _measure(tuple(layers), params, depth, x)
        err = float(np.abs(he - ref).max())
        agree = float(np.mean(_labels(he) == _labels(ref)))
        bound = SAFETY_FACTOR * err + _FLOOD_SIGMAS * sigma
        k = int(math.floor(-math.log2(bound)))
        ok = k >= precision_bits and agree >= _MIN_AGREEMENT and _FLOOD_OVER_ERROR * err <= sigma
        trial = ParameterTrial(
            params.poly_modulus_degree,
            params.coeff_mod_bit_sizes,
            params.scale_bits,
            err,
            agree,
            k,
            ok,
            time.perf_counter() - t0,
        )
        trials.append(trial)
        if ok:
            chosen = trial
            break
    search = ParameterSearch(precision_bits, sample_n, SAFETY_FACTOR, headroom, tuple(trials))
    if chosen is None:
        best = max(trials, key=lambda t: t.precision_bits)
        raise HEError(
            f"no CKKS parameters meet the requested precision 2^-{precision_bits}: best measured "
            f"max error {best.max_abs_error:.3g} (promise 2^-{best.precision_bits}, agreement "
            f"{best.agreement:.3f}) at N={best.poly_modulus_degree} {list(best.coeff_mod_bit_sizes)}; "
            f"the flooding std 2^-{noise_bits} must also be >= 4x the error; lower precision_bits, "
            f"raise max_poly_modulus_degree, or lower noise_bits"
        )
    dims = (d_in, *(int(x.weight.shape[1]) for x in raw.layers))
    steps = circuit.single_steps(dims)
    plan = PublicPlan(
        poly_modulus_degree=chosen.poly_modulus_degree,
        coeff_mod_bit_sizes=chosen.coeff_mod_bit_sizes,
        scale_bits=chosen.scale_bits,
        input_dim=d_in,
        output_dim=dims[-1],
        layer_dims=dims,
        activation_degrees=tuple(act_degrees),
        depth=depth,
        galois_steps=tuple(steps),
        postprocess=raw.postprocess,  # type: ignore[arg-type]
        precision_bits=chosen.precision_bits,
        noise_bits=noise_bits,
    )
    plan.check()
    return CompiledModel(tuple(layers), plan, search)
