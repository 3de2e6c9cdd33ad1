"""The ``som`` command line. Command groups live in ``marketplace/cli/cmd_*.py``, listed in ``COMMANDS``.

Environment: ``SOM_URL`` (default http://127.0.0.1:8600), ``SOM_API_KEY``. ``--json`` prints
machine-readable output. Errors print a message and what to try next, and exit non-zero.
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from marketplace.cli import (
    cmd_agent,
    cmd_auth,
    cmd_contract,
    cmd_convert,
    cmd_core,
    cmd_federation,
    cmd_infer,
    cmd_job,
    cmd_ledger,
    cmd_predict,
    cmd_share,
    cmd_worker,
)
from marketplace.cli.common import State, handle_errors

__all__ = ["app", "main"]

#: The table of contents: every command group, in the order ``som --help`` lists them.
COMMANDS = (
    cmd_agent,
    cmd_auth,
    cmd_contract,
    cmd_convert,
    cmd_core,
    cmd_federation,
    cmd_infer,
    cmd_job,
    cmd_ledger,
    cmd_predict,
    cmd_share,
    cmd_worker,
)


class _RootGroup(TyperGroup):
    """Accepts the global ``--json`` and ``--field NAME`` anywhere before ``--``, and
    turns API and transport errors of any command into a message, a hint and a non-zero exit."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # ctx: typer's vendored click Context
        end = args.index("--") if "--" in args else len(args)
        head, front, i = [], [], 0
        while i < end:
            a = args[i]
            if a == "--json":
                front.append(a)
            elif a == "--field" and i + 1 < end:
                front += [a, args[i + 1]]
                i += 1
            elif a.startswith("--field="):
                front.append(a)
            else:
                head.append(a)
            i += 1
        return super().parse_args(ctx, [*front, *head, *args[end:]])

    def invoke(self, ctx: Any) -> Any:
        with handle_errors():  # every command: API errors become a message, a hint and exit 1
            return super().invoke(ctx)


app = typer.Typer(
    name="som",
    cls=_RootGroup,
    help="Share-of-Model: a privacy-preserving model marketplace.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    ctx: typer.Context,
    url: str = typer.Option("http://127.0.0.1:8600", envvar="SOM_URL", help="Server URL."),
    api_key: str = typer.Option("", envvar="SOM_API_KEY", help="API key (som_...).", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON output."),
    field: str = typer.Option(
        None, "--field", metavar="NAME", help="Print only this field of the result (scripts: ID=$(som --field id ...))."
    ),
) -> None:
    ctx.obj = State(url=url, api_key=api_key or None, json=json_out, field=field)


def _register(commands: tuple[Any, ...]) -> None:
    for module in commands:
        module.register(app)


_register(COMMANDS)


def main() -> None:
    with handle_errors():
        app(prog_name="som")
    sys.exit(0)
