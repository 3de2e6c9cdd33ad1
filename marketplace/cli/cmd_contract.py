"""``som contract``: publish signed offers, accept them, list/show contracts, suspend, resume,
terminate, statements.

Records are signed locally with the organisation's Ed25519 key: ``--key-file``, else
``$SOM_SIGNING_KEY``, else ``~/.config/som/<org name>.key`` (created 0600 on first use). The
server only ever receives public keys and signatures.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, console, die, emit, err_console, machine

CONTRACT_COLS = ["id", "offering_id", "provider_org_id", "consumer_org_id", "status", "effective_status"]
OFFER_COLS = ["id", "offering_id", "status", "price", "quota", "rate", "max_batch", "valid_until", "modes"]
TERMS_COLS = ["price", "quota", "rate", "max_batch", "valid_from", "valid_until", "modes", "job_kinds"]


def terms_summary(terms: dict[str, Any]) -> dict[str, Any]:
    """The terms a consumer reads before signing, as short strings (price in currency units)."""
    price = terms.get("price", {})
    minor = int(price.get("unit_price_minor", 0))
    rate = terms.get("rate", {})
    kinds = terms.get("job_limits", {}).get("kinds", [])
    return {
        "price": f"{price.get('currency', '?')} {minor / 100:.2f} per unit",
        "quota": f"{terms.get('quota_units')} units",
        "rate": f"{rate.get('units')} units / {rate.get('window_seconds')} s",
        "max_batch": terms.get("max_batch"),
        "valid_from": terms.get("valid_from"),
        "valid_until": terms.get("valid_until"),
        "modes": ", ".join(terms.get("modes", [])),
        "job_kinds": ", ".join(kinds),
    }


def _offer_row(o: dict[str, Any]) -> dict[str, Any]:
    return {**o, **terms_summary(o.get("offer", {}).get("terms", {}))}


def _key(ctx: typer.Context, key_file: Path | None):  # type: ignore[no-untyped-def]
    from marketplace.sdk.contracts_api import default_key_path, load_signing_key

    if key_file is None:
        org = client(ctx).whoami()["org_name"]
        key_file = default_key_path(re.sub(r"[^A-Za-z0-9._-]", "_", org))
    try:
        return load_signing_key(key_file)
    except (ValueError, OSError) as e:
        die(f"cannot use signing key {key_file}: {e}")


KeyFile = typer.Option(None, "--key-file", help="Ed25519 signing key file (created 0600 if missing).")


def register(app: typer.Typer) -> None:
    grp = typer.Typer(help="Contracts: signed offers, acceptances, lifecycle, statements.", no_args_is_help=True)
    app.add_typer(grp, name="contract")

    @grp.command("offer")
    def offer(
        ctx: typer.Context,
        offering_id: str,
        quota: int = typer.Option(..., help="Total units the consumer may use."),
        rate: int = typer.Option(..., help="Units per rate window."),
        window: int = typer.Option(60, help="Rate window in seconds."),
        price: int = typer.Option(0, help="Price per unit in the currency's minor unit (cents)."),
        currency: str = typer.Option("EUR", help="ISO 4217 currency."),
        modes: str = typer.Option(
            "he_inference,remote_job", help="Allowed modes, comma-separated (he_inference, remote_job, gateway)."
        ),
        job_kinds: str = typer.Option("predict,evaluate", help="Allowed job kinds, comma-separated."),
        days: int = typer.Option(365, help="Validity in days from now."),
        max_batch: int = typer.Option(64, help="Largest batch per request."),
        key_file: Path | None = KeyFile,
        to: list[str] = typer.Option(
            None, "--to", help="Private offer: only this organisation id sees it (repeatable)."
        ),
    ) -> None:
        """Sign and publish an offer for one of your offerings (provider)."""
        from contracts.terms import JobLimits, Terms

        now = datetime.now(UTC)
        try:
            terms = Terms(
                modes=frozenset(m.strip() for m in modes.split(",") if m.strip()),
                quota_units=quota,
                rate_units=rate,
                rate_window_seconds=window,
                valid_from=now,
                valid_until=now + timedelta(days=days),
                unit_price_minor=price,
                currency=currency,
                max_batch=max_batch,
                job_limits=JobLimits(frozenset(k.strip() for k in job_kinds.split(",") if k.strip()), 600, 2048, 900),
            )
        except (ValueError, TypeError) as e:
            die(f"invalid terms: {e}")
        if to:  # a private offer (docs/sharing.md)
            emit(
                ctx,
                client(ctx).publish_private_offer(offering_id, terms, to=list(to), signing_key=_key(ctx, key_file)),
                columns=OFFER_COLS,
            )
            return
        emit(ctx, client(ctx).publish_offer(offering_id, terms, signing_key=_key(ctx, key_file)), columns=OFFER_COLS)

    @grp.command("offers")
    def offers(ctx: typer.Context, offering_id: str) -> None:
        """List the offers of an offering, with price, quota, rate, validity and modes."""
        rows = client(ctx).list_offers(offering_id)
        emit(ctx, rows if machine(ctx) else [_offer_row(o) for o in rows], columns=OFFER_COLS)
        if not machine(ctx) and rows:
            console.print(
                "next: som contract accept OFFER_ID (shows the terms and asks before signing)", highlight=False
            )

    @grp.command("accept")
    def accept(
        ctx: typer.Context,
        offer_id: str,
        provider_key: str = typer.Option(None, help="Pin the provider's public key (ed25519:...)."),
        key_file: Path | None = KeyFile,
        yes: bool = typer.Option(False, "--yes", "-y", help="Accept without asking (scripts)."),
    ) -> None:
        """Show an offer's terms, then verify it, sign your acceptance locally and send it (consumer)."""
        cl = client(ctx)
        offer = cl.get_offer(offer_id)
        summary = terms_summary(offer.get("offer", {}).get("terms", {}))
        out = err_console if machine(ctx) else console  # --json keeps stdout for the contract
        out.print(
            f"[bold]offer {offer_id}[/] for offering {offer.get('offering_id')} "
            f"(signed by {offer.get('provider_key')})",
            highlight=False,
        )
        for k in TERMS_COLS:
            out.print(f"  {k}: {summary[k]}", highlight=False)
        if not yes:
            if not sys.stdin.isatty():
                die("not accepted: pass --yes to accept these terms without a prompt", 2)
            if not typer.confirm("Sign and accept these terms?", default=False):
                die("not accepted", 1)
        try:
            c = cl.accept_offer(offer_id, signing_key=_key(ctx, key_file), provider_key=provider_key)
        except ValueError as e:
            die(f"offer {offer_id} not accepted: {e}")
        emit(ctx, c, columns=CONTRACT_COLS)
        if not machine(ctx):
            console.print(
                f"next: som infer {c.get('offering_id')} --input rows.csv --encrypted   "
                f"(or som job submit {c.get('offering_id')} ...)",
                highlight=False,
            )

    @grp.command("list")
    def list_(
        ctx: typer.Context,
        role: str = typer.Option(None, help="provider or consumer"),
        status: str = typer.Option(None, help="active, suspended or terminated"),
    ) -> None:
        """Your organisation's contracts."""
        emit(ctx, client(ctx).list_contracts(role=role, status=status), columns=CONTRACT_COLS)

    @grp.command("show")
    def show(ctx: typer.Context, contract_id: str) -> None:
        """One contract: terms (price, quota, rate, validity, modes), status, usage, events."""
        c = client(ctx).get_contract(contract_id)
        if machine(ctx):
            emit(ctx, c)
            return
        emit(
            ctx,
            {k: c.get(k) for k in CONTRACT_COLS}
            | terms_summary(c.get("terms", {}))
            | {"usage": c.get("usage"), "events": c.get("events")},
        )

    def _event(ctx: typer.Context, contract_id: str, kind: str, reason: str, key_file: Path | None) -> None:
        c = client(ctx).contract_event(contract_id, kind, signing_key=_key(ctx, key_file), reason=reason)
        emit(ctx, c, columns=CONTRACT_COLS + ["seq"])

    @grp.command("suspend")
    def suspend(
        ctx: typer.Context,
        contract_id: str,
        reason: str = typer.Option("", help="Why."),
        key_file: Path | None = KeyFile,
    ) -> None:
        """Suspend a contract (provider); uses are refused until it is resumed."""
        _event(ctx, contract_id, "suspension", reason, key_file)

    @grp.command("resume")
    def resume(
        ctx: typer.Context,
        contract_id: str,
        reason: str = typer.Option("", help="Why."),
        key_file: Path | None = KeyFile,
    ) -> None:
        """Resume a suspended contract (provider)."""
        _event(ctx, contract_id, "resumption", reason, key_file)

    @grp.command("terminate")
    def terminate(
        ctx: typer.Context,
        contract_id: str,
        reason: str = typer.Option("", help="Why."),
        key_file: Path | None = KeyFile,
    ) -> None:
        """Terminate a contract (either party); final."""
        _event(ctx, contract_id, "termination", reason, key_file)

    @grp.command("statement")
    def statement(
        ctx: typer.Context,
        contract_id: str,
        start: str = typer.Option(None, "--from", help="Start (ISO 8601, inclusive)."),
        end: str = typer.Option(None, "--to", help="End (ISO 8601, exclusive)."),
        format: str = typer.Option("json", "--format", help="json or csv"),
    ) -> None:
        """Usage statement of a contract (consumer or provider)."""
        if format not in ("json", "csv"):
            die("--format must be json or csv")
        out = client(ctx).statement(contract_id, start=start, end=end, format=format)
        if format == "csv":
            sys.stdout.write(out)
            return
        emit(
            ctx,
            out,
            columns=[
                "contract_id",
                "currency",
                "period_start",
                "period_end",
                "total_units",
                "total_amount",
                "released_count",
            ],
        )
