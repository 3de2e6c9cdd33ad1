"""``som federation create|join|start|status|rounds|receipts``: federated training of an offering.

``create`` (provider) takes the recipe and participant terms as JSON files or inline JSON;
``join`` registers this organisation (an active contract in mode ``federated`` is needed), then
``som agent --federation ID --data FILE.csv`` takes part (the data stays on this machine).
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import json
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, die, emit


def _json_arg(value: str, what: str) -> dict[str, Any]:
    text = Path(value).read_text() if value and not value.lstrip().startswith("{") and Path(value).is_file() else value
    try:
        out = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        die(f"{what}: not JSON ({e})")
    if not isinstance(out, dict):
        die(f"{what}: expected a JSON object")
    return dict(out)


def register(app: typer.Typer) -> None:
    fed = typer.Typer(help="Federated training: improve a shared model without sharing data.", no_args_is_help=True)
    app.add_typer(fed, name="federation")

    @fed.command("create")
    def create(
        ctx: typer.Context,
        offering: str = typer.Option(..., "--offering", help="The offering whose model to improve."),
        recipe: str = typer.Option(
            ...,
            "--recipe",
            help="Recipe JSON (or a file): dim, rounds, local_epochs, lr, clipping, "
            "noise_multiplier, min_participants, secure_aggregation, mean, scale.",
        ),
        terms: str = typer.Option(
            "{}",
            "--terms",
            help="Participant terms JSON (or a file): allowed_orgs, counting, credit_minor_per_unit, epsilon, delta.",
        ),
        name: str = typer.Option("", "--name"),
        parent: str = typer.Option(None, "--parent-version", help="Parent version id (default: the latest)."),
    ) -> None:
        """Open a federation (provider)."""
        out = client(ctx).create_federation(
            offering,
            _json_arg(recipe, "--recipe"),
            terms=_json_arg(terms, "--terms"),
            name=name,
            parent_version_id=parent,
        )
        emit(ctx, {k: out[k] for k in ("id", "offering_id", "status", "parent_version_id")})

    @fed.command("join")
    def join(
        ctx: typer.Context, fed_id: str = typer.Argument(...), samples: int = typer.Option(0, "--samples")
    ) -> None:
        """Join a federation (needs an active contract in mode 'federated')."""
        emit(ctx, client(ctx).join_federation(fed_id, samples=samples))

    @fed.command("start")
    def start(ctx: typer.Context, fed_id: str = typer.Argument(...)) -> None:
        """Start the rounds (provider)."""
        emit(ctx, client(ctx).start_federation(fed_id))

    @fed.command("status")
    def status(ctx: typer.Context, fed_id: str = typer.Argument(...)) -> None:
        """Status, privacy spent, participants, the resulting version."""
        out = client(ctx).federation(fed_id)
        emit(
            ctx,
            {k: out[k] for k in ("id", "status", "rounds_done", "epsilon_spent", "result_version_id", "error")}
            | {"participants": len(out["participants"])},
        )

    @fed.command("rounds")
    def rounds(ctx: typer.Context, fed_id: str = typer.Argument(...)) -> None:
        """Completed rounds: participants, accuracy, epsilon, ledger leaves."""
        rows = client(ctx).federation_rounds(fed_id)
        emit(
            ctx,
            [
                {
                    "round": r["number"],
                    "participants": len(r["participants"]),
                    "accuracy": r["metrics"].get("accuracy"),
                    "epsilon": r["epsilon"],
                    "leaves": r["ledger_indexes"],
                }
                for r in rows
            ],
        )

    @fed.command("receipts")
    def receipts(ctx: typer.Context, fed_id: str = typer.Argument(...)) -> None:
        """Ledger receipts of this organisation's contributions (verify with `som ledger verify`)."""
        emit(ctx, client(ctx).federation_receipts(fed_id))
