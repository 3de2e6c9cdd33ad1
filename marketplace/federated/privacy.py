"""The (epsilon, delta) accountant: Rényi DP of the Gaussian mechanism, composed over rounds.

Each round, every participant clips its update to L2 norm ``C`` and adds N(0, (z*C)^2) noise
itself (Flower's ``LocalDpMod``), so each round is a Gaussian mechanism with noise multiplier
``z`` on that participant's data. RDP composes additively over rounds (Mironov, "Rényi
Differential Privacy", CSF 2017); the conversion to (epsilon, delta) and the order grid are
Google's ``dp-accounting`` (the same package Flower's own accountant uses).
"""

from __future__ import annotations

import math

__all__ = ["epsilon_after", "flower_epsilon"]


def epsilon_after(noise_multiplier: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` Gaussian releases with multiplier ``noise_multiplier``."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    # Imported here: dp-accounting pulls in scipy and takes seconds; only DP federations need it.
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(noise_multiplier), rounds))
    return float(acc.get_epsilon(delta))


def flower_epsilon(noise_multiplier: float, delta: float) -> float:
    """The per-release epsilon to give Flower's ``LocalDpMod`` so its noise std is ``z * C``.

    LocalDpMod draws std = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon; we solve for epsilon.
    (That classic calibration is only how we parameterise the mod; the accounting is RDP.)"""
    return math.sqrt(2.0 * math.log(1.25 / delta)) / noise_multiplier
