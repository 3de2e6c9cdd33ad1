"""The Flower apps: the coordinator's ServerApp (FedAvg, optionally SecAgg+) and the ClientApp.

The coordinator runs one Flower round per :func:`run_round` call (so the marketplace charges the
privacy budget and writes the ledger between rounds); the grid it is given decides where the
messages go (:mod:`marketplace.federated.transport` for the marketplace's HTTP mailbox, Flower's
in-process links in the bench's simulation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Context, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import LocalDpMod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_PARAMS_RECORD
from flwr.serverapp import Grid, ServerApp

from marketplace.federated import learning
from marketplace.federated.privacy import flower_epsilon
from marketplace.federated.recipe import Recipe

__all__ = ["RoundOutcome", "client_app", "run_round"]

FULL_GRAPH = 10
logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every stage at INFO


@dataclass
class RoundOutcome:
    params: list[np.ndarray]
    participants: int  # replies aggregated (after dropouts)
    failures: int
    accuracy: float | None  # the global model on the participants' data (federated evaluation)


class _Client(NumPyClient):
    def __init__(self, x: np.ndarray, y: np.ndarray, recipe: Recipe, seed: int) -> None:
        self.x, self.y, self.recipe, self.seed = x, y, recipe, seed

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        r = self.recipe
        rnd = int(config.get("round", 0))
        new = learning.train(
            parameters, self.x, self.y, epochs=r.local_epochs, lr=r.lr, batch=r.batch, seed=self.seed + rnd
        )
        return new, len(self.y), {}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        acc = learning.accuracy(parameters, self.x, self.y)
        return 1.0 - acc, len(self.y), {"accuracy": acc}


def client_app(x: np.ndarray, y: np.ndarray, recipe: Recipe, *, delta: float = 1e-5, seed: int = 0) -> ClientApp:
    """The participant's ClientApp: local training on standardised ``x``; SecAgg+ masking and
    client-side DP (clip to ``recipe.clipping``, Gaussian noise ``z * clipping``) as mods."""
    mean = np.asarray(recipe.mean or [0.0] * recipe.dim)
    scale = np.asarray(recipe.scale or [1.0] * recipe.dim)
    xs = (x - mean) / scale

    def client_fn(context: Context) -> Any:
        return _Client(xs, y, recipe, seed).to_client()

    mods: list[Any] = []
    if recipe.secure_aggregation:
        mods.append(secaggplus_mod)
    if recipe.noise_multiplier > 0:
        eps = flower_epsilon(recipe.noise_multiplier, delta)
        mods.append(LocalDpMod(recipe.clipping, recipe.clipping, eps, delta))
    return ClientApp(client_fn=client_fn, mods=mods)


def _strategy(recipe: Recipe, params: Sequence[np.ndarray], rnd: int, n_nodes: int) -> FedAvg:
    def fit_config(_: int) -> dict[str, Scalar]:
        return {"round": rnd}

    return FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=recipe.min_participants,
        min_evaluate_clients=1,
        evaluate_metrics_aggregation_fn=_weighted_accuracy,
        min_available_clients=min(recipe.min_participants, max(n_nodes, 1)),
        initial_parameters=ndarrays_to_parameters(list(params)),
        on_fit_config_fn=fit_config,
        accept_failures=True,
        fit_metrics_aggregation_fn=_no_metrics,
    )


def _weighted_accuracy(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    n = sum(k for k, _ in results)
    return {"accuracy": sum(k * float(m.get("accuracy", 0.0)) for k, m in results) / n} if n else {}


def _no_metrics(_: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    return {}  # with SecAgg+ there are no per-participant metrics to aggregate


def run_round(grid: Grid, recipe: Recipe, params: Sequence[np.ndarray], rnd: int, n_nodes: int) -> RoundOutcome:
    """One FedAvg round over ``grid`` (SecAgg+ when the recipe asks); the new global parameters.

    With SecAgg+ the round survives dropouts down to ``recipe.min_participants`` (the Shamir
    reconstruction threshold); below it Flower aborts the round and the parameters are unchanged."""
    strategy = _strategy(recipe, params, rnd, n_nodes)
    if hasattr(grid, "current_round"):
        grid.current_round = rnd
    if recipe.secure_aggregation:
        # up to FULL_GRAPH nodes every node shares with all (the threshold is then the minimum of
        # participants); above, each node shares with ~FULL_GRAPH neighbours (SecAgg+'s sparse graph)
        # and a node's secrets need 2/3 of its neighbours' shares
        if n_nodes <= FULL_GRAPH:
            shares: float = 1.0
            threshold = recipe.min_participants
        else:
            shares = FULL_GRAPH / n_nodes
            threshold = min(recipe.min_participants, max(2, (2 * FULL_GRAPH) // 3))
        fit = SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            timeout=recipe.round_timeout,
            clipping_range=max(8.0, recipe.clipping),
        )
        workflow = DefaultWorkflow(fit_workflow=fit)
    else:
        workflow = DefaultWorkflow()
    app = ServerApp()
    result: dict[str, float | None] = {}

    @app.main()
    def main(g: Grid, context: Context) -> None:
        legacy = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
        workflow(g, legacy)
        acc = legacy.history.metrics_distributed.get("accuracy")
        result["accuracy"] = float(acc[-1][1]) if acc else None
        context.state.array_records[MAIN_PARAMS_RECORD] = legacy.state.array_records[MAIN_PARAMS_RECORD]

    ctx = Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    app(grid, ctx)
    arr = ctx.state.array_records[MAIN_PARAMS_RECORD]
    new = parameters_to_ndarrays(compat.arrayrecord_to_parameters(arr, keep_input=True))
    stats = getattr(grid, "last_round_stats", {})
    return RoundOutcome(
        params=[np.asarray(a, dtype=np.float64) for a in new],
        participants=int(stats.get("replied", 0)),
        failures=int(stats.get("failed", 0)),
        accuracy=result.get("accuracy"),
    )
