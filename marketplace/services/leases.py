"""Leases: work handed to one compute site at a time, for a while, and taken back when it goes quiet.

For: every table of leasable work (:class:`~marketplace.db.models_jobs.Leased`: jobs and agent
tasks). One mechanism takes the oldest queued row (:func:`take`), extends the leases a holder
still has (:func:`extend`, the agents' heartbeat and the local workers' keeper) and reaps the
leases that ran out (:func:`reap`); plus the in-process wake-ups (:func:`notify`) that waiters on
work and on results sleep on. The record, per leased row::

    +--------------+------------------+-----------------------------------------------+
    | column       | while queued     | while held (status == table.HELD)             |
    +--------------+------------------+-----------------------------------------------+
    | status       | table.QUEUED     | table.HELD                                    |
    | lease_owner  | None             | the holder (agent id, or worker:<pid>:<n>)    |
    | lease_expires| None             | now + lease seconds, pushed on by extend()    |
    | attempts     | leases taken     | leases taken, this one included               |
    +--------------+------------------+-----------------------------------------------+

Invariants:

- **One holder at a time.** A row is taken only while queued, in the taker's transaction (with
  ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two replicas never take the same row); a lease is
  extended only for the owner it names and only while the row is held.
- **An expired lease is reaped once.** :func:`reap` clears the owner in the transaction that
  requeues (or gives up on) the row, and locks the rows it reaps (skipping locked ones on
  PostgreSQL), so a second reaper, or the same one a second later, no longer sees it; after ``max_attempts``
  leases the row is handed to its table's give-up instead.
- **A lost lease's work is abandoned.** :func:`extend` answers the ids the caller no longer holds;
  the holder must drop them (compute nothing more, post nothing): its results are refused or
  discarded by the table's own state machine.

Status changes go through the table's own transition function (``move``): this module knows the
lease columns and the two states named on the table, not what a status means.

Not for: what the work is or how it ends (:mod:`marketplace.services.jobs`,
:mod:`marketplace.services.dispatch`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, select, update
from sqlalchemy.orm import Session

from marketplace.db.models_jobs import AgentTask, Job, Leased
from marketplace.runtime import Runtime

__all__ = ["Bell", "TABLES", "bell", "extend", "grant", "notify", "queued", "reap", "take"]

T = TypeVar("T", bound=Leased)
Move = Callable[[Any, str], None]
"""A table's one status-changing function: ``move(row, status)``."""

TABLES: tuple[type[Leased], ...] = (AgentTask, Job)
"""Every table of leasable work (a heartbeat's ``holding`` ids are looked up in each)."""


# -- taking, extending, reaping ------------------------------------------------------------------


def queued(s: Session, table: type[T], *where: ColumnElement[bool]) -> Select[T]:
    """The oldest queued row of ``table`` matching ``where``, locked (skipping locked rows) on
    PostgreSQL so that concurrent takers pass each other by."""
    cols: Any = table
    return _locked(s, select(table).where(cols.status == table.QUEUED, *where).order_by(cols.created_at).limit(1))


def _locked(s: Session, stmt: Select[T]) -> Select[T]:
    """On PostgreSQL, lock the selected rows and skip rows another transaction holds."""
    if s.bind is not None and s.bind.dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def grant(row: T, owner: str, now: datetime, seconds: float, move: Move) -> T:
    """Hand the queued ``row`` to ``owner`` until ``now + seconds`` (one more attempt)."""
    move(row, type(row).HELD)
    row.attempts += 1
    row.lease_owner = owner
    row.lease_expires_at = now + timedelta(seconds=seconds)
    return row


def take(
    s: Session, table: type[T], owner: str, now: datetime, seconds: float, *where: ColumnElement[bool], move: Move
) -> T | None:
    """In ``s``: lease the oldest queued row of ``table`` matching ``where`` to ``owner``, or None."""
    row = s.scalar(queued(s, table, *where))
    return None if row is None else grant(row, owner, now, seconds, move)


def extend(s: Session, owner: str, ids: Iterable[str], until: datetime) -> list[str]:
    """In ``s``: push the leases ``owner`` holds on ``ids`` to ``until``; returns the ids it no
    longer holds (in the order given), which it must abandon."""
    wanted = list(ids)
    if not wanted:
        return []
    held: set[str] = set()
    for table in TABLES:
        cols: Any = table
        mine = set(
            s.scalars(select(cols.id).where(cols.id.in_(wanted), cols.lease_owner == owner, cols.status == table.HELD))
        )
        if mine:
            s.execute(update(table).where(cols.id.in_(mine)).values(lease_expires_at=until))
        held |= mine
    return [i for i in wanted if i not in held]


def reap(
    s: Session,
    table: type[T],
    now: datetime,
    *where: ColumnElement[bool],
    max_attempts: Callable[[T], int],
    move: Move,
    give_up: Callable[[T], None] | None,
) -> list[T]:
    """In ``s``: every held row of ``table`` (matching ``where``) whose lease ran out goes back to
    the queue, or, after ``max_attempts(row)`` leases, to ``give_up(row)`` (a terminal move of the
    table's own; with ``give_up=None`` such rows are left for a reaper that has one). The lease is
    cleared either way. Returns the rows reaped."""
    cols: Any = table
    out: list[T] = []
    stmt = select(table).where(cols.status == table.HELD, cols.lease_expires_at < now, *where)
    for row in s.scalars(_locked(s, stmt)):
        if row.attempts >= max_attempts(row):
            if give_up is None:
                continue
            give_up(row)
        else:
            move(row, table.QUEUED)
        row.lease_owner = row.lease_expires_at = None
        out.append(row)
    return out


# -- in-process wake-ups --------------------------------------------------------------------------


class Bell:
    """A condition variable with a generation counter: waiters wake on any ring."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._gen = 0

    def ring(self) -> None:
        with self._cv:
            self._gen += 1
            self._cv.notify_all()

    def generation(self) -> int:
        with self._cv:
            return self._gen

    def wait(self, gen: int, timeout: float) -> None:
        with self._cv:
            if self._gen == gen:
                self._cv.wait(timeout)


_BELLS_LOCK = threading.Lock()


def bell(rt: Runtime, name: str) -> Bell:
    """The runtime's bell ``name``: ``work`` (work was queued) or ``done`` (a result came)."""
    found = rt.bells.get(name)
    if found is not None:
        return found
    with _BELLS_LOCK:
        return rt.bells.setdefault(name, Bell())


def notify(rt: Runtime, name: str = "work") -> None:
    """Wake waiters: ``work`` (agents and workers waiting for work) or ``done`` (result waiters)."""
    bell(rt, name).ring()
