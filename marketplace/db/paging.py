"""One page of a query: SQL ``LIMIT``/``OFFSET`` plus the ``COUNT`` of the whole result.

For: every listing of the API (``PageOf`` in :mod:`marketplace.api.schemas` is the wire shape;
``Page`` in :mod:`marketplace.api.deps` the query parameters). The statement must be ordered (a
page of an unordered query is not stable). Not for: streaming exports (the ledger's
``iter_leaves``), or filtering that only Python can do (filter in SQL, then page).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

__all__ = ["Window", "page_rows", "page_scalars"]

T = TypeVar("T")


class Window(Protocol):
    """Which page: at most ``limit`` items after skipping ``offset``."""

    @property
    def limit(self) -> int: ...

    @property
    def offset(self) -> int: ...


def _total(s: Session, stmt: Select[Any]) -> int:
    return int(s.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0)


def page_scalars(s: Session, stmt: Select[T], page: Window) -> tuple[list[T], int]:
    """The ORM objects of one page of ``stmt`` (one entity selected), and the total count."""
    rows = list(s.scalars(stmt.limit(page.limit).offset(page.offset)))
    return rows, _total(s, stmt)


def page_rows(s: Session, stmt: Select[Any], page: Window) -> tuple[Sequence[Row[Any]], int]:
    """The rows of one page of ``stmt`` (Core columns), and the total count."""
    rows = s.execute(stmt.limit(page.limit).offset(page.offset)).all()
    return rows, _total(s, stmt)
