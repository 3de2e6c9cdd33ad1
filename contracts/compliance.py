"""Offline compliance: does a ledger's history respect every contract in it?

For: ``som ledger verify`` and anyone holding an exported ledger. :func:`check_records` walks the
leaves in ledger order, once, keeping only per-contract counters, and stops at the first leaf
that breaks a rule with :class:`contracts.errors.ComplianceViolation` (``index``, ``message``).
:func:`check_leaves` does the same from the leaves' bytes, and :class:`ComplianceWalk` is the
same walk fed one leaf at a time (so that one pass over an export can also hash each leaf for
the Merkle tree: ``som ledger verify``).
Not for: Merkle roots, inclusion or consistency proofs, checkpoint signatures (``crypto`` does
those, over the same leaves), nor online decisions (:mod:`contracts.policy`).

Rules, per leaf:

* every leaf matches its schema (:mod:`contracts.records`);
* ``som.contract/v1``: both signatures verify, the acceptance binds the offer, ``contract_id`` is
  the one derived from the acceptance, and no contract appears twice;
* ``som.contract-event/v1``: the contract is known, and the event follows its chain, is signed by
  the party entitled to it and is a transition the state allows (:func:`contracts.offer.advance`);
* ``som.usage/v1``: the contract is known; offering and orgs match it; ``usage_id`` is new; at
  the leaf's ``time``, given the events seen so far that took effect by then, the contract is
  neither suspended nor terminated, ``time`` lies in the validity window of the terms in effect
  and not before the acceptance, the mode is allowed, unit price and currency are the agreed ones;
  a charged leaf's amount is ``units * unit_price_minor``, keeps the contract's cumulative charged
  units within the quota and its rate window's charged units within the rate (fixed windows
  anchored at ``valid_from``, as in :mod:`contracts.policy`); a released leaf's amount is 0;
* ``som.job-approval/v1``: the contract is known. ``som.audit/v1``: schema only.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from contracts.errors import ChainError, ComplianceViolation, ContractError
from contracts.offer import (
    ChainState,
    Contract,
    ContractEvent,
    Status,
    advance,
    initial_state,
    verify_contract,
)
from contracts.records import (
    CONTRACT_EVENT_SCHEMA,
    CONTRACT_SCHEMA,
    JOB_APPROVAL_SCHEMA,
    USAGE_SCHEMA,
    parse_record,
    validate_record,
)
from contracts.terms import Terms
from crypto.errors import InvalidSignature

__all__ = ["ComplianceSummary", "ComplianceWalk", "ContractTotals", "check_leaves", "check_records"]


@dataclass(frozen=True)
class ContractTotals:
    """What one contract's usage leaves add up to."""

    contract_id: str
    currency: str
    charged_units: int
    amount_minor: int
    usage_records: int
    released_records: int
    events: int


@dataclass(frozen=True)
class ComplianceSummary:
    """Result of a clean walk: leaf count, leaves per schema, totals per contract."""

    leaves: int
    per_schema: Mapping[str, int]
    contracts: Mapping[str, ContractTotals]

    def to_dict(self) -> dict[str, Any]:
        return {
            "leaves": self.leaves,
            "per_schema": dict(sorted(self.per_schema.items())),
            "contracts": {
                cid: {
                    "currency": t.currency,
                    "charged_units": t.charged_units,
                    "amount_minor": t.amount_minor,
                    "usage_records": t.usage_records,
                    "released_records": t.released_records,
                    "events": t.events,
                }
                for cid, t in sorted(self.contracts.items())
            },
        }


class _Phase:
    """The contract's lifecycle status and terms from ``start`` on (until the next event)."""

    __slots__ = ("start", "status", "terms", "vf", "vu", "window", "modes")

    def __init__(self, start: datetime, status: Status, terms: Terms) -> None:
        self.start = start
        self.status = status
        self.terms = terms
        self.vf = terms.valid_from
        self.vu = terms.valid_until
        self.window = timedelta(seconds=terms.rate_window_seconds)
        self.modes = terms.modes


