"""``som infer`` (encrypted inference from a CSV), ``som offering compile``, ``som he ...``.

``som infer OFFERING --input data.csv --encrypted --output preds.csv`` encrypts locally with the
consumer's cached keys (``--key-dir``, default ``~/.cache/som/he``): the server sees ciphertexts
only. ``som offering compile OFFERING --version N --calibration FILE.npy|csv`` (also ``som he
compile``) compiles a marketplace-hosted version for HE. ``som he keysets`` lists key sets.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import contextlib
import csv
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from marketplace.cli.common import client, die, emit, err_console, handle_errors, remember_receipt

__all__ = ["read_features", "register", "write_predictions"]

if TYPE_CHECKING:
    import numpy as np


def read_features(path: Path) -> np.ndarray:
    """A CSV of numeric features (one sample per row; an optional header row), or a .npy file."""
    import numpy as np  # start-up cost: only the commands that read features pay for numpy

    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        return np.asarray(arr, dtype=np.float64)
    rows: list[list[float]] = []
    with path.open(newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or all(not c.strip() for c in row):
                continue
            try:
                rows.append([float(c) for c in row])
            except ValueError:
                if i == 0 and not rows:
                    continue  # header
                raise ValueError(f"{path}:{i + 1}: expected numbers, got {row[:5]}") from None
    if not rows:
        raise ValueError(f"{path}: no samples")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of columns: {sorted(widths)}")
    return np.asarray(rows, dtype=np.float64)


def write_predictions(out: np.ndarray, path: Path | None, *, postprocess: str | None) -> str:
    """CSV with a header: ``probability`` (sigmoid), ``p0..pk`` + ``label`` (softmax), else ``y0..``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    k = out.shape[1]
    if postprocess == "sigmoid" and k == 1:
        w.writerow(["probability", "label"])
        for v in out[:, 0]:
            w.writerow([f"{v:.6f}", int(v > 0.5)])
    elif postprocess == "softmax":
        w.writerow([f"p{j}" for j in range(k)] + ["label"])
        for row in out:
            w.writerow([f"{v:.6f}" for v in row] + [int(row.argmax())])
    else:
        w.writerow([f"y{j}" for j in range(k)])
        for row in out:
            w.writerow([f"{v:.6f}" for v in row])
    text = buf.getvalue()
    if path is not None:
        path.write_text(text)
    return text


