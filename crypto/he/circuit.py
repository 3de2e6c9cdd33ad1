"""The HE circuit of a compiled network, on TenSEAL vectors, with the scale-drift correction.

For: ``evaluate`` (at the compute site) and the compiler's parameter search (which measures the
CKKS error of candidate parameters on calibration data) running the same code. Each layer is
``sum_q (c_q W)^T x^q + b + c_0 W^T 1`` where ``c`` is the previous layer's activation
polynomial; every plaintext multiplier also carries ``affine_corrections`` (TenSEAL resets the
scale to ``2^s`` after a rescale by a prime ``q != 2^s``; the compiler knows the primes, so it
undoes the drift for free). Not for: circuit privacy (``privacy``) or framing (``wire``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from crypto.hazmat import tenseal_ops as ops

__all__ = ["Layer", "run_batch", "run_single"]


class Layer(Protocol):
    """What the circuit needs of a compiled layer (``compiler.CompiledLayer``)."""

    @property
    def weight(self) -> np.ndarray: ...

    @property
    def bias(self) -> np.ndarray: ...

    @property
    def coeffs(self) -> tuple[float, ...]: ...


def run_batch(
    layers: Sequence[Layer],
    xs: list[Any],
    *,
    n_valid: int,
    slots: int,
    primes: Sequence[int],
    scale_bits: int,
) -> list[Any]:
    """Slot-per-sample: ``xs[j]`` holds feature j of up to ``slots`` samples (fresh ciphertexts).

    Returns one ciphertext per output; slots ``>= n_valid`` are zero (mask folded into the last
    multiply)."""
    mask: np.ndarray | None = None
    if n_valid < slots:
        mask = np.zeros(slots)
        mask[:n_valid] = 1.0
    pw: dict[int, list[Any]] = {1: xs}
    coeffs: tuple[float, ...] = (0.0, 1.0)
    levels = ops.power_levels(primes, len(primes), 1, scale_bits)
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        corr = ops.affine_corrections(levels, primes, scale_bits)
        h = ops.batch_affine(
            pw, coeffs, layer.weight, layer.bias, mask if i == last else None, corrections=corr
        )
        if i == last:
            return h
        coeffs = layer.coeffs
        deg = len(coeffs) - 1
        n_out = min(n for n, _ in levels.values()) - 1  # the highest power's term sets it
        pw = ops.powers(h, deg)
        levels = ops.power_levels(primes, n_out, deg, scale_bits)
    raise ValueError("a network needs at least one layer")


def run_single(
    layers: Sequence[Layer], x: Any, *, slots: int, primes: Sequence[int], scale_bits: int
) -> Any:
    """One ciphertext per sample (TenSEAL vector-matrix products); the last matrix is padded
    with zero columns to every slot, so non-output slots are zero."""
    pw: dict[int, Any] = {1: x}
    coeffs: tuple[float, ...] = (0.0, 1.0)
    levels = ops.power_levels(primes, len(primes), 1, scale_bits)
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        w, b = layer.weight, layer.bias
        if i == last:
            w = np.pad(w, ((0, 0), (0, slots - w.shape[1])))
            b = np.pad(b, (0, slots - b.shape[0]))
        corr = ops.affine_corrections(levels, primes, scale_bits)
        h = ops.single_affine(pw, coeffs, w, b, corrections=corr)
        if i == last:
            return h
        coeffs = layer.coeffs
        deg = len(coeffs) - 1
        n_out = min(n for n, _ in levels.values()) - 1
        pw = {q: v[0] for q, v in ops.powers([h], deg).items()}
        levels = ops.power_levels(primes, n_out, deg, scale_bits)
    raise ValueError("a network needs at least one layer")
