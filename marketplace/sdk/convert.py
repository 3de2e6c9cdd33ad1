"""Turn a trained scikit-learn estimator or PyTorch ``nn.Sequential`` into an uploadable artifact.

For: the provider's own machine. ``som convert model.joblib`` and ``SomClient.upload_sklearn``
read the fitted parameters of the estimator (coefficients, intercepts, the scaler's mean and
scale) and write them as the declarative ``som-layers-v1`` ``.npz`` layout of
:mod:`crypto.he.compiler` or as a small standard-operator ONNX graph (Gemm + activations), the
two formats the marketplace accepts and the HE compiler can evaluate on ciphertexts.
Not for: the server, which never loads a pickle (``.joblib`` and ``.pkl`` uploads are refused
with 415); loading a pickle runs its author's code, which is safe only on its author's machine.

Why not skl2onnx's graphs directly: skl2onnx expresses these models with the ``ai.onnx.ml``
operators (``LinearClassifier``, ``LinearRegressor``, ``Scaler``, ``ZipMap``), which are opaque
to the HE compiler (it needs the affine maps themselves to pack them into CKKS slots). We read
the same fitted parameters skl2onnx reads and check the result: :func:`check_artifact` compares
the artifact's outputs with the estimator's own ``predict_proba`` / ``decision_function`` /
``predict`` on probe rows (the test suite also compares them with skl2onnx's graph under ONNX
Runtime).

Supported, with the layer each becomes (``W`` has shape (d_out, d_in)):

============================================  ============================================
estimator                                     layers
============================================  ============================================
``LogisticRegression`` (binary)               affine (1 output), consumer-side sigmoid
``LogisticRegression`` (multinomial)          affine (k outputs), consumer-side softmax
``LinearRegression``, ``Ridge``               affine, no activation
``MLPClassifier`` / ``MLPRegressor``          affine + relu/tanh/sigmoid/none per hidden layer,
                                              last: sigmoid / softmax / none
``Pipeline([StandardScaler, one of above])``  the scaler folded into the first affine layer
``torch.nn.Sequential`` of ``Linear``,        one affine layer per ``Linear`` with the
``ReLU``, ``Sigmoid``, ``Tanh``,              activation that follows it
``Identity``, ``Softmax`` (last)
============================================  ============================================

Errors: :class:`UnsupportedModel` (a ``ValueError``) names what cannot be converted and why.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "Artifact",
    "Layer",
    "UnsupportedModel",
    "artifact_outputs",
    "check_artifact",
    "from_estimator",
    "from_torch",
    "load_local_model",
    "to_npz",
    "to_onnx",
]

Format = Literal["npz", "onnx"]
_MLP_ACT = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": "none"}
_LAST_ACT = {"logistic": "sigmoid", "softmax": "softmax", "identity": "none"}


class UnsupportedModel(ValueError):
    """The object is not a model this converter understands; the message says what it is."""


@dataclass(frozen=True)
class Layer:
    """``activation(x @ weight.T + bias)``; ``weight`` has shape (d_out, d_in)."""

    weight: np.ndarray
    bias: np.ndarray
    activation: str


@dataclass(frozen=True)
class Artifact:
    """A converted model: the bytes to upload, their format and the declared input shape."""

    data: bytes
    format: Format
    input_dim: int
    output_dim: int
    source: str  # e.g. "sklearn.linear_model.LogisticRegression"
    max_abs_error: float | None = None  # set by check_artifact

    @property
    def input_shape(self) -> list[int]:
        return [self.input_dim]


def _affine(weight: Any, bias: Any, activation: str) -> Layer:
    w = np.atleast_2d(np.asarray(weight, dtype=np.float64))
    b = np.asarray(bias, dtype=np.float64).reshape(-1)
    if b.size == 1 and w.shape[0] > 1:
        b = np.full(w.shape[0], float(b[0]))
    if b.shape != (w.shape[0],):
        raise UnsupportedModel(f"bias of shape {b.shape} does not fit weight of shape {w.shape}")
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
        raise UnsupportedModel("the model has non-finite parameters (NaN or infinity)")
    return Layer(w, b, activation)


def _fold_scaler(scaler: Any, first: Layer) -> Layer:
    """(x - mean) / scale then W: W' = W / scale, b' = b - W' @ mean."""
    d_in = first.weight.shape[1]
    mean = np.asarray(getattr(scaler, "mean_", None) if scaler.with_mean else np.zeros(d_in), dtype=np.float64)
    scale = np.asarray(getattr(scaler, "scale_", None) if scaler.with_std else np.ones(d_in), dtype=np.float64)
    if mean.shape != (d_in,) or scale.shape != (d_in,):
        raise UnsupportedModel(f"the StandardScaler has {mean.size} features, the estimator {d_in}")
    w = first.weight / scale[None, :]
    return Layer(w, first.bias - w @ mean, first.activation)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__.split('._')[0]}.{cls.__name__}"


