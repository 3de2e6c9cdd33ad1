"""The agent's gateway loop: answer plaintext gateway calls for a provider-hosted offering.

For: ``som agent`` (a thread beside the job loop, started once the agent said hello). It keeps
one long-poll open on ``POST /v1/agent/gateway/exchange`` over the agent's keep-alive HTTP
client: each call posts the answers to the previous batch and receives the next requests, so a
busy agent spends one round trip per batch. All requests of a batch are stacked into one ONNX
Runtime run (the same canonical graph the marketplace's workers build,
:func:`marketplace.compute.gateway.session_for_layers`) and split back.

What the agent sees: each request's random id, the offering id and its rows (the consumer's
plaintext inputs), nothing about who sent them. The weights never leave this process.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from marketplace.compute.gateway import LoadedModel, session_for_layers, threads_per_worker
from marketplace.sdk.errors import SomAPIError

__all__ = ["GatewayLoop"]

log = logging.getLogger("som.agent.gateway")


@dataclass(frozen=True)
class _Layer:
    weight: np.ndarray
    bias: np.ndarray
    activation: str


class GatewayLoop:
    """Runs until ``stop`` is set; ``agent`` is the :class:`marketplace.agent.runner.ProviderAgent`."""

    def __init__(self, agent: Any, *, wait: float = 20.0, batch: int = 256) -> None:
        self.agent = agent
        self.wait = wait
        self.batch = batch
        m = agent.model
        self.model: LoadedModel = session_for_layers(
            [_Layer(w, b, act) for w, b, act in m.layers], m.postprocess, threads=threads_per_worker(1)
        )
        self.answered = 0

    def start(self, stop: threading.Event) -> threading.Thread:
        t = threading.Thread(target=self.run, args=(stop,), daemon=True, name="som-agent-gateway")
        t.start()
        return t

    def compute(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers for ``requests``: rows of the wrong width get an ``invalid:`` error."""
        d = self.model.input_dim
        ok: list[tuple[str, np.ndarray]] = []
        out: list[dict[str, Any]] = []
        for r in requests:
            try:
                x = np.asarray(r["rows"], dtype=np.float64)
            except (TypeError, ValueError):
                out.append({"id": r["id"], "error": "invalid: rows are not a numeric matrix"})
                continue
            if x.ndim != 2 or x.shape[1] != d:
                out.append({"id": r["id"], "error": f"invalid: expected rows of {d} columns"})
                continue
            ok.append((str(r["id"]), x))
        if ok:
            t0 = time.perf_counter()
            y = self.model.run(np.vstack([x for _, x in ok]) if len(ok) > 1 else ok[0][1])
            ms = (time.perf_counter() - t0) * 1e3
            at = 0
            for rid, x in ok:
                out.append({"id": rid, "outputs": y[at : at + x.shape[0]].tolist(), "model_ms": ms})
                at += x.shape[0]
        return out

    def run(self, stop: threading.Event) -> None:
        answers: list[dict[str, Any]] = []
        delay = 0.2
        while not stop.is_set():
            aid = self.agent.agent_id
            if aid is None:
                stop.wait(0.05)
                continue
            body = {
                "answers": answers,
                "wait": min(self.wait, self.agent.cfg.lease_wait),
                "max": self.batch,
                "input_dims": {o: self.model.input_dim for o in getattr(self.agent, "offerings", [])},
            }
            self.answered += len(answers)
            answers = []
            try:
                reqs = self.agent.api.gateway_exchange(body, agent_id=aid)
            except httpx.TransportError as e:
                log.warning("gateway exchange failed: %s; retrying", e)
                stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            except SomAPIError as e:
                if e.status in (401, 403):
                    log.error("gateway exchange refused (%s); stopping the gateway loop", e.status)
                    return
                log.warning("gateway exchange answered %s; retrying", e.status)
                stop.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.2
            if reqs:
                answers = self.compute(reqs)
