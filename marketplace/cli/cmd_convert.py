"""``som convert``: a trained scikit-learn or PyTorch model -> an artifact the marketplace accepts.

Runs on the provider's own machine: it loads the provider's own pickle (``.joblib``/``.pkl``) or
torch file locally, which is safe there and only there; the server refuses pickles.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
from pathlib import Path

import typer

from marketplace.cli.common import client, die, emit, err_console

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    @app.command("convert")
    def convert(
        ctx: typer.Context,
        model: Path = typer.Argument(
            ..., exists=True, dir_okay=False, help="Your own .joblib/.pkl (scikit-learn) or .pt (torch) file"
        ),
        out: Path = typer.Option(
            None, "--out", "-o", help="Where to write the artifact (default: MODEL with .npz/.onnx)"
        ),
        fmt: str = typer.Option("npz", "--format", help="npz (som-layers-v1) | onnx (Gemm + activations)"),
        check: Path = typer.Option(
            None,
            "--check",
            exists=True,
            dir_okay=False,
            help="CSV of feature rows to compare on (default: generated probe rows)",
        ),
        upload: str = typer.Option(
            None, "--upload", metavar="OFFERING", help="Also upload it as a new version of OFFERING"
        ),
    ) -> None:
        """Convert a model you trained into an uploadable artifact, checked against the original."""
        # Imported here: numpy and scikit-learn cost start-up time every other command would pay.
        import numpy as np

        from marketplace.sdk.convert import (
            UnsupportedModel,
            check_artifact,
            from_estimator,
            from_torch,
            load_local_model,
            probe_rows,
        )

        if fmt not in ("npz", "onnx"):
            die(f"--format must be npz or onnx, got {fmt!r}", 2)
        try:
            obj = load_local_model(model)
            is_torch = type(obj).__module__.startswith("torch")
            art = from_torch(obj, format=fmt) if is_torch else from_estimator(obj, format=fmt)  # type: ignore[arg-type]
            if not is_torch:
                rows = np.loadtxt(check, delimiter=",", ndmin=2) if check else probe_rows(obj, art.input_dim)
                art = check_artifact(art, obj, rows)
        except UnsupportedModel as e:
            die(f"{model.name}: {e}", 2)
            return
        except (ValueError, OSError, AttributeError, TypeError) as e:
            die(f"{model.name}: could not read it as a model ({e})", 2)
            return
        dest = out or model.with_suffix("." + fmt)
        dest.write_bytes(art.data)
        info = {
            "artifact": str(dest),
            "format": art.format,
            "source": art.source,
            "input_shape": art.input_shape,
            "outputs": art.output_dim,
            "bytes": len(art.data),
            "max_abs_error": art.max_abs_error,
        }
        if upload:
            v = client(ctx).upload_version(upload, art.data, format=art.format, input_shape=art.input_shape)
            info["version"] = v.get("number")
            info["version_id"] = v.get("id")
        emit(ctx, info)
        if not upload:
            err_console.print(
                f"next: som offering upload OFFERING {dest} --input-shape {art.input_dim}", highlight=False
            )
