"""Reserve -> compute -> commit or release, as one ``with`` block (:func:`reserved`).

For: the metered paths (HE inference, the gateway): a block that raises before
:meth:`Use.commit` releases its units; a replayed key yields the first answer and charges nothing.
Not for: the reservation itself (:mod:`marketplace.services.metering.reserve`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from marketplace.errors import MarketplaceError
from marketplace.runtime import Runtime
from marketplace.services.identity import Principal
from marketplace.services.metering.idempotency import (
    StoredResult,
)
from marketplace.services.metering.reserve import Charged, Reservation, begin, commit, release

__all__ = ["Use", "reserved"]


class Use:
    """One reserved use inside :func:`reserved`: ``replay`` (the first answer, when the key was
    already charged: return it, do not compute) or :meth:`commit` once the result is there."""

    def __init__(self, rt: Runtime, reservation: Reservation) -> None:
        self.rt = rt
        self.reservation = reservation
        self.charged: Charged | None = None

    @property
    def replay(self) -> StoredResult | None:
        return self.reservation.replay

    def commit(self, result: bytes, *, media_type: str, now: datetime | None = None) -> Charged:
        """Charge the use (:func:`commit`); after this an exception no longer releases it."""
        self.charged = commit(self.rt, self.reservation, result=result, media_type=media_type, now=now)
        return self.charged


@contextmanager
def reserved(rt: Runtime, p: Principal, **begin_args: Any) -> Iterator[Use]:
    """Reserve (:func:`begin` with ``begin_args``), run the block, and release the units if it
    raises before :meth:`Use.commit` (the reason: the error's message, or its type's name). A
    block that neither commits nor raises leaves the reservation to its lease."""
    use = Use(rt, begin(rt, p, **begin_args))
    try:
        yield use
    except BaseException as e:
        if use.charged is None:
            reason = e.message if isinstance(e, MarketplaceError) else type(e).__name__
            release(rt, use.reservation, reason=str(reason)[:200])
        raise
