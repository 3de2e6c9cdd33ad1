"""Which layout serves ``n`` samples faster: an operation-count estimate from the public plan.

For: the consumer SDK's ``layout="auto"`` (single ciphertext per sample for a few samples,
slot-per-sample batches otherwise). The estimate counts ciphertext work in rough units,
calibrated on the build machine (one key switch = 1): encrypting, sending and loading one
fresh ciphertext ~3, a plaintext multiply-add 0.1, re-randomising and flooding a result 1.
Measured break-evens: LR breast cancer ~7 samples (estimate 6), 64-32-10 square MLP ~37
(estimate ~10); both layouts agree on the answer for 1 sample and for full batches, which is
what matters. Not for: anything security-relevant (both layouts are equally private).
"""

from __future__ import annotations

import math

from crypto.hazmat import tenseal_ops as ops
from crypto.he.circuit import single_giant
from crypto.he.plan import Layout, PublicPlan

__all__ = ["choose_layout", "layout_cost"]

_CT, _KS, _MP, _SAN = 3.0, 1.0, 0.1, 1.0


def _powers(degree: int) -> int:
    return {0: 0, 1: 0, 2: 1, 3: 2, 4: 3}.get(degree, 3)


def layout_cost(plan: PublicPlan, layout: Layout, n_samples: int) -> float:
    """Estimated work (key-switch units) to serve ``n_samples`` in ``layout``."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    dims = plan.layer_dims
    terms = [1, *(max(d, 1) for d in plan.activation_degrees)]  # powers feeding each layer
    if layout == "batch":
        per = _CT * dims[0] + _SAN * dims[-1]
        for i in range(len(dims) - 1):
            per += _MP * terms[i] * dims[i] * dims[i + 1]
            if i < len(dims) - 2:
                per += _KS * _powers(plan.activation_degrees[i]) * dims[i + 1]
        return math.ceil(n_samples / plan.slots) * per
    if layout == "single":
        g = single_giant(dims[:-1])
        per = _CT + _SAN
        for i in range(len(dims) - 1):
            babies, giants = ops.bsgs_steps(dims[i], g)
            per += _KS * (terms[i] * len(babies) + len(giants)) + _MP * terms[i] * dims[i]
            if i < len(dims) - 2:
                per += _KS * _powers(plan.activation_degrees[i])
        return n_samples * per
    raise ValueError(f"layout must be batch|single, got {layout!r}")


def choose_layout(plan: PublicPlan, n_samples: int) -> Layout:
    """The layout of ``plan.layouts`` with the lower estimated cost for ``n_samples``."""
    offered = [x for x in ("single", "batch") if x in plan.layouts]
    return min(offered, key=lambda x: layout_cost(plan, x, n_samples))