def _estimator_layers(est: Any) -> list[Layer]:
    name = type(est).__name__
    if not hasattr(est, "n_features_in_"):
        raise UnsupportedModel(f"{_qualname(est)} is not fitted (call .fit first)")
    if name == "LogisticRegression":
        coef = np.asarray(est.coef_)
        if coef.shape[0] == 1:
            return [_affine(coef, est.intercept_, "sigmoid")]
        return [_affine(coef, est.intercept_, "softmax")]
    if name in ("LinearRegression", "Ridge", "RidgeCV", "Lasso", "ElasticNet"):
        return [_affine(est.coef_, np.atleast_1d(est.intercept_), "none")]
    if name in ("MLPClassifier", "MLPRegressor"):
        hidden = _MLP_ACT.get(est.activation)
        last = _LAST_ACT.get(est.out_activation_)
        if hidden is None or last is None:
            raise UnsupportedModel(f"{name} with activation {est.activation!r} is not supported")
        n = len(est.coefs_)
        return [
            _affine(np.asarray(w).T, b, last if i == n - 1 else hidden)
            for i, (w, b) in enumerate(zip(est.coefs_, est.intercepts_, strict=True))
        ]
    raise UnsupportedModel(
        f"{_qualname(est)} is not supported; supported: LogisticRegression, LinearRegression, Ridge, "
        "MLPClassifier, MLPRegressor, a Pipeline of StandardScaler and one of them, torch nn.Sequential"
    )


def from_estimator(estimator: Any, *, format: Format = "npz") -> Artifact:
    """Convert a fitted scikit-learn estimator (or ``Pipeline``). Raises :class:`UnsupportedModel`."""
    scaler = None
    est = estimator
    if type(estimator).__name__ == "Pipeline":
        steps = [s for _, s in estimator.steps if s not in (None, "passthrough")]
        if len(steps) == 2 and type(steps[0]).__name__ == "StandardScaler":
            scaler, est = steps
        elif len(steps) == 1:
            est = steps[0]
        else:
            kinds = ", ".join(type(s).__name__ for s in steps)
            raise UnsupportedModel(f"a Pipeline of {kinds} is not supported; use StandardScaler then one estimator")
    layers = _estimator_layers(est)
    if scaler is not None:
        layers[0] = _fold_scaler(scaler, layers[0])
    return _artifact(layers, format=format, source=_qualname(estimator))


