"""The policy decision: may this use happen now under these terms, given the usage so far?

For: one pure function, :func:`decide`, and the pure usage transitions :func:`reserve`,
:func:`commit`, :func:`release` that the marketplace applies inside its metering transaction.
Not for: storing usage (the marketplace's DB does), verifying signatures (:mod:`contracts.offer`),
or charging (:mod:`contracts.metering`).

Rate windows are fixed windows anchored at ``terms.valid_from``: window ``i`` covers
``[valid_from + i*w, valid_from + (i+1)*w)``. Anyone can recompute the window of a ledger usage
record from its ``time`` (the reservation time) and the terms, offline. Reserved (in-flight) units
count against both quota and rate, so concurrent requests can never overspend; a released
reservation gives its units back (to the rate only if its window is still the current one and the
caller does not ask ``keep_rate``; the marketplace keeps them: every attempt counts against the
rate window).

Checks run in this order, and the first failing one is the reason: terminated, suspended,
not_yet_valid, expired, mode_not_allowed, job_kind_not_allowed, keyset_not_bound,
batch_too_large, quota_exhausted, rate_limited.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from contracts._validate import describe, require_utc
from contracts.errors import UsageError
from contracts.offer import Status
from contracts.terms import JOB_KINDS, MODES, Terms

__all__ = [
    "Allow",
    "Decision",
    "Deny",
    "DenyReason",
    "Reservation",
    "UsageState",
    "UseRequest",
    "commit",
    "decide",
    "release",
    "reserve",
]


class DenyReason(StrEnum):
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    QUOTA_EXHAUSTED = "quota_exhausted"
    RATE_LIMITED = "rate_limited"
    MODE_NOT_ALLOWED = "mode_not_allowed"
    BATCH_TOO_LARGE = "batch_too_large"
    JOB_KIND_NOT_ALLOWED = "job_kind_not_allowed"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"
    KEYSET_NOT_BOUND = "keyset_not_bound"


def _nonneg(name: str, value: object, minimum: int = 0) -> None:
    if type(value) is not int or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {describe(value)}")


@dataclass(frozen=True)
class UsageState:
    """Usage of one contract so far.

    ``window_start`` is the start of the rate window that ``window_units`` belongs to (``None``
    before the first reservation). ``status`` is the lifecycle status from the contract's events
    (active, suspended or terminated); time-based status comes from the terms and ``now``.
    ``bound_keysets`` are the HE key set ids registered for this contract.
    """

    used_units: int = 0
    reserved_units: int = 0
    window_units: int = 0
    window_start: datetime | None = None
    status: Status = Status.ACTIVE
    bound_keysets: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        _nonneg("used_units", self.used_units)
        _nonneg("reserved_units", self.reserved_units)
        _nonneg("window_units", self.window_units)
        if self.window_start is not None:
            object.__setattr__(self, "window_start", require_utc(self.window_start, "window_start"))
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "bound_keysets", frozenset(self.bound_keysets))


@dataclass(frozen=True)
class UseRequest:
    """One requested use: ``units`` to charge, ``batch_size`` samples, a job kind for remote jobs,
    a key set id for HE inference."""

    mode: str
    units: int
    batch_size: int
    job_kind: str | None = None
    keyset_id: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {describe(self.mode)}")
        _nonneg("units", self.units, 1)
        _nonneg("batch_size", self.batch_size, 1)
        if self.job_kind is not None and self.job_kind not in JOB_KINDS:
            raise ValueError(f"job_kind: expected one of {list(JOB_KINDS)} or None, got {describe(self.job_kind)}")


@dataclass(frozen=True)
class Allow:
    """The use may go ahead; reserve ``units`` in the rate window starting at ``window_start``."""

    units: int
    window_start: datetime


@dataclass(frozen=True)
class Deny:
    """The use may not go ahead. ``retry_after`` (seconds) only for ``rate_limited`` when waiting
    for the next window can help; ``None`` otherwise."""

    reason: DenyReason
    message: str
    retry_after: int | None = None


Decision = Allow | Deny


def _window_start(terms: Terms, now: datetime) -> datetime:
    return terms.valid_from + timedelta(seconds=terms.rate_window_seconds * terms.window_index(now))


def _window_units(terms: Terms, usage: UsageState, start: datetime) -> int:
    return usage.window_units if usage.window_start == start else 0


def decide(terms: Terms, usage: UsageState, request: UseRequest, now: datetime) -> Decision:
    """Decide ``request`` under ``terms`` given ``usage`` at ``now``. Pure; never raises for a
    well-typed input (bad arguments raise ``TypeError``/``ValueError``)."""
    if not isinstance(terms, Terms):
        raise TypeError(f"terms: expected Terms, got {describe(terms)}")
    if not isinstance(usage, UsageState):
        raise TypeError(f"usage: expected UsageState, got {describe(usage)}")
    if not isinstance(request, UseRequest):
        raise TypeError(f"request: expected UseRequest, got {describe(request)}")
    t = require_utc(now, "now")

    if usage.status is Status.TERMINATED:
        return Deny(DenyReason.TERMINATED, "the contract has been terminated")
    if usage.status is Status.SUSPENDED:
        return Deny(DenyReason.SUSPENDED, "the provider has suspended the contract")
    if usage.status is Status.NOT_YET_VALID or t < terms.valid_from:
        return Deny(DenyReason.NOT_YET_VALID, f"the contract is valid from {terms.valid_from}")
    if usage.status is Status.EXPIRED or t >= terms.valid_until:
        return Deny(DenyReason.EXPIRED, f"the contract expired at {terms.valid_until}")
    if request.mode not in terms.modes:
        return Deny(
            DenyReason.MODE_NOT_ALLOWED,
            f"mode {request.mode!r} is not allowed; allowed: {sorted(terms.modes)}",
        )
    if request.mode == "remote_job" and request.job_kind not in terms.job_limits.allowed_kinds:
        return Deny(
            DenyReason.JOB_KIND_NOT_ALLOWED,
            f"job kind {request.job_kind!r} is not allowed; allowed: {sorted(terms.job_limits.allowed_kinds)}",
        )
    if request.mode == "he_inference" and request.keyset_id not in usage.bound_keysets:
        return Deny(
            DenyReason.KEYSET_NOT_BOUND,
            f"key set {request.keyset_id!r} is not registered for this contract",
        )
    if request.batch_size > terms.max_batch:
        return Deny(
            DenyReason.BATCH_TOO_LARGE,
            f"batch of {request.batch_size} exceeds the maximum of {terms.max_batch}",
        )
    committed = usage.used_units + usage.reserved_units
    if committed + request.units > terms.quota_units:
        left = max(terms.quota_units - committed, 0)
        return Deny(
            DenyReason.QUOTA_EXHAUSTED,
            f"{request.units} units requested, {left} of {terms.quota_units} left ({usage.reserved_units} in flight)",
        )
    start = _window_start(terms, t)
    in_window = _window_units(terms, usage, start)
    if in_window + request.units > terms.rate_units:
        if request.units > terms.rate_units:
            return Deny(
                DenyReason.RATE_LIMITED,
                f"{request.units} units exceed the rate of {terms.rate_units} per "
                f"{terms.rate_window_seconds} s; split the request",
            )
        nxt = start + timedelta(seconds=terms.rate_window_seconds)
        wait = nxt - t
        retry = wait.days * 86_400 + wait.seconds + (1 if wait.microseconds else 0)
        return Deny(
            DenyReason.RATE_LIMITED,
            f"{in_window} of {terms.rate_units} units used in this {terms.rate_window_seconds} s "
            f"window; retry after {retry} s",
            retry_after=retry,
        )
    return Allow(units=request.units, window_start=start)


@dataclass(frozen=True)
class Reservation:
    """Units reserved at ``time`` in the rate window starting at ``window_start``."""

    units: int
    time: datetime
    window_start: datetime


def reserve(usage: UsageState, units: int, now: datetime, *, terms: Terms) -> tuple[UsageState, Reservation]:
    """Reserve ``units`` (after an :class:`Allow`); returns the new state and the reservation.

    Does not re-decide: call :func:`decide` first. Raises ``ValueError`` for ``units < 1``.
    """
    _nonneg("units", units, 1)
    t = require_utc(now, "now")
    start = _window_start(terms, t)
    new = replace(
        usage,
        reserved_units=usage.reserved_units + units,
        window_units=_window_units(terms, usage, start) + units,
        window_start=start,
    )
    return new, Reservation(units=units, time=t, window_start=start)


def _check_reservation(usage: UsageState, reservation: Reservation) -> None:
    if not isinstance(reservation, Reservation):
        raise TypeError(f"reservation: expected Reservation, got {describe(reservation)}")
    if reservation.units > usage.reserved_units:
        raise UsageError(
            f"reservation of {reservation.units} units: expected at most the {usage.reserved_units} units reserved"
        )


def commit(usage: UsageState, reservation: Reservation) -> UsageState:
    """The reserved units were used: move them from reserved to used (window unchanged)."""
    _check_reservation(usage, reservation)
    return replace(
        usage,
        reserved_units=usage.reserved_units - reservation.units,
        used_units=usage.used_units + reservation.units,
    )


def release(usage: UsageState, reservation: Reservation, *, keep_rate: bool = False) -> UsageState:
    """The use failed: give the reserved units back to the quota, and to the rate window if it is
    still the current one, unless ``keep_rate`` (the attempt still counts against the rate: the
    marketplace's choice, so failed submissions cannot probe for free; the quota is given back)."""
    _check_reservation(usage, reservation)
    window = usage.window_units
    if usage.window_start == reservation.window_start and not keep_rate:
        window = max(window - reservation.units, 0)
    return replace(usage, reserved_units=usage.reserved_units - reservation.units, window_units=window)
