"""Docs match what runs: every setting is documented; the README's commands exist."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented() -> None:
    from marketplace.settings import Settings

    doc = (ROOT / "docs" / "configuration.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        env = "DATABASE_URL" if name == "database_url" else "SOM_" + name.upper()
        assert f"`{env}" in doc, f"{env} is missing from docs/configuration.md"


def test_readme_gives_the_two_commands_and_they_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    make = (ROOT / "Makefile").read_text()
    assert "make demo" in readme and "make test" in readme
    for target in ("demo", "test", "bench", "lint"):
        assert f"\n{target}:" in make
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_cli_groups_exist() -> None:
    from typer.testing import CliRunner

    from marketplace.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("| `som --help`"))
    for group in [g.strip("`, ") for g in line.split("(")[1].split(")")[0].split(",")]:
        assert group in out, f"README names `som {group}` but the CLI has no such command"
