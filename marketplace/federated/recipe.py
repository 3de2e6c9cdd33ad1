"""The federation's recipe (how to train) and participant terms (who joins, what it costs).

Both are plain JSON on the wire and validated here; ``ValueError`` names the field. The terms
are the federated contract mode's participant terms: an organisation may join a federation only
with an active contract on the offering whose modes include ``federated``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["Counting", "Recipe", "Strategy", "Terms"]

MAX_DIM = 4096


class Strategy(StrEnum):
    FEDAVG = "fedavg"


class Counting(StrEnum):
    SAMPLES = "samples"  # a contribution unit is one training sample in one round
    ROUNDS = "rounds"  # a contribution unit is one round contributed


def _num(d: dict[str, Any], key: str, lo: float, hi: float, default: float | None = None) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{key}: expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _int(d: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = d.get(key, default)
    if type(v) is not int or not lo <= v <= hi:
        raise ValueError(f"{key}: expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _extra(d: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected an object")
    bad = sorted(set(d) - allowed)
    if bad:
        raise ValueError(f"{where}: unknown fields {bad}")
    return d


@dataclass(frozen=True)
class Recipe:
    """Rounds, local epochs, learning rate, the update's clipping norm, FedAvg, the threshold.

    ``noise_multiplier`` > 0 turns on client-side DP (Gaussian noise of std ``z * clipping``);
    ``mean``/``scale`` are the published feature scaler (length ``dim``)."""

    dim: int
    rounds: int = 10
    local_epochs: int = 5
    lr: float = 0.1
    batch: int = 32
    clipping: float = 10.0
    noise_multiplier: float = 0.0
    strategy: Strategy = Strategy.FEDAVG
    min_participants: int = 2
    secure_aggregation: bool = True
    round_timeout: float = 60.0
    mean: list[float] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        d = _extra(data, set(cls.__dataclass_fields__), "recipe")
        dim = _int(d, "dim", 1, MAX_DIM)
        mean = d.get("mean") or [0.0] * dim
        scale = d.get("scale") or [1.0] * dim
        for name, vec in (("mean", mean), ("scale", scale)):
            if (
                not isinstance(vec, list)
                or len(vec) != dim
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vec)
            ):
                raise ValueError(f"{name}: expected {dim} finite numbers")
        if any(x <= 0 for x in scale):
            raise ValueError("scale: expected positive numbers")
        strategy = d.get("strategy", "fedavg")
        if strategy not in set(Strategy):
            raise ValueError(f"strategy: expected one of {[s.value for s in Strategy]}, got {strategy!r}")
        sa = d.get("secure_aggregation", True)
        if type(sa) is not bool:
            raise ValueError("secure_aggregation: expected true or false")
        return cls(
            dim=dim,
            rounds=_int(d, "rounds", 1, 1000, 10),
            local_epochs=_int(d, "local_epochs", 1, 100, 5),
            lr=_num(d, "lr", 1e-6, 10.0, 0.1),
            batch=_int(d, "batch", 1, 100_000, 32),
            clipping=_num(d, "clipping", 1e-6, 1e6, 10.0),
            noise_multiplier=_num(d, "noise_multiplier", 0.0, 1e3, 0.0),
            strategy=Strategy(strategy),
            min_participants=_int(d, "min_participants", 2, 1000, 2),
            secure_aggregation=sa,
            round_timeout=_num(d, "round_timeout", 1.0, 3600.0, 60.0),
            mean=[float(x) for x in mean],
            scale=[float(x) for x in scale],
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["strategy"] = self.strategy.value
        return out


@dataclass(frozen=True)
class Terms:
    """Participant terms: who may join (org ids; empty = any holder of a federated contract),
    how contributions count, an optional credit per unit (minor units, against usage), and the
    privacy budget (epsilon, delta) every participant's data is protected by."""

    allowed_orgs: list[str] = field(default_factory=list)
    counting: Counting = Counting.SAMPLES
    credit_minor_per_unit: int = 0
    epsilon: float = 0.0  # 0 = no DP requested (then noise_multiplier must be 0)
    delta: float = 1e-5

    @classmethod
    def from_dict(cls, data: Any) -> Terms:
        d = _extra(data or {}, set(cls.__dataclass_fields__), "terms")
        orgs = d.get("allowed_orgs", [])
        if (
            not isinstance(orgs, list)
            or len(orgs) > 1000
            or not all(isinstance(o, str) and 0 < len(o) <= 64 for o in orgs)
        ):
            raise ValueError("allowed_orgs: expected a list of organisation ids")
        counting = d.get("counting", "samples")
        if counting not in set(Counting):
            raise ValueError(f"counting: expected one of {[c.value for c in Counting]}, got {counting!r}")
        return cls(
            allowed_orgs=sorted(set(orgs)),
            counting=Counting(counting),
            credit_minor_per_unit=_int(d, "credit_minor_per_unit", 0, 10**9, 0),
            epsilon=_num(d, "epsilon", 0.0, 1e4, 0.0),
            delta=_num(d, "delta", 1e-12, 0.1, 1e-5),
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["counting"] = self.counting.value
        return out
