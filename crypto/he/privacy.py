"""Circuit privacy for HE results (docs/design.md §9): re-randomise and flood before a result leaves.

For: making a result ciphertext independent of the weights beyond the outputs, against a
semi-honest consumer (who generated its keys and ciphertexts honestly). Masking of non-output
slots is folded into the last plaintext multiply by the evaluator; this module adds

1. a fresh public-key encryption of zero (brought to the last level, which also mod-switches the
   result down to the fewest primes), and
2. Gaussian flooding noise of std ``2^-noise_bits`` in every slot, drawn from a CSPRNG.

Not for: malicious consumers who craft ill-formed ciphertexts, or extraction from outputs
(quota and rate limits are the defence there). See docs/he.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from crypto.hazmat import tenseal_ops as ops

__all__ = ["Rng", "gaussian_noise", "sanitize", "sanitize_seal"]

log = logging.getLogger(__name__)
Rng = Callable[[int], bytes]


def gaussian_noise(n: int, sigma: float, *, rng: Rng = os.urandom) -> np.ndarray:
    """``n`` N(0, sigma^2) samples by Box-Muller from ``rng`` bytes (default: os.urandom)."""
    raw = np.frombuffer(rng(16 * n), dtype=np.uint64).reshape(2, n)
    u1 = ((raw[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53  # (0, 1]
    u2 = (raw[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
    return np.asarray(sigma * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2))


def sanitize(vec: Any, ctx: Any, *, size: int, levels_down: int, sigma: float, rng: Rng) -> Any:
    """Re-randomise ``vec`` with a fresh encryption of zero and flood every slot."""
    zero = ops.encrypt_zero_at_last_level(ctx, size, levels_down=levels_down)
    out = vec + zero
    out += gaussian_noise(size, sigma, rng=rng).tolist()
    return out


def sanitize_seal(ct: Any, kit: ops.SealKit, *, sigma: float, rng: Rng) -> Any:
    """``sanitize`` on a SEAL ciphertext, in place: switch it down to the last prime, add a
    fresh public-key encryption of zero made at that level (SEAL encrypts at the key level and
    divides down), then flooding noise in every slot. Returns ``ct``."""
    ct = kit.mod_switch(ct, 1)
    zero = kit.zero(1)
    zero.scale = ct.scale
    kit.evaluator.add_inplace(ct, zero)
    noise = kit.encode(gaussian_noise(kit.slots, sigma, rng=rng), 1, scale=ct.scale)
    kit.evaluator.add_plain_inplace(ct, noise)
    return ct
