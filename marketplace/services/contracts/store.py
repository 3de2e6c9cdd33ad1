"""The contracts' stored records: parsed-record caches, row locks, the ledger, clock checks.

For: what :mod:`~marketplace.services.contracts.offers` and
:mod:`~marketplace.services.contracts.lifecycle` share: parsing a stored contract and its terms
once per process, locking a contract row, appending ``som.contract/v1`` and
``som.contract-event/v1`` leaves to the ledger in the caller's transaction (and receipts after
the commit), and refusing signed times too far from the server's clock. Not for: verifying
signatures (:mod:`contracts.offer`), metering (:mod:`marketplace.services.metering`).
"""

from __future__ import annotations

import re
import threading
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from contracts.offer import Contract
from contracts.terms import Terms
from marketplace.db.models_contracts import ContractRow
from marketplace.errors import Invalid
from marketplace.services import ledger

if TYPE_CHECKING:
    from marketplace.runtime import Runtime

__all__ = [
    "CLOCK_SKEW",
    "OFFER_ID_RE",
    "check_time",
    "contract_of",
    "ledger_append",
    "ledger_receipt",
    "lock_contract",
    "terms_of",
]

#: How far a signed record's own time may be from the server's clock.
CLOCK_SKEW = timedelta(minutes=10)
OFFER_ID_RE = re.compile(r"ofr_[A-Za-z0-9_-]{8,60}")


def ledger_append(session: Session, record: dict[str, Any]) -> int:
    """Append ``record`` as a ledger leaf in ``session``'s transaction; its index."""
    return ledger.append(session, record).index


def ledger_receipt(rt: Runtime, index: int | None) -> dict[str, Any]:
    """The ledger's receipt (leaf, inclusion proof, checkpoint) for ``index``; call after commit.
    ``{}`` for a record that has no leaf (``index`` None)."""
    return {} if index is None else ledger.receipt(rt, index)


# -- parsed-record caches (records are immutable once stored) --------------------------------

_cache_lock = threading.Lock()
_contracts: dict[str, Contract] = {}
_terms: dict[tuple[str, int], Terms] = {}
_CACHE_MAX = 4096


def contract_of(row: ContractRow) -> Contract:
    """The signed :class:`Contract` of ``row`` (parsed once per process)."""
    c = _contracts.get(row.id)
    if c is None:
        c = Contract.from_dict(row.record)
        with _cache_lock:
            if len(_contracts) >= _CACHE_MAX:
                _contracts.clear()
            _contracts[row.id] = c
    return c


def terms_of(row: ContractRow) -> Terms:
    """The terms in effect for ``row`` (after amendments), parsed once per (contract, seq)."""
    key = (row.id, row.seq)
    t = _terms.get(key)
    if t is None:
        t = Terms.from_dict(row.terms)
        with _cache_lock:
            if len(_terms) >= _CACHE_MAX:
                _terms.clear()
            _terms[key] = t
    return t


def lock_contract(s: Session, contract_id: str) -> ContractRow | None:
    """Load a contract row and lock it until the end of the transaction.

    PostgreSQL: ``SELECT ... FOR UPDATE``. SQLite: the transaction is ``BEGIN IMMEDIATE`` already
    (one writer at a time), so a plain read is enough.
    """
    stmt = select(ContractRow).where(ContractRow.id == contract_id)
    bind = s.get_bind()
    if bind.dialect.name != "sqlite":
        stmt = stmt.with_for_update()
    return s.scalars(stmt).one_or_none()


def check_time(name: str, t: datetime, now: datetime) -> None:
    if abs(t - now) > CLOCK_SKEW:
        raise Invalid(
            f"{name} {t.isoformat()} is more than {int(CLOCK_SKEW.total_seconds())} s from the "
            f"server's clock {now.isoformat()}; check your clock and sign again"
        )
