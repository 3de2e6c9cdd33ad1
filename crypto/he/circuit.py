"""The HE circuit of a compiled network, on TenSEAL vectors, with the scale-drift correction.

For: ``evaluate`` (at the compute site) and the compiler's parameter search (which measures the
CKKS error of candidate parameters on calibration data) running the same code. Each layer is
``sum_q (c_q W)^T x^q + b + c_0 W^T 1`` where ``c`` is the previous layer's activation
polynomial; every plaintext multiplier also carries ``affine_corrections`` (TenSEAL resets the
scale to ``2^s`` after a rescale by a prime ``q != 2^s``; the compiler knows the primes, so it
undoes the drift for free). Not for: circuit privacy (``privacy``) or framing (``wire``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from crypto.hazmat import tenseal_ops as ops

__all__ = [
    "Layer",
    "SingleProgram",
    "run_batch",
    "run_single",
    "run_single_program",
    "single_program",
    "single_steps",
]


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
        h = ops.batch_affine(pw, coeffs, layer.weight, layer.bias, mask if i == last else None, corrections=corr)
        if i == last:
            return h
        coeffs = layer.coeffs
        deg = len(coeffs) - 1
        n_out = min(n for n, _ in levels.values()) - 1  # the highest power's term sets it
        pw = ops.powers(h, deg)
        levels = ops.power_levels(primes, n_out, deg, scale_bits)
    raise ValueError("a network needs at least one layer")


def run_single(layers: Sequence[Layer], x: Any, *, slots: int, primes: Sequence[int], scale_bits: int) -> Any:
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


def single_giant(dims: Sequence[int]) -> int:
    """The baby-step count ``g`` of the single layout (one for every layer, so that the layers
    share rotation keys): ``ceil(sqrt(max d_in))``."""
    return max(1, math.isqrt(max(dims) - 1) + 1)


def single_steps(dims: Sequence[int]) -> list[int]:
    """Every rotation step the single layout performs for a network of widths ``dims``."""
    g = single_giant(dims[:-1])
    out: set[int] = set()
    for d_in in dims[:-1]:
        babies, giants = ops.bsgs_steps(d_in, g)
        out.update(babies)
        out.update(giants)
    return sorted(out)


@dataclass(frozen=True)
class _SingleLayer:
    n_primes: int  # every power is brought to this many primes before the products
    powers: tuple[int, ...]
    babies: tuple[int, ...]
    giants: tuple[tuple[int, tuple[tuple[int, int, Any], ...]], ...]
    bias: Any | None  # plaintext at n_primes - 1
    degree: int  # of the activation polynomial after this layer (0: last layer)


@dataclass(frozen=True)
class SingleProgram:
    """The single-layout circuit of a model with its diagonals encoded (once per model and plan)."""

    layers: tuple[_SingleLayer, ...]
    slots: int


def single_program(
    layers: Sequence[Layer], kit: ops.SealKit, *, slots: int, primes: Sequence[int], scale_bits: int
) -> SingleProgram:
    """Encode the baby-step/giant-step diagonals of every layer (``y = x W`` for a vector ``x``
    replicated with period ``d_in``, as TenSEAL encrypts it).

    Layer l computes its outputs on ``ext_l`` slots, ``y[k] = y[k mod d_out]``, so that the
    next layer reads its input replicated as far as its rotations reach; the last layer has
    ``ext = d_out``: every other slot is zero (the mask costs nothing). Scale-drift corrections
    are folded in for a rescale at the lowest level of the layer's powers."""
    dims = [int(x.weight.shape[0]) for x in layers] + [int(layers[-1].weight.shape[1])]
    g = single_giant(dims[:-1])
    ext = [0] * len(layers)
    ext[-1] = dims[-1]
    for i in range(len(layers) - 2, -1, -1):
        ext[i] = ext[i + 1] + dims[i + 1] - 1
    d = float(2**scale_bits)
    levels = ops.power_levels(primes, len(primes), 1, scale_bits)
    coeffs: tuple[float, ...] = (0.0, 1.0)
    out: list[_SingleLayer] = []
    for li, layer in enumerate(layers):
        w = np.asarray(layer.weight, dtype=np.float64)
        d_in, d_out = w.shape
        e = ext[li]
        if e + d_in - 1 > slots:
            raise ValueError(f"layer {li} does not fit {slots} slots in the single layout")
        n = min(n for n, _ in levels.values())
        k = np.arange(e)
        cols = k % d_out
        powers = tuple(q for q in range(1, len(coeffs)) if coeffs[q] != 0.0)
        if not powers:
            raise ValueError("activation polynomial has no non-constant term")
        giants = []
        for j0 in range(0, d_in, g):
            terms = []
            for q in powers:
                c = coeffs[q] * primes[n - 1] / (d * levels[q][1])
                for b in range(min(g, d_in - j0)):
                    vals = w[(k + j0 + b) % d_in, cols] * c
                    if not vals.any():
                        continue
                    diag = np.zeros(slots)
                    diag[j0 : j0 + e] = vals  # the diagonal rotated by -j0
                    terms.append((q, b, kit.encode(diag, n)))
            giants.append((j0, tuple(terms)))
        consts = np.asarray(layer.bias, dtype=np.float64) + coeffs[0] * w.sum(axis=0)
        bias = None
        if consts.any():
            bv = np.zeros(slots)
            bv[:e] = consts[cols]
            bias = kit.encode(bv, n - 1)
        last = li == len(layers) - 1
        deg = 0 if last else len(layer.coeffs) - 1
        babies, _ = ops.bsgs_steps(d_in, g)
        out.append(_SingleLayer(n, powers, tuple(babies), tuple(giants), bias, deg))
        if not last:
            coeffs = layer.coeffs
            levels = ops.power_levels(primes, n - 1, deg, scale_bits)
    return SingleProgram(tuple(out), slots)


def run_single_program(prog: SingleProgram, kit: ops.SealKit, x: Any) -> Any:
    """Evaluate on one SEAL ciphertext (a fresh replicated sample); returns a SEAL ciphertext
    with the outputs in slots ``0..d_out-1`` and zeros elsewhere."""
    pw: dict[int, Any] = {1: x}
    for layer in prog.layers:
        src = {q: kit.mod_switch(pw[q], layer.n_primes) for q in layer.powers}
        acc = ops.bsgs_matvec(kit, src, layer.babies, layer.giants)
        kit.rescale(acc)
        if layer.bias is not None:
            kit.evaluator.add_plain_inplace(acc, layer.bias)
        if layer.degree == 0:
            return acc
        pw = ops.seal_powers(kit, acc, layer.degree)
    raise ValueError("a network needs at least one layer")
