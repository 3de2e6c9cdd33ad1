"""The public HE plan: what a consumer needs to make keys and encrypt, and nothing about weights.

A ``PublicPlan`` is JSON-able and shown to consumers in the catalog. It fixes the CKKS
parameters, the input/output dimensions, the layer widths and activation degrees (the circuit's
shape, not its coefficients), the supported layouts, the Galois steps the single-query layout
needs, the promised output precision and the consumer-side post-processing.

Layouts (both are supported by every plan; the consumer's key set decides which it can use):

* ``"batch"``: slot-per-sample. Feature j of up to ``slots`` samples is one ciphertext. Linear
  layers are plaintext-scalar multiply-adds, no rotations, so the key set has no Galois keys.
* ``"single"``: one ciphertext per sample, vector-matrix products with rotations. The key set
  must carry the Galois keys for ``galois_steps``.

Not for: holding weights (see ``compiler.CompiledModel``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from crypto.canonical import canonical_digest
from crypto.hazmat.tenseal_ops import CkksParameters

__all__ = ["LAYOUTS", "PLAN_VERSION", "Layout", "Postprocess", "PublicPlan"]

PLAN_VERSION = 1
Layout = Literal["batch", "single"]
Postprocess = Literal["sigmoid", "softmax"] | None
LAYOUTS: tuple[Layout, ...] = ("batch", "single")


@dataclass(frozen=True)
class PublicPlan:
    """Public description of a compiled HE model (no weights)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int
    input_dim: int
    output_dim: int
    layer_dims: tuple[int, ...]  # input_dim, hidden..., output_dim
    activation_degrees: tuple[int, ...]  # one per hidden layer
    depth: int
    galois_steps: tuple[int, ...]  # power-of-two rotation keys the "single" layout needs
    postprocess: Postprocess = None
    precision_bits: int = 8  # promise: |HE output - polynomial model| < 2^-precision_bits
    noise_bits: int = 12  # flooding noise std is 2^-noise_bits
    security_bits: int = 128
    layouts: tuple[Layout, ...] = LAYOUTS
    version: int = field(default=PLAN_VERSION)

    @property
    def params(self) -> CkksParameters:
        return CkksParameters(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def digest(self) -> str:
        """``sha256:<hex>`` of the RFC 8785 canonical JSON; binds requests to this plan.

        Computed once per (immutable) plan: every request checks it several times."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = canonical_digest(self.to_dict())
            self.__dict__["_digest"] = cached  # not a field: frozen, eq and asdict ignore it
        return str(cached)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PublicPlan:
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        if d.get("version") != PLAN_VERSION:
            raise ValueError(f"expected plan version {PLAN_VERSION}, got {d.get('version')!r}")
        try:
            plan = cls(
                poly_modulus_degree=int(d["poly_modulus_degree"]),
                coeff_mod_bit_sizes=tuple(int(x) for x in d["coeff_mod_bit_sizes"]),
                scale_bits=int(d["scale_bits"]),
                input_dim=int(d["input_dim"]),
                output_dim=int(d["output_dim"]),
                layer_dims=tuple(int(x) for x in d["layer_dims"]),
                activation_degrees=tuple(int(x) for x in d["activation_degrees"]),
                depth=int(d["depth"]),
                galois_steps=tuple(int(x) for x in d["galois_steps"]),
                postprocess=d.get("postprocess"),
                precision_bits=int(d["precision_bits"]),
                noise_bits=int(d["noise_bits"]),
                security_bits=int(d["security_bits"]),
                layouts=tuple(d["layouts"]),
                version=PLAN_VERSION,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed plan: {e}") from e
        plan.check()
        return plan

    @classmethod
    def from_json(cls, text: str | bytes) -> PublicPlan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not JSON: {e}") from e
        return cls.from_dict(d)

    def check(self) -> None:
        """Raise ValueError if the plan is internally inconsistent."""
        if self.postprocess not in ("sigmoid", "softmax", None):
            raise ValueError(f"postprocess must be sigmoid|softmax|null, got {self.postprocess!r}")
        if any(x not in LAYOUTS for x in self.layouts) or not self.layouts:
            raise ValueError(f"layouts must be a subset of {LAYOUTS}, got {self.layouts!r}")
        dims = self.layer_dims
        if len(dims) < 2 or dims[0] != self.input_dim or dims[-1] != self.output_dim:
            raise ValueError(f"layer_dims {dims} do not match input/output dims")
        if len(self.activation_degrees) != len(dims) - 2:
            raise ValueError("need one activation degree per hidden layer")
        if min(dims) < 1 or max(dims) > self.slots:
            raise ValueError(f"layer widths must be in [1, {self.slots}], got {dims}")
        if len(self.coeff_mod_bit_sizes) - 2 < self.depth:
            raise ValueError("coefficient modulus too short for the plan's depth")
        if self.noise_bits <= self.precision_bits:
            raise ValueError("flooding noise must be below the promised precision")
