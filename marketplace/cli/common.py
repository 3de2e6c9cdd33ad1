"""Shared CLI plumbing: state, output, error handling."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import typer
from rich.console import Console
from rich.table import Table

from marketplace.sdk import SomAPIError, SomClient

__all__ = ["State", "client", "die", "emit", "handle_errors", "state"]

console = Console()
err_console = Console(stderr=True)


@dataclass
class State:
    url: str
    api_key: str | None
    json: bool


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # pragma: no cover
        raise RuntimeError("CLI state missing")
    return obj


def client(ctx: typer.Context, *, need_key: bool = True) -> SomClient:
    st = state(ctx)
    if need_key and not st.api_key:
        die("no API key: set SOM_API_KEY or pass --api-key (an admin creates keys with `som key create`)")
    return SomClient(st.url, st.api_key)


def die(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def emit(ctx: typer.Context, data: Any, *, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print ``data`` as JSON (--json) or as a table / key-value list."""
    st = state(ctx)
    if st.json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        return
    if isinstance(data, list):
        if not data:
            console.print("(none)")
            return
        cols = list(columns or data[0].keys())
        table = Table(title=title)
        for c in cols:
            table.add_column(c)
        for row in data:
            table.add_row(*[_cell(row.get(c)) for c in cols])
        console.print(table)
    elif isinstance(data, dict):
        for k, v in data.items():
            if columns and k not in columns:
                continue
            console.print(f"[bold]{k}[/]: {_cell(v)}", highlight=False)
    else:
        console.print(str(data))


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)[:80]
    return str(v)


@contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except SomAPIError as e:
        hint = {
            401: "check SOM_API_KEY (is the key revoked or expired?)",
            403: "your key lacks the role for this; ask an admin",
            404: "check the id (you can only see your own organisation's objects)",
            413: "the payload is over the server's limit",
            429: "slow down; retry after the time the server gave",
        }.get(e.status, "")
        err_console.print(f"[bold red]error:[/] {e.status} {e.code}: {e.message}", highlight=False)
        if hint:
            err_console.print(f"hint: {hint}", highlight=False)
        sys.exit(1)
    except httpx.TransportError as e:
        err_console.print(
            f"[bold red]error:[/] cannot reach the server ({e.__class__.__name__}); is `som serve` running and SOM_URL right?",
            highlight=False,
        )
        sys.exit(2)
