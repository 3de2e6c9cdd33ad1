"""serve, db, admin, org, key, offering, audit."""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import json
import os
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, die, emit

OFFERING_COLS = ["id", "name", "task", "hosting", "status", "tags"]
KEY_COLS = ["id", "prefix", "roles", "name", "expires_at", "revoked_at"]


def _settings(data_dir: Path | None, database_url: str | None = None) -> Any:
    from marketplace.settings import Settings, SettingsError

    kw: dict[str, Any] = {}
    if data_dir is not None:
        kw["data_dir"] = data_dir
    if database_url:
        kw["database_url"] = database_url
    s = Settings(**kw)
    try:
        s.check_secrets()
    except SettingsError as e:
        die(str(e), 2)
    return s


def _print_start(rt: Any, s: Any) -> None:
    """Where the server is, where its data lives, and where the first admin key comes from."""
    from sqlalchemy import select

    from marketplace.db.models import ApiKey

    with rt.tx() as session:
        admins = [k for k in session.scalars(select(ApiKey)) if "admin" in k.roles and k.revoked_at is None]
    err = typer.echo
    err(f"som: serving on http://{s.host}:{s.port}  (API /v1, web UI /ui, OpenAPI /docs)", err=True)
    err(f"som: data directory {rt.data_dir}  (database {s.resolved_database_url().split('://')[0]})", err=True)
    if admins:
        first = min(admins, key=lambda k: k.created_at)
        err(
            f"som: admin key {first.prefix}... exists "
            f"(from `som admin bootstrap` at {first.created_at:%Y-%m-%d %H:%M} UTC)",
            err=True,
        )
    else:
        err(f"som: no admin key yet: run `som admin bootstrap --data-dir {rt.data_dir}` (prints it once)", err=True)


