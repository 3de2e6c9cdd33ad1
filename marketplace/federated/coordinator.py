"""The coordinator: runs a federation's rounds in a marketplace thread over its mailbox.

Per round: charge the privacy budget (refused -> ``budget_exhausted``), wait for at least the
threshold of participants to be polling, run one Flower round (:func:`apps.run_round`) over the
:class:`MailboxGrid`, then write one ledger leaf per contribution. After the last round the
model becomes a new version of the offering (validated, envelope-encrypted, with lineage).
"""

from __future__ import annotations

import io
import logging
import threading
import time
import weakref
from typing import Any

import numpy as np
from sqlalchemy import select

from marketplace.db.models import Artifact
from marketplace.db.models_federated import Federation
from marketplace.federated import apps, learning
from marketplace.federated.recipe import Recipe
from marketplace.federated.transport import Mailbox, MailboxGrid
from marketplace.services import catalog, federations

__all__ = ["mailbox_for", "start", "wait_done"]

log = logging.getLogger("som.federated")
ONLINE_SECONDS = 3.0  # a node counts as present while it long-polls, or if it was active this recently
GRACE_SECONDS = 3.0

_lock = threading.Lock()
_mailboxes: weakref.WeakKeyDictionary[Any, dict[str, Mailbox]] = weakref.WeakKeyDictionary()
_threads: dict[str, threading.Thread] = {}


def mailbox_for(rt: Any, fed_id: str) -> Mailbox:
    with _lock:
        boxes = _mailboxes.setdefault(rt, {})
        box = boxes.get(fed_id)
        if box is None:
            box = boxes[fed_id] = Mailbox()
        return box


def _parent_params(rt: Any, f: Federation, r: Recipe) -> list[np.ndarray]:
    """The parent version's weights in the recipe's standardised feature space (zeros if the
    parent is not a ``dim``-input logistic regression)."""
    with rt.tx() as s:
        art = s.scalar(select(Artifact).where(Artifact.version_id == f.parent_version_id, Artifact.purpose == "model"))
        data = catalog.decrypt_artifact(rt, art) if art is not None else b""
    try:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        w, b = np.asarray(z["layer0.weight"], dtype=np.float64), np.asarray(z["layer0.bias"], dtype=np.float64)
        if w.shape != (1, r.dim) or "layer1.weight" in z.files:
            raise ValueError("not a logistic regression")
    except (ValueError, KeyError, OSError):
        return learning.init_params(r.dim)
    mean, scale = np.asarray(r.mean), np.asarray(r.scale)
    return [w[0] * scale, np.array([float(b[0]) + float(w[0] @ mean)])]


def start(rt: Any, fed_id: str) -> None:
    with _lock:
        t = _threads.get(fed_id)
        if t is not None and t.is_alive():
            return
        t = threading.Thread(target=_run, args=(rt, fed_id), name=f"federation-{fed_id}", daemon=True)
        _threads[fed_id] = t
    t.start()


def wait_done(fed_id: str, timeout: float) -> bool:
    t = _threads.get(fed_id)
    if t is not None:
        t.join(timeout)
        return not t.is_alive()
    return True


def _joined(rt: Any, fed_id: str) -> list[int]:
    with rt.tx() as s:
        return [p.node_id for p in federations.participants(s, fed_id)]


def _nodes(rt: Any, fed_id: str, box: Mailbox) -> list[int]:
    return box.online(_joined(rt, fed_id), ONLINE_SECONDS)


def _run(rt: Any, fed_id: str) -> None:
    box = mailbox_for(rt, fed_id)
    try:
        with rt.tx() as s:
            f = s.get(Federation, fed_id)
            assert f is not None
            f.status = "running"
            r = federations.recipe_of(f)
            first = f.rounds_done + 1
        params = _parent_params(rt, f, r)
        grid = MailboxGrid(
            box, run_id=abs(hash(fed_id)) % (2**62), nodes=lambda: _nodes(rt, fed_id, box), timeout=r.round_timeout
        )
        last: dict[str, Any] = {}
        for rnd in range(first, r.rounds + 1):
            with rt.tx() as s:
                eps = federations.can_run_round(s, fed_id, rnd)
            if eps is None:
                log.info("federation %s: round %d refused (privacy budget)", fed_id, rnd)
                return
            deadline = time.monotonic() + r.round_timeout
            grace = time.monotonic() + GRACE_SECONDS  # wait briefly for every joined node, then for the threshold
            while time.monotonic() < deadline:
                online = len(_nodes(rt, fed_id, box))
                if online >= len(_joined(rt, fed_id)) or (online >= r.min_participants and time.monotonic() > grace):
                    break
                time.sleep(0.02)
            n = len(_nodes(rt, fed_id, box))
            if n < r.min_participants:
                with rt.tx() as s:
                    federations.fail(
                        s, fed_id, "failed", f"round {rnd}: {n} participants online < {r.min_participants}"
                    )
                return
            t0 = time.monotonic()
            out = apps.run_round(grid, r, params, rnd, n)
            contributions = box.finish_round(rnd)
            if len(contributions) < r.min_participants:
                with rt.tx() as s:
                    federations.fail(s, fed_id, "failed", f"round {rnd}: fewer than {r.min_participants} updates")
                return
            params = out.params
            last = {
                "accuracy": out.accuracy,
                "participants": len(contributions),
                "seconds": round(time.monotonic() - t0, 4),
            }
            with rt.tx() as s:
                federations.record_round(s, fed_id, rnd, contributions, epsilon=eps, metrics=last)
        with rt.tx() as s:
            federations.complete(rt, s, fed_id, params, last)
    except Exception as e:  # the thread must record why it stopped
        log.exception("federation %s failed", fed_id)
        with rt.tx() as s:
            federations.fail(s, fed_id, "failed", f"{type(e).__name__}: {e}")
    finally:
        box.close()
