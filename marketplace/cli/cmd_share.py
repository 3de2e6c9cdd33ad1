"""team create|list|show|add|remove; offering grant|grants|revoke|visibility|audit|validate|validation."""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import csv
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, die, emit

TEAM_COLS = ["id", "name", "members"]
GRANT_COLS = ["id", "org_id", "team_id", "permission", "created_at"]
AUDIT_COLS = ["seq", "time", "actor", "action", "target", "outcome"]
CHECK_COLS = ["name", "ok", "detail"]


def _offering_group(app: typer.Typer) -> typer.Typer:
    """The ``som offering`` group (registered by cmd_core, which COMMANDS lists before this)."""
    for info in app.registered_groups:
        if info.name == "offering" and info.typer_instance is not None:
            return info.typer_instance
    raise RuntimeError("the offering command group is not registered")  # pragma: no cover


def _eval_csv(path: Path) -> dict[str, Any]:
    """An evaluation set from a CSV: feature columns, then the label (a header row is skipped)."""
    x, y = [], []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f), 1):
            if not row:
                continue
            try:
                vals = [float(v) for v in row]
            except ValueError:
                if i == 1:
                    continue  # a header
                die(f"{path}:{i}: not a number")
            x.append(vals[:-1])
            y.append(vals[-1])
    return {"x": x, "y": y}


def _metrics(items: list[str]) -> dict[str, float]:
    out = {}
    for it in items:
        name, _, val = it.partition("=")
        try:
            out[name.strip()] = float(val)
        except ValueError:
            die(f"--metric {it!r}: expected NAME=VALUE, e.g. accuracy=0.97")
    return out


def _report(ctx: typer.Context, rep: dict[str, Any]) -> None:
    emit(ctx, rep.get("checks", []), columns=CHECK_COLS, title=f"validation: {rep.get('status')}")
    if rep.get("reason"):
        typer.echo(f"reason: {rep['reason']}", err=True)


def register(app: typer.Typer) -> None:
    team = typer.Typer(help="Teams of your organisation (who may act on which offering).", no_args_is_help=True)
    app.add_typer(team, name="team")

    @team.command("create")
    def team_create(ctx: typer.Context, name: str) -> None:
        """Create a team (an organisation root key)."""
        emit(ctx, client(ctx).create_team(name))

    @team.command("list")
    def team_list(ctx: typer.Context) -> None:
        """Teams of your organisation and their members."""
        emit(ctx, client(ctx).list_teams(), columns=TEAM_COLS)

    @team.command("show")
    def team_show(ctx: typer.Context, team_ref: str) -> None:
        """One team (id or name)."""
        emit(ctx, client(ctx).get_team(team_ref))

    @team.command("add")
    def team_add(ctx: typer.Context, team_ref: str, key_id: str) -> None:
        """Add an API key of your organisation to a team."""
        emit(ctx, client(ctx).add_team_member(team_ref, key_id))

    @team.command("remove")
    def team_remove(ctx: typer.Context, team_ref: str, key_id: str) -> None:
        """Remove an API key from a team."""
        emit(ctx, client(ctx).remove_team_member(team_ref, key_id))

    off = _offering_group(app)

    @off.command("grant")
    def grant(
        ctx: typer.Context,
        offering_id: str,
        org: str = typer.Option(None, "--org", help="Grantee organisation id."),
        team_id: str = typer.Option(None, "--team", help="Grantee team id."),
        permission: str = typer.Option("read", "--permission", help="read, write or admin."),
    ) -> None:
        """Grant read (other organisations, teams), write or admin (your own teams) on an offering."""
        if not org and not team_id:
            die("give --org ORG_ID, --team TEAM_ID or both")
        emit(ctx, client(ctx).grant(offering_id, org_id=org, team_id=team_id, permission=permission))

    @off.command("grants")
    def grants(ctx: typer.Context, offering_id: str) -> None:
        """The grants on an offering."""
        emit(ctx, client(ctx).list_grants(offering_id), columns=GRANT_COLS)

    @off.command("revoke")
    def revoke(ctx: typer.Context, offering_id: str, grant_id: str) -> None:
        """Revoke a grant (effective on the grantee's next request)."""
        client(ctx).revoke_grant(offering_id, grant_id)
        emit(ctx, {"revoked": grant_id, "offering_id": offering_id})

    @off.command("visibility")
    def visibility(ctx: typer.Context, offering_id: str, value: str) -> None:
        """Set visibility: public, organisation or shared (only the grantees)."""
        emit(ctx, client(ctx).set_visibility(offering_id, value))

    @off.command("audit")
    def offering_audit(ctx: typer.Context, offering_id: str, action: str = typer.Option(None)) -> None:
        """Audit events about your offering: retrievals, computations, refusals, grant changes."""
        emit(ctx, client(ctx).offering_audit(offering_id, action=action), columns=AUDIT_COLS)

    @off.command("validate")
    def validate(
        ctx: typer.Context,
        offering_id: str,
        version: int,
        metric: list[str] = typer.Option(None, "--metric", help="Declared metric NAME=VALUE (repeatable)."),
        eval_csv: Path = typer.Option(None, "--eval", help="Evaluation CSV: features then the label per row."),
        measured_on: str = typer.Option("", help="The data the metrics were measured on."),
        notes: str = typer.Option("", help="Notes."),
        parent: int = typer.Option(None, help="The version this one derives from."),
        tolerance: float = typer.Option(None, help="Largest |declared - measured| accepted."),
        he_min_agreement: float = typer.Option(None, help="HE-vs-plaintext agreement threshold."),
    ) -> None:
        """Declare a version's metrics and evaluation set; prints the validation report."""
        fields: dict[str, Any] = {"metrics": _metrics(metric or []), "measured_on": measured_on, "notes": notes}
        for k, val in (("parent", parent), ("tolerance", tolerance), ("he_min_agreement", he_min_agreement)):
            if val is not None:
                fields[k] = val
        if eval_csv is not None:
            fields["evaluation"] = _eval_csv(eval_csv)
        out = client(ctx).set_version_metadata(offering_id, version, **fields)
        _report(ctx, out.get("validation") or {})

    @off.command("validation")
    def validation(ctx: typer.Context, offering_id: str, version: int) -> None:
        """The validation report of a version."""
        _report(ctx, client(ctx).validation_report(offering_id, version))