def _runtime(s: Any) -> Any:
    """The runtime of an admin command (umask 077; a key-custody refusal is a message, exit 2)."""
    from marketplace.runtime import Runtime
    from marketplace.settings import SettingsError

    os.umask(0o077)
    try:
        return Runtime(s)
    except SettingsError as e:
        die(str(e), 2)
    return None


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        data_dir: Path = typer.Option(None, envvar="SOM_DATA_DIR", help="Data directory."),
        host: str = typer.Option(None, help="Bind address (default SOM_HOST or 127.0.0.1)."),
        port: int = typer.Option(None, help="Port (default SOM_PORT or 8600)."),
    ) -> None:
        """Run the API server (upgrades the DB first)."""
        import uvicorn

        from marketplace.api.app import create_app
        from marketplace.settings import SettingsError

        os.umask(0o077)  # every file the server creates (DB, WAL, SHM, logs, blobs) is 0600
        s = _settings(data_dir)
        if host:
            s.host = host
        if port:
            s.port = port
        from marketplace.emptycwd import enter_empty_cwd

        enter_empty_cwd(s)  # docs/deployment.md: the server runs in an empty working directory
        try:
            api = create_app(s)
        except SettingsError as e:
            die(str(e), 2)
        typer.echo("som serve: " + str(api.state.custody_notice), err=True)
        _print_start(api.state.runtime, s)
        uvicorn.run(api, host=s.host, port=s.port, log_level="warning")

    db = typer.Typer(help="Database schema.", no_args_is_help=True)
    app.add_typer(db, name="db")

    @db.command("upgrade")
    def db_upgrade(data_dir: Path = typer.Option(None, envvar="SOM_DATA_DIR")) -> None:
        """Apply Alembic migrations up to head."""
        from marketplace.db.session import make_engine, upgrade

        s = _settings(data_dir)
        s.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade(make_engine(s.resolved_database_url()))
        typer.echo("database at head")

    admin = typer.Typer(help="Operator tasks run on the server host (no API key needed).", no_args_is_help=True)
    app.add_typer(admin, name="admin")

    @admin.command("bootstrap")
    def admin_bootstrap(ctx: typer.Context, data_dir: Path = typer.Option(None, envvar="SOM_DATA_DIR")) -> None:
        """Create the operator organisation and the first admin key (printed once)."""
        from marketplace.errors import MarketplaceError
        from marketplace.services import audit
        from marketplace.services.identity import bootstrap

        rt = _runtime(_settings(data_dir))
        try:
            with rt.tx() as s:
                row, key = bootstrap(s)
                audit.emit(s, audit.Actor.system(), "key.create", target=row.id, detail={"bootstrap": True})
                audit.emit(s, audit.Actor.system(), "role.grant", target=row.id, detail={"roles": ["admin"]})
        except MarketplaceError as e:
            rt.close()
            die(e.message)
        rt.close()
        emit(ctx, {"key_id": row.id, "org_id": row.org_id, "api_key": key})

    @admin.command("rotate-kek")
    def admin_rotate(ctx: typer.Context, data_dir: Path = typer.Option(None, envvar="SOM_DATA_DIR")) -> None:
        """Create a new key-encryption key and re-wrap every data key (blobs are not re-encrypted)."""
        from marketplace.services.keys import rotate_kek

        rt = _runtime(_settings(data_dir))
        try:
            n, kek_id = rotate_kek(rt)
        finally:
            rt.close()
        emit(ctx, {"rewrapped": n, "active_kek": kek_id})

    org = typer.Typer(help="Organisations.", no_args_is_help=True)
    app.add_typer(org, name="org")

    @org.command("create")
    def org_create(ctx: typer.Context, name: str) -> None:
        """Create an organisation (admin)."""
        emit(ctx, client(ctx).create_org(name))

    @org.command("list")
    def org_list(ctx: typer.Context) -> None:
        """List organisations."""
        emit(ctx, client(ctx).list_orgs(), columns=["id", "name", "created_at"])

    key = typer.Typer(help="API keys.", no_args_is_help=True)
    app.add_typer(key, name="key")

    @key.command("create")
    def key_create(
        ctx: typer.Context,
        org_id: str = typer.Option(..., "--org", help="Organisation id."),
        role: list[str] = typer.Option(..., "--role", help="provider | consumer | compliance | admin (repeat)."),
        name: str = typer.Option("", help="A label."),
        ttl_days: int = typer.Option(365, help="Lifetime in days."),
    ) -> None:
        """Create an API key; the key is printed once."""
        emit(ctx, client(ctx).create_key(org_id, role, name=name, ttl_days=ttl_days))

    @key.command("list")
    def key_list(ctx: typer.Context, org_id: str = typer.Option(None, "--org")) -> None:
        """List your organisation's keys."""
        emit(ctx, client(ctx).list_keys(org_id), columns=KEY_COLS)

    @key.command("revoke")
    def key_revoke(ctx: typer.Context, key_id: str) -> None:
        """Revoke a key."""
        emit(ctx, client(ctx).revoke_key(key_id), columns=KEY_COLS)

    off = typer.Typer(help="Catalog offerings.", no_args_is_help=True)
    app.add_typer(off, name="offering")

    @off.command("create")
    def off_create(
        ctx: typer.Context,
        name: str = typer.Option(...),
        task: str = typer.Option(..., help="e.g. binary-classification"),
        description: str = typer.Option(""),
        model_card: Path = typer.Option(None, help="Markdown file."),
        tag: list[str] = typer.Option([], help="Tag (repeat)."),
        licence: str = typer.Option("proprietary"),
        hosting: str = typer.Option("marketplace", help="marketplace | provider"),
        input_schema: str = typer.Option("{}", help="JSON"),
        output_schema: str = typer.Option("{}", help="JSON"),
    ) -> None:
        """Create a draft offering (provider)."""
        try:
            ins, outs = json.loads(input_schema), json.loads(output_schema)
        except json.JSONDecodeError as e:
            die(f"schema is not valid JSON: {e}")
        card = model_card.read_text() if model_card else ""
        emit(
            ctx,
            client(ctx).create_offering(
                name=name,
                task=task,
                description=description,
                model_card=card,
                tags=tag,
                licence=licence,
                hosting=hosting,
                input_schema=ins,
                output_schema=outs,
            ),
            columns=OFFERING_COLS,
        )

    @off.command("list")
    def off_list(
        ctx: typer.Context,
        q: str = typer.Option(None, help="Search text."),
        task: str = typer.Option(None),
        tag: str = typer.Option(None),
        hosting: str = typer.Option(None),
        status: str = typer.Option(None),
    ) -> None:
        """Search the catalog."""
        emit(
            ctx,
            client(ctx).search_offerings(q=q, task=task, tag=tag, hosting=hosting, status=status),
            columns=OFFERING_COLS,
        )

    @off.command("show")
    def off_show(ctx: typer.Context, offering_id: str) -> None:
        """Show one offering."""
        emit(ctx, client(ctx).get_offering(offering_id))

    @off.command("upload")
    def off_upload(
        ctx: typer.Context,
        offering_id: str,
        path: Path = typer.Argument(..., exists=True, dir_okay=False, help=".onnx or .npz file"),
        fmt: str = typer.Option(None, "--format", help="onnx | npz (default: from the suffix)"),
        input_shape: str = typer.Option("", help="Declared input shape, e.g. 30"),
    ) -> None:
        """Upload a model version (it is validated and stored encrypted)."""
        f = fmt or path.suffix.lstrip(".").lower()
        shape = [int(x) for x in input_shape.split(",") if x.strip()] if input_shape else None
        emit(
            ctx,
            client(ctx).upload_version(offering_id, path.read_bytes(), format=f, input_shape=shape),
            columns=["id", "number", "format", "digest", "size", "input_shape"],
        )

    @off.command("publish")
    def off_publish(ctx: typer.Context, offering_id: str) -> None:
        """Publish an offering to the catalog."""
        emit(ctx, client(ctx).publish(offering_id), columns=OFFERING_COLS)

    @off.command("withdraw")
    def off_withdraw(ctx: typer.Context, offering_id: str) -> None:
        """Withdraw an offering from the catalog."""
        emit(ctx, client(ctx).withdraw(offering_id), columns=OFFERING_COLS)

    aud = typer.Typer(help="Audit trail (compliance).", no_args_is_help=True)
    app.add_typer(aud, name="audit")

    @aud.command("list")
    def audit_list(
        ctx: typer.Context,
        action: str = typer.Option(None),
        actor: str = typer.Option(None),
        org_id: str = typer.Option(None, "--org"),
        outcome: str = typer.Option(None),
        target: str = typer.Option(None),
        since: str = typer.Option(None, help="ISO time"),
        until: str = typer.Option(None, help="ISO time"),
    ) -> None:
        """List and filter audit events."""
        emit(
            ctx,
            client(ctx).audit(
                action=action, actor=actor, org_id=org_id, outcome=outcome, target=target, since=since, until=until
            ),
            columns=["seq", "time", "actor", "org_id", "action", "target", "outcome"],
        )
