"""The ``som`` command line. Command groups live in ``marketplace/cli/cmd_*.py`` (discovered).

Environment: ``SOM_URL`` (default http://127.0.0.1:8600), ``SOM_API_KEY``. ``--json`` prints
machine-readable output. Errors print a message and what to try next, and exit non-zero.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import typer

from marketplace.cli.common import State, handle_errors

__all__ = ["app", "main"]

app = typer.Typer(
    name="som",
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
) -> None:
    ctx.obj = State(url=url, api_key=api_key or None, json=json_out)


def _load() -> None:
    import marketplace.cli as pkg

    for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if m.name.startswith("cmd_"):
            mod = importlib.import_module(f"marketplace.cli.{m.name}")
            mod.register(app)


_load()


def main() -> None:
    with handle_errors():
        app(prog_name="som")
    sys.exit(0)
