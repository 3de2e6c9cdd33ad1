"""Shared CLI plumbing: state, output, error handling."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

from marketplace.sdk.errors import SomAPIError

if TYPE_CHECKING:
    from marketplace.sdk import SomClient

__all__ = [
    "State",
    "client",
    "die",
    "emit",
    "handle_errors",
    "last_receipt_path",
    "machine",
    "remember_receipt",
    "state",
    "write_private",
]

console = Console()
err_console = Console(stderr=True)


@dataclass
class State:
    url: str
    api_key: str | None
    json: bool
    field: str | None = None  # --field NAME: print only that field (for scripts: ID=$(som --field id ...))


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # pragma: no cover
        raise RuntimeError("CLI state missing")
    return obj


def machine(ctx: typer.Context) -> bool:
    """Output is for a program (``--json`` or ``--field``): hints and prompts go to stderr, or not at all."""
    st = state(ctx)
    return st.json or st.field is not None


def client(ctx: typer.Context, *, need_key: bool = True) -> SomClient:
    st = state(ctx)
    if need_key and not st.api_key:
        die("no API key: set SOM_API_KEY or pass --api-key (an admin creates keys with `som key create`)")
    # Imported here for start-up cost: `som --help` and local commands never load the SDK.
    from marketplace.sdk import SomClient

    return SomClient(st.url, st.api_key)


def die(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def emit(ctx: typer.Context, data: Any, *, columns: Sequence[str] | None = None, title: str | None = None) -> None:
    """Print ``data`` as JSON (--json) or as a table / key-value list."""
    st = state(ctx)
    if st.field:
        rows = data if isinstance(data, list) else [data]
        for row in rows:
            if not isinstance(row, dict) or st.field not in row:
                have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                die(f"--field {st.field}: the result has no such field (it has: {have})", 2)
            v = row[st.field]
            sys.stdout.write((v if isinstance(v, str) else json.dumps(v, default=str)) + "\n")
        return
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
            if _is_id(c):  # ids are copied and pasted: never cut them, wrap the other columns instead
                width = max([len(c)] + [len(_cell(row.get(c))) for row in data])
                table.add_column(c, no_wrap=True, min_width=width, overflow="ignore")
            else:
                table.add_column(c, overflow="fold")
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


def _is_id(column: str) -> bool:
    return column == "id" or column.endswith(("_id", "_hash", "digest")) or column in ("key", "prefix")


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, default=str)[:80]
    return str(v)


_POLICY_HINTS = {
    "suspended": "the provider suspended this contract; `som contract show CONTRACT` lists its events",
    "terminated": "this contract is terminated; find a current offer with `som contract offers OFFERING`",
    "expired": "this contract has expired; accept a new offer (`som contract offers OFFERING`)",
    "not_yet_valid": "this contract is not valid yet; `som contract show CONTRACT` shows when it starts",
    "quota_exhausted": "the contract's quota is used up; `som contract statement CONTRACT` shows the usage",
    "rate_limited": "the contract's rate limit is reached; retry after the time the server gave",
    "batch_too_large": "the request is larger than the contract's max_batch; send fewer rows per request",
    "mode_not_allowed": "the contract does not include this mode; `som contract show CONTRACT` lists its modes",
    "job_kind_not_allowed": "the contract does not allow this job kind; `som contract show CONTRACT` lists them",
    "keyset_not_bound": "register the key set under this contract first (`som infer --encrypted` does it)",
}


def hint_for(e: SomAPIError) -> str:
    """What to try next, naming the server's actual reason where it gave one."""
    err = (e.body or {}).get("error", {}) if isinstance(e.body, dict) else {}
    if e.code == "policy_denied":
        reason = str(err.get("reason", ""))
        return _POLICY_HINTS.get(reason, f"the contract denies this use ({reason or 'no reason given'})")
    return {
        401: "check SOM_API_KEY (is the key revoked or expired?)",
        403: "your key's roles do not allow this (`som whoami` shows them); an admin can issue a key with the role",
        404: "check the id (you can only see objects your organisation and teams may see)",
        413: "the payload is over the server's limit",
        429: "slow down; retry after the time the server gave",
        503: "the server is busy or a compute site is offline; retry shortly",
    }.get(e.status, "")


def last_receipt_path() -> Path:
    """Where the CLI keeps the receipt of its last metered call (``som receipt show --last``)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "som" / "last-receipt.json"


def write_private(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path`` with mode 0600 (trust state, witness keys, receipts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remember_receipt(receipt: dict[str, Any] | None) -> None:
    """Keep ``receipt`` as the last one (0600); a failure to write it never fails the command."""
    if not receipt:
        return
    path = last_receipt_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(receipt, f)
    except OSError:
        pass


@contextmanager
def handle_errors() -> Iterator[None]:
    try:
        yield
    except SomAPIError as e:
        hint = hint_for(e)
        err_console.print(f"[bold red]error:[/] {e.status} {e.code}: {e.message}", highlight=False)
        if hint:
            err_console.print(f"hint: {hint}", highlight=False)
        sys.exit(1)
    except Exception as e:
        import httpx  # start-up cost: loaded only when something went wrong

        if not isinstance(e, httpx.TransportError):
            raise
        err_console.print(
            f"[bold red]error:[/] cannot reach the server ({e.__class__.__name__}); "
            "is `som serve` running and SOM_URL right?",
            highlight=False,
        )
        sys.exit(2)