def from_torch(module: Any, *, format: Format = "npz") -> Artifact:
    """Convert a ``torch.nn.Sequential`` of Linear layers and activations (torch is optional)."""
    children = list(module.children()) if hasattr(module, "children") else []
    if type(module).__name__ != "Sequential" or not children:
        raise UnsupportedModel(f"{_qualname(module)} is not a non-empty torch.nn.Sequential")
    acts = {"ReLU": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Identity": "none", "Softmax": "softmax"}
    layers: list[Layer] = []
    for i, child in enumerate(children):
        kind = type(child).__name__
        if kind == "Linear":
            bias = child.bias.detach().cpu().numpy() if child.bias is not None else np.zeros(child.out_features)
            layers.append(_affine(child.weight.detach().cpu().numpy(), bias, "none"))
        elif kind in acts and layers and layers[-1].activation == "none":
            if kind == "Softmax" and i != len(children) - 1:
                raise UnsupportedModel("Softmax is supported only as the last module")
            layers[-1] = Layer(layers[-1].weight, layers[-1].bias, acts[kind])
        else:
            raise UnsupportedModel(f"module {i} ({kind}) is not supported here: Linear, then one of {sorted(acts)}")
    return _artifact(layers, format=format, source="torch.nn.Sequential")


def _artifact(layers: Sequence[Layer], *, format: Format, source: str) -> Artifact:
    for prev, nxt in zip(layers, layers[1:], strict=False):
        if prev.weight.shape[0] != nxt.weight.shape[1]:
            raise UnsupportedModel(f"layer widths do not chain: {prev.weight.shape} then {nxt.weight.shape}")
    for layer in layers[:-1]:
        if layer.activation == "softmax":
            raise UnsupportedModel("softmax is supported only on the last layer")
    if format == "npz":
        data = to_npz(layers)
    elif format == "onnx":
        data = to_onnx(layers)
    else:
        raise ValueError(f"format must be 'npz' or 'onnx', got {format!r}")
    return Artifact(data, format, int(layers[0].weight.shape[1]), int(layers[-1].weight.shape[0]), source)


def to_npz(layers: Sequence[Layer]) -> bytes:
    """The ``som-layers-v1`` layout (see :mod:`crypto.he.compiler`)."""
    arrays: dict[str, np.ndarray] = {}
    for i, layer in enumerate(layers):
        arrays[f"layer{i}.weight"] = layer.weight
        arrays[f"layer{i}.bias"] = layer.bias
        arrays[f"layer{i}.activation"] = np.array(layer.activation)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def to_onnx(layers: Sequence[Layer]) -> bytes:
    """Gemm (``transB=1``) + activation per layer, opset 17, one float input ``x``."""
    # lazy imports: optional for callers that only read parameters (start-up cost of onnx)
    import onnx  # the provider's machine has it: a core dependency
    from onnx import TensorProto, helper, numpy_helper

    ops = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh"}
    nodes, inits, cur = [], [], "x"
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        inits += [
            numpy_helper.from_array(layer.weight.astype(np.float32), f"W{i}"),
            numpy_helper.from_array(layer.bias.astype(np.float32), f"B{i}"),
        ]
        act = "Softmax" if layer.activation == "softmax" else ops.get(layer.activation)
        z = "y" if last and act is None else f"z{i}"
        nodes.append(helper.make_node("Gemm", [cur, f"W{i}", f"B{i}"], [z], transB=1))
        cur = z
        if act is not None:  # a final Sigmoid/Softmax must produce the graph output itself
            a = "y" if last else f"a{i}"
            node = helper.make_node(act, [cur], [a])
            if act == "Softmax":
                node.attribute.append(helper.make_attribute("axis", -1))
            nodes.append(node)
            cur = a
    d_in, d_out = int(layers[0].weight.shape[1]), int(layers[-1].weight.shape[0])
    graph = helper.make_graph(
        nodes,
        "som-converted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, d_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="som convert")
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _layers_of(artifact: Artifact) -> list[Layer]:
    if artifact.format == "npz":
        with np.load(io.BytesIO(artifact.data), allow_pickle=False) as z:
            n = len([k for k in z.files if k.endswith(".weight")])
            return [Layer(z[f"layer{i}.weight"], z[f"layer{i}.bias"], str(z[f"layer{i}.activation"])) for i in range(n)]
    # lazy import: heavy (the HE stack), only to read back an ONNX artifact
    from crypto.he.onnx_import import parse_onnx

    raw = parse_onnx(artifact.data)
    layers = [Layer(np.asarray(r.weight).T, np.asarray(r.bias), r.activation) for r in raw.layers]
    if raw.postprocess:
        last = layers[-1]
        layers[-1] = Layer(last.weight, last.bias, raw.postprocess)
    return layers


def artifact_outputs(artifact: Artifact, x: np.ndarray) -> np.ndarray:
    """What the artifact computes on rows ``x`` (plaintext, numpy), activations included."""
    h = np.asarray(x, dtype=np.float64)
    for layer in _layers_of(artifact):
        h = h @ layer.weight.T + layer.bias
        if layer.activation == "relu":
            h = np.maximum(h, 0.0)
        elif layer.activation == "sigmoid":
            h = 1.0 / (1.0 + np.exp(-h))
        elif layer.activation == "tanh":
            h = np.tanh(h)
        elif layer.activation == "softmax":
            e = np.exp(h - h.max(axis=1, keepdims=True))
            h = e / e.sum(axis=1, keepdims=True)
    return h


def _reference(estimator: Any, x: np.ndarray) -> np.ndarray:
    if hasattr(estimator, "predict_proba"):
        p = np.asarray(estimator.predict_proba(x), dtype=np.float64)
        return p[:, 1:] if p.shape[1] == 2 else p
    return np.asarray(estimator.predict(x), dtype=np.float64).reshape(len(x), -1)


def check_artifact(artifact: Artifact, estimator: Any, x: np.ndarray, *, tolerance: float = 1e-4) -> Artifact:
    """Compare the artifact with the estimator on rows ``x``; return it with ``max_abs_error`` set.

    Raises :class:`UnsupportedModel` when they differ by more than ``tolerance`` (float32 ONNX
    weights round at about 1e-6 relative).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != artifact.input_dim or len(x) == 0:
        raise ValueError(f"check rows: expected shape (n, {artifact.input_dim}), got {x.shape}")
    ours, ref = artifact_outputs(artifact, x), _reference(estimator, x)
    if ours.shape != ref.shape:
        raise UnsupportedModel(f"the artifact gives outputs of shape {ours.shape}, the estimator {ref.shape}")
    err = float(np.max(np.abs(ours - ref)))
    if not err <= tolerance:
        raise UnsupportedModel(f"the artifact differs from the estimator by {err:.3g} (> {tolerance:g})")
    return Artifact(artifact.data, artifact.format, artifact.input_dim, artifact.output_dim, artifact.source, err)


def probe_rows(estimator: Any, n_features: int, *, n: int = 256, seed: int = 0) -> np.ndarray:
    """Rows to check a conversion on when the provider gives none: around the scaler's statistics."""
    rng = np.random.default_rng(seed)
    mean, scale = np.zeros(n_features), np.ones(n_features)
    if type(estimator).__name__ == "Pipeline":
        first = estimator.steps[0][1]
        if hasattr(first, "mean_") and first.mean_ is not None:
            mean, scale = np.asarray(first.mean_), np.asarray(first.scale_)
    return mean + scale * rng.standard_normal((n, n_features))


def load_local_model(path: Path) -> Any:
    """Load the provider's OWN pickled estimator (``.joblib``/``.pkl``) or a torch module (``.pt``).

    This runs the file's code: only ever call it on a file you made yourself, on your own machine.
    """
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            # optional dependency (the torch extra)
            import torch
        except ImportError as e:
            raise UnsupportedModel("reading a .pt file needs PyTorch: pip install 'share-of-model[torch]'") from e
        return torch.load(path, weights_only=False)  # noqa: S614 - the provider's own file
    if suffix in (".joblib", ".pkl", ".pickle"):
        try:
            # optional dependency (scikit-learn, on the provider's machine only)
            import joblib  # scikit-learn's own dependency
        except ImportError as e:
            raise UnsupportedModel(
                "reading a .joblib file needs scikit-learn: pip install 'share-of-model[sklearn]'"
            ) from e

        try:
            return joblib.load(path)  # noqa: S301 - the provider's own file, on the provider's machine
        except Exception as e:  # unpickling fails in many ways (KeyError, EOFError, ...)
            raise UnsupportedModel(f"could not read it as a model ({type(e).__name__}: {e})") from e
    raise UnsupportedModel(f"{path.name}: expected a .joblib/.pkl scikit-learn model or a .pt torch module")