class _Book:
    """Mutable per-contract counters (internal to one walk)."""

    __slots__ = (
        "contract",
        "chain",
        "phases",
        "starts",
        "charged",
        "amount",
        "records",
        "released",
        "events",
        "windows",
        "offering_id",
        "consumer_org",
        "provider_org",
    )

    def __init__(self, contract: Contract) -> None:
        self.contract = contract
        self.chain: ChainState = initial_state(contract)
        first = _Phase(self.chain.time, Status.ACTIVE, contract.terms)
        self.phases = [first]
        self.starts = [first.start]
        self.charged = 0
        self.amount = 0
        self.records = 0
        self.released = 0
        self.events = 0
        self.windows: dict[tuple[datetime, timedelta, int], int] = {}
        self.offering_id = contract.offer.offering_id
        self.consumer_org = contract.acceptance.consumer_org
        self.provider_org = contract.offer.provider_org

    def phase_at(self, t: datetime) -> _Phase | None:
        if t >= self.starts[-1]:
            return self.phases[-1]
        i = bisect_right(self.starts, t)
        return self.phases[i - 1] if i else None


class ComplianceWalk:
    """The compliance walk fed one leaf at a time, in ledger order (rules: module docstring).

    :meth:`add_leaf` takes a leaf's bytes (parsed strictly by :func:`contracts.records.parse_record`),
    :meth:`add_record` an already decoded leaf (validated here); both raise
    :class:`ComplianceViolation` naming the leaf. After a violation the walk is spent: stop
    feeding it. :meth:`summary` gives the totals so far. Memory grows with contracts, usage ids
    and rate windows, not with leaves.
    """

    __slots__ = ("_books", "_per_schema", "_seen_usage", "_n")

    def __init__(self) -> None:
        self._books: dict[str, _Book] = {}
        self._per_schema: Counter[str] = Counter()
        self._seen_usage: set[str] = set()
        self._n = 0

    def add_leaf(self, index: int, data: bytes) -> None:
        """Check the leaf at ``index`` from its exact bytes."""
        try:
            leaf = parse_record(data)
        except (ValueError, TypeError) as e:
            raise ComplianceViolation(index, str(e)) from e
        self._check(index, leaf)

    def add_record(self, index: int, leaf: dict[str, Any]) -> None:
        """Check the leaf at ``index``, given decoded (its schema is validated here)."""
        try:
            validate_record(leaf)
        except (ContractError, ValueError, TypeError) as e:
            raise ComplianceViolation(index, str(e)) from e
        self._check(index, leaf)

    def _check(self, index: int, leaf: Mapping[str, Any]) -> None:
        # ``leaf`` passed validate_record: every field below exists and has its type.
        self._n += 1
        schema = leaf["schema"]
        self._per_schema[schema] += 1
        books = self._books
        if schema == USAGE_SCHEMA:
            try:
                t = _fromiso(leaf["time"])
            except ValueError as e:  # matches TIME_RE, yet not a date (e.g. month 13)
                raise ComplianceViolation(index, f"time: not a valid date/time: {e}") from e
            _check_usage(index, leaf, books, self._seen_usage, t)
        elif schema == CONTRACT_SCHEMA:
            _check_contract(index, leaf, books)
        elif schema == CONTRACT_EVENT_SCHEMA:
            _check_event(index, leaf, books)
        elif schema == JOB_APPROVAL_SCHEMA and leaf["contract_id"] not in books:
            raise ComplianceViolation(index, f"job approval for unknown contract {leaf['contract_id']}")

    def summary(self) -> ComplianceSummary:
        totals = {
            cid: ContractTotals(
                contract_id=cid,
                currency=b.contract.terms.currency,
                charged_units=b.charged,
                amount_minor=b.amount,
                usage_records=b.records,
                released_records=b.released,
                events=b.events,
            )
            for cid, b in self._books.items()
        }
        return ComplianceSummary(leaves=self._n, per_schema=dict(self._per_schema), contracts=totals)


_fromiso = datetime.fromisoformat


def check_records(records: Iterable[tuple[int, dict[str, Any]]]) -> ComplianceSummary:
    """Check ``(index, leaf)`` pairs in ledger order; see the module docstring for the rules.

    Returns a :class:`ComplianceSummary`; raises :class:`ComplianceViolation` at the first bad
    leaf. Streaming: memory grows with contracts, usage ids and rate windows, not with leaves.
    """
    walk = ComplianceWalk()
    add = walk.add_record
    for index, leaf in records:
        add(index, leaf)
    return walk.summary()


def check_leaves(leaves: Iterable[tuple[int, bytes]]) -> ComplianceSummary:
    """:func:`check_records` over ``(index, leaf bytes)`` pairs, each parsed (and validated)
    once by :func:`contracts.records.parse_record`; a leaf that does not parse is a violation."""
    walk = ComplianceWalk()
    add = walk.add_leaf
    for index, data in leaves:
        add(index, data)
    return walk.summary()


