"""What the gateway keeps between calls: the offering -> version -> artifact cache and the micro-batcher.

For: :class:`TargetCache` (cleared on local writes to offerings and versions, and after
``SOM_GATEWAY_CACHE_SECONDS`` otherwise) and :class:`Batcher` (stacks concurrent calls on one
version into one model run within ``SOM_GATEWAY_BATCH_WINDOW_MS``). Not for: metering or
answering (:mod:`marketplace.services.gateway`).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from sqlalchemy import event, select

from marketplace.compute.gateway import (
    GatewayAnswer,
)
from marketplace.db.models import Artifact, Offering, OfferingVersion
from marketplace.errors import NotFound
from marketplace.runtime import Runtime

__all__ = ["Batcher", "Target", "TargetCache"]


@dataclass(frozen=True)
class Target:
    """What a gateway call needs to know about an offering (no contract state)."""

    offering_id: str
    org_id: str
    status: str
    hosting: str
    version_id: str | None = None
    version: int | None = None
    fmt: str = ""
    input_dim: int | None = None
    artifact: tuple[str, str, bytes, str] | None = None  # id, blob, wrapped key, aad


_caches: weakref.WeakSet[TargetCache] = weakref.WeakSet()


class TargetCache:
    """``offering_id -> Target`` for ``ttl`` seconds; invalidated by local writes."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._lock = threading.Lock()
        self._items: dict[str, tuple[float, Target]] = {}
        _caches.add(self)

    def invalidate(self, offering_id: str | None = None) -> None:
        with self._lock:
            if offering_id is None:
                self._items.clear()
            else:
                self._items.pop(offering_id, None)

    def get(self, rt: Runtime, offering_id: str) -> Target:
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(offering_id)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        t = _load_target(rt, offering_id)
        with self._lock:
            if len(self._items) > 10_000:
                self._items.clear()
            self._items[offering_id] = (now, t)
        return t


def _load_target(rt: Runtime, offering_id: str) -> Target:
    with rt.tx() as s:
        off = s.get(Offering, offering_id)
        if off is None:
            raise NotFound(f"offering {offering_id} not found")
        base = Target(offering_id=off.id, org_id=off.org_id, status=off.status, hosting=off.hosting)
        if off.hosting != "marketplace":
            return base
        v = s.scalar(
            select(OfferingVersion)
            .where(OfferingVersion.offering_id == off.id)
            .order_by(OfferingVersion.number.desc())
            .limit(1)
        )
        if v is None:
            return base
        art = s.scalar(
            select(Artifact)
            .where(Artifact.version_id == v.id, Artifact.purpose == "model")
            .order_by(Artifact.created_at.desc(), Artifact.id.desc())
            .limit(1)
        )
        return Target(
            offering_id=off.id,
            org_id=off.org_id,
            status=off.status,
            hosting=off.hosting,
            version_id=v.id,
            version=v.number,
            fmt=v.format,
            input_dim=int(v.input_shape[0]) if v.input_shape else None,
            artifact=(art.id, art.blob, bytes(art.wrapped_key), art.aad) if art is not None else None,
        )


def _invalidate_all(offering_id: str | None) -> None:
    for c in list(_caches):
        c.invalidate(offering_id)


@event.listens_for(Offering, "after_insert")
@event.listens_for(Offering, "after_update")
@event.listens_for(Offering, "after_delete")
def _offering_written(_mapper: Any, _conn: Any, target: Offering) -> None:
    _invalidate_all(target.id)


@event.listens_for(OfferingVersion, "after_insert")
@event.listens_for(OfferingVersion, "after_update")
@event.listens_for(OfferingVersion, "after_delete")
def _version_written(_mapper: Any, _conn: Any, target: OfferingVersion) -> None:
    _invalidate_all(target.offering_id)


# ---------------------------------------------------------------- micro-batching


@dataclass
class _Batch:
    items: list[tuple[np.ndarray, Future[tuple[np.ndarray, GatewayAnswer]]]] = field(default_factory=list)
    rows: int = 0


class Batcher:
    """Stacks concurrent calls on one version arriving within ``window`` seconds into one run.

    The first call of a batch (its leader) waits ``window`` s, runs the stacked rows once and
    hands every call its own slice; a batch is closed early at ``max_rows`` rows."""

    def __init__(self, window: float, max_rows: int) -> None:
        self.window = window
        self.max_rows = max_rows
        self._lock = threading.Lock()
        self._open: dict[str, _Batch] = {}
        self.runs = 0  # model runs made (fewer than calls when calls were stacked)

    def run(
        self, key: str, rows: np.ndarray, fn: Callable[[np.ndarray], GatewayAnswer]
    ) -> tuple[np.ndarray, GatewayAnswer]:
        fut: Future[tuple[np.ndarray, GatewayAnswer]] = Future()
        n = int(rows.shape[0])
        with self._lock:
            b = self._open.get(key)
            leader = b is None or b.rows + n > self.max_rows
            if leader:
                b = self._open[key] = _Batch()
            assert b is not None
            b.items.append((rows, fut))
            b.rows += n
        if leader:
            time.sleep(self.window)
            with self._lock:
                if self._open.get(key) is b:
                    del self._open[key]
                items = list(b.items)
                self.runs += 1
            try:
                ans = fn(np.vstack([r for r, _ in items]) if len(items) > 1 else items[0][0])
            except BaseException as e:
                for _, f in items:
                    f.set_exception(e)
            else:
                off = 0
                for i, (r, f) in enumerate(items):  # a load is reported (and audited) once
                    f.set_result((ans.outputs[off : off + r.shape[0]], ans if i == 0 else replace(ans, loaded=False)))
                    off += r.shape[0]
        return fut.result()


# ---------------------------------------------------------------- the call