def _compile(ctx: typer.Context, offering_id: str, version: int, calibration: Path) -> None:
    try:
        cal = read_features(calibration)
    except (ValueError, OSError) as e:
        die(f"cannot read calibration data: {e}")
        return
    with handle_errors():
        v = client(ctx).compile_version(offering_id, version, cal)
    card = v.get("he_report") or {}
    emit(
        ctx,
        {
            "offering_id": v["offering_id"],
            "version": v["number"],
            "plan_digest": card.get("plan_digest"),
            "depth": card.get("depth"),
            "poly_modulus_degree": card.get("poly_modulus_degree"),
            "argmax_agreement": card.get("argmax_agreement"),
            "max_abs_error_vs_exact": card.get("max_abs_error_vs_exact"),
            "keyset_bytes_batch": card.get("keyset_bytes_batch"),
        },
    )


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for inputs split into several requests (silent for one)."""
    from rich.progress import Progress

    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task("encrypted inference", total=total)

        def tick(done: int, _total: int) -> None:
            bar.update(task, completed=done)

        yield tick


def register(app: typer.Typer) -> None:
    @app.command("infer")
    def infer_cmd(
        ctx: typer.Context,
        offering_id: str = typer.Argument(..., help="Offering id."),
        input: Path = typer.Option(
            ..., "--input", "-i", exists=True, dir_okay=False, help="CSV of features (or .npy)."
        ),
        output: Path | None = typer.Option(
            None, "--output", "-o", help="Write predictions here (CSV); default stdout."
        ),
        encrypted: bool = typer.Option(False, "--encrypted", help="Homomorphically encrypted inference (CKKS)."),
        contract: str | None = typer.Option(None, "--contract", help="Contract id (default: your single active one)."),
        key_dir: Path | None = typer.Option(
            None, "--key-dir", envvar="SOM_KEY_DIR", help="Local key cache (0600 files)."
        ),
        layout: str = typer.Option(
            "auto", "--layout", help="auto (single for a few samples, else batch), batch (slot per sample) or single."
        ),
        idempotency_key: str | None = typer.Option(
            None,
            "--idempotency-key",
            help="Name this inference (request i is sent as KEY/i): running it again with the same key and "
            "input fetches the stored answers of requests already charged instead of paying twice.",
        ),
    ) -> None:
        """Run inference on an offering. With --encrypted, inputs never leave this machine in the clear."""
        if not encrypted:
            die(
                "only --encrypted inference runs here; for plaintext predictions use `som predict` (a gateway "
                "contract) or remote jobs (som job ...)"
            )
        try:
            x = read_features(input)
        except (ValueError, OSError) as e:
            die(f"cannot read {input}: {e}")
            return
        c = client(ctx)
        with handle_errors(), _progress(len(x)) as tick:
            out = c.infer_encrypted(
                offering_id,
                x,
                contract_id=contract,
                key_dir=key_dir,
                layout=layout,
                progress=tick,
                idempotency_key=idempotency_key,
            )
            post = c.he_plan(offering_id)["plan"].get("postprocess")
        remember_receipt(c.last_receipt)
        text = write_predictions(out, output, postprocess=post)
        if output is None:
            typer.echo(text, nl=False)
        else:
            receipt = c.last_receipt or {}
            typer.echo(
                f"wrote {len(out)} predictions to {output} "
                f"(usage {c.last_usage_id}, ledger index {receipt.get('index')})",
                err=True,
            )

    he = typer.Typer(help="Encrypted (HE) inference: compile, key sets.", no_args_is_help=True)
    app.add_typer(he, name="he")

    @he.command("compile")
    def he_compile(
        ctx: typer.Context,
        offering_id: str = typer.Argument(...),
        version: int = typer.Option(..., "--version", "-v", help="Version number."),
        calibration: Path = typer.Option(
            ..., "--calibration", exists=True, dir_okay=False, help=".npy or CSV samples."
        ),
    ) -> None:
        """Compile a model version for HE inference (provider)."""
        _compile(ctx, offering_id, version, calibration)

    @he.command("plan")
    def he_plan(ctx: typer.Context, offering_id: str = typer.Argument(...)) -> None:
        """Show an offering's public HE plan and model card."""
        with handle_errors():
            emit(ctx, client(ctx).he_plan(offering_id))

    @he.command("keysets")
    def he_keysets(ctx: typer.Context) -> None:
        """List your organisation's key sets."""
        with handle_errors():
            emit(
                ctx,
                client(ctx).list_keysets(),
                columns=["id", "offering_id", "contract_id", "status", "size", "layouts", "created_at"],
            )

    @he.command("keyset-delete")
    def he_keyset_delete(ctx: typer.Context, keyset_id: str = typer.Argument(...)) -> None:
        """Revoke one of your key sets."""
        with handle_errors():
            emit(ctx, client(ctx).delete_keyset(keyset_id))

    # `som offering compile` when the core 'offering' group is there (cmd_core registers first)
    for info in app.registered_groups:
        if info.name == "offering" and info.typer_instance is not None:

            @info.typer_instance.command("compile")
            def offering_compile(
                ctx: typer.Context,
                offering_id: str = typer.Argument(...),
                version: int = typer.Option(..., "--version", "-v", help="Version number."),
                calibration: Path = typer.Option(
                    ..., "--calibration", exists=True, dir_okay=False, help=".npy or CSV samples."
                ),
            ) -> None:
                """Compile a model version for HE inference (provider)."""
                _compile(ctx, offering_id, version, calibration)

            break
