"""The participant's side (inside ``som agent --federation ID --data FILE.csv``).

The data file is read here and never sent: each round the agent receives the coordinator's
Flower message, runs the ClientApp (local training; SecAgg+ masking; client-side DP) and posts
only the reply. Stops when the federation is no longer open or running.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from marketplace.federated import apps
from marketplace.federated.recipe import Recipe, Terms

__all__ = ["run"]

log = logging.getLogger("som.federated")
ACTIVE = ("open", "running")


def run(
    client: Any,
    fed_id: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    stop: threading.Event | None = None,
    wait: float = 20.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Join (declaring ``len(y)`` samples) and serve the coordinator until the run ends; the
    federation's final status. ``client`` is a :class:`marketplace.sdk.SomClient`."""
    me = client.join_federation(fed_id, samples=int(len(y)))
    fed = client.federation(fed_id)
    recipe = Recipe.from_dict(fed["recipe"])
    terms = Terms.from_dict(fed["terms"])
    app = apps.client_app(x, y, recipe, delta=terms.delta, seed=seed)
    ctx = Context(run_id=0, node_id=int(me["node_id"]), node_config={}, state=RecordDict(), run_config={})
    stop = stop or threading.Event()
    answered = 0
    while not stop.is_set():
        data, status = client.federation_next(fed_id, wait=wait)
        if data is None:
            if status not in ACTIVE:
                break
            continue
        msg = message_from_proto(ProtoMessage.FromString(data))
        try:
            reply = app(msg, ctx)
        except Exception as e:  # what a Flower SuperNode does: answer with an Error, keep serving
            log.warning("federation %s: the ClientApp failed: %s", fed_id, e)
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=type(e).__name__), reply_to=msg)
        client.federation_reply(fed_id, message_to_proto(reply).SerializeToString())
        answered += 1
    out = dict(client.federation(fed_id))
    out["answered"] = answered
    return out
