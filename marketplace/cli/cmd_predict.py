"""``som predict``: plaintext inference through the gateway (a contract with mode ``gateway``).

``som predict OFFERING --input rows.csv`` (or ``rows.json`` holding ``{"rows": [[...], ...]}``,
or a ``.npy`` matrix) prints the predictions as CSV (``y0,y1,...``), or with ``--json`` the
outputs, usage id, ledger index and the server's timing. The compute site (the marketplace's
worker, or the provider's agent) sees the rows: use ``som infer --encrypted`` when it must not.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import json
import uuid
from pathlib import Path

import typer

from marketplace.cli.common import client, die, handle_errors, state

__all__ = ["register"]


def _body(path: Path) -> tuple[bytes, str]:
    """The request body and its media type for an input file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        import numpy as np  # start-up cost: only a .npy input needs numpy

        arr = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        return json.dumps({"rows": arr.reshape(arr.shape[0], -1).tolist()}).encode(), "application/json"
    data = path.read_bytes()
    if suffix == ".json":
        return data, "application/json"
    return data, "text/csv"


def register(app: typer.Typer) -> None:
    @app.command("predict")
    def predict_cmd(
        ctx: typer.Context,
        offering_id: str = typer.Argument(..., help="Offering id."),
        input: Path = typer.Option(
            ...,
            "--input",
            "-i",
            exists=True,
            dir_okay=False,
            help='Rows: .csv (one per line), .json ({"rows": [[...]]}) or .npy.',
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Write the CSV predictions here; default stdout."
        ),
        contract: str | None = typer.Option(None, "--contract", help="Contract id (default: your single live one)."),
        idempotency_key: str | None = typer.Option(
            None, "--idempotency-key", help="Reuse to retry safely (charged once); default: a new UUID."
        ),
    ) -> None:
        """Plaintext predictions through the inference gateway (metered per row, receipt kept)."""
        try:
            body, ctype = _body(input)
        except (ValueError, OSError) as e:
            die(f"cannot read {input}: {e}")
            return
        c = client(ctx)
        headers = {
            "Content-Type": ctype,
            "Accept": "text/csv" if not state(ctx).json else "application/json",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        if contract:
            headers["X-Som-Contract"] = contract
        with handle_errors():
            r = c.request("POST", f"/v1/offerings/{offering_id}/predict", content=body, headers=headers)
        # start-up cost: the SDK (httpx) loads only when a command calls the server
        from marketplace.sdk.gateway_api import parse_server_timing
        from marketplace.sdk.he_api import decode_receipt

        receipt = decode_receipt(r.headers.get("x-som-receipt")) or {}
        usage = r.headers.get("x-som-usage-id")
        if state(ctx).json:
            doc = r.json()
            doc.update(
                {
                    "usage_id": usage,
                    "ledger_index": receipt.get("index"),
                    "replay": r.headers.get("x-som-replay") == "true",
                    "timing_ms": parse_server_timing(r.headers.get("server-timing")),
                }
            )
            typer.echo(json.dumps(doc, indent=2))
            return
        if output is None:
            typer.echo(r.text, nl=False)
        else:
            output.write_bytes(r.content)
            typer.echo(
                f"wrote {r.headers.get('x-som-units')} predictions to {output} "
                f"(usage {usage}, ledger index {receipt.get('index')})",
                err=True,
            )
