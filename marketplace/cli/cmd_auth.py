"""``som whoami``: the principal the CLI's key is: an API key, or an SSO user's personal key."""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import typer

from marketplace.cli.common import client, emit, state


def register(app: typer.Typer) -> None:
    @app.command()
    def whoami(ctx: typer.Context) -> None:
        """Who the API key is: key id, organisation, roles, and the SSO user a personal key belongs to."""
        who = client(ctx).whoami()
        if not state(ctx).json:  # a flat key-value list for people
            user = who.pop("user", None) or {}
            who.update({f"user_{k}": v for k, v in user.items() if k != "teams"})
            if user:
                who["teams"] = ", ".join(user["teams"]) or "none"
        emit(ctx, who)