def _check_contract(index: int, leaf: Mapping[str, Any], books: dict[str, _Book]) -> None:
    contract = Contract.from_dict(leaf["contract"])
    try:
        verify_contract(contract)
    except InvalidSignature as e:
        raise ComplianceViolation(index, "contract signatures do not verify") from e
    cid = contract.contract_id
    if leaf["contract_id"] != cid:
        raise ComplianceViolation(
            index,
            f"contract_id: expected {cid} (derived from the acceptance), got {leaf['contract_id']}",
        )
    if cid in books:
        raise ComplianceViolation(index, f"contract {cid} appears twice")
    books[cid] = _Book(contract)


def _check_event(index: int, leaf: Mapping[str, Any], books: dict[str, _Book]) -> None:
    event = ContractEvent.from_dict(leaf["event"])
    cid = leaf["contract_id"]
    book = books.get(cid)
    if book is None:
        raise ComplianceViolation(index, f"event for unknown contract {cid}")
    if event.contract_id != cid:
        raise ComplianceViolation(index, f"event contract_id: expected {cid} (the leaf's), got {event.contract_id}")
    try:
        book.chain = advance(book.contract, book.chain, event)
    except InvalidSignature as e:
        raise ComplianceViolation(index, f"event {event.seq} signatures do not verify") from e
    except ChainError as e:
        raise ComplianceViolation(index, str(e)) from e
    phase = _Phase(event.time, book.chain.status, book.chain.terms)
    book.phases.append(phase)
    book.starts.append(phase.start)
    book.events += 1


def _check_usage(
    index: int,
    leaf: Mapping[str, Any],
    books: dict[str, _Book],
    seen: set[str],
    t: datetime,
) -> None:
    cid = leaf["contract_id"]
    book = books.get(cid)
    if book is None:
        raise ComplianceViolation(index, f"usage for unknown contract {cid}")
    uid = leaf["usage_id"]
    if uid in seen:
        raise ComplianceViolation(index, f"usage_id {uid} appears twice")
    seen.add(uid)
    if (leaf["offering_id"], leaf["consumer_org"], leaf["provider_org"]) != (
        book.offering_id,
        book.consumer_org,
        book.provider_org,
    ):
        raise ComplianceViolation(
            index,
            f"offering/orgs: expected {(book.offering_id, book.consumer_org, book.provider_org)}, "
            f"got {(leaf['offering_id'], leaf['consumer_org'], leaf['provider_org'])}",
        )
    phase = book.phase_at(t)
    if phase is None:
        raise ComplianceViolation(index, f"usage at {leaf['time']} before the contract was accepted")
    if phase.status is not Status.ACTIVE:
        raise ComplianceViolation(index, f"usage at {leaf['time']} while the contract is {phase.status.value}")
    if not phase.vf <= t < phase.vu:
        raise ComplianceViolation(index, f"usage at {leaf['time']} outside validity [{phase.vf}, {phase.vu})")
    mode = leaf["mode"]
    if mode not in phase.modes:
        raise ComplianceViolation(index, f"mode {mode!r} not allowed; allowed {sorted(phase.modes)}")
    terms = phase.terms
    price = leaf["unit_price_minor"]
    if price != terms.unit_price_minor or leaf["currency"] != terms.currency:
        raise ComplianceViolation(
            index,
            f"price: expected {terms.unit_price_minor} {terms.currency}, got {price} {leaf['currency']}",
        )
    units = leaf["units"]
    amount = leaf["amount_minor"]
    book.records += 1
    if leaf["outcome"] != "charged":
        if amount != 0:
            raise ComplianceViolation(index, f"released usage: expected amount_minor 0, got {amount}")
        book.released += 1
        return
    if amount != units * price:
        raise ComplianceViolation(index, f"amount_minor: expected {units} * {price} = {units * price}, got {amount}")
    charged = book.charged + units
    if charged > terms.quota_units:
        raise ComplianceViolation(
            index,
            f"quota: {charged} units charged in total, beyond the quota of {terms.quota_units}",
        )
    key = (phase.vf, phase.window, (t - phase.vf) // phase.window)
    in_window = book.windows.get(key, 0) + units
    if in_window > terms.rate_units:
        raise ComplianceViolation(
            index,
            f"rate: {in_window} units charged in window {key[2]}, beyond {terms.rate_units} per "
            f"{terms.rate_window_seconds} s",
        )
    book.windows[key] = in_window
    book.charged = charged
    book.amount += amount
