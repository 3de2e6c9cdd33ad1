"""``som job``: submit sealed remote jobs and follow them; providers approve custom code.

The reply key that opens a job's result is written to ``$SOM_JOB_KEYS`` (default
``~/.som/job-keys``), one 0600 file per job; ``som job result`` reads it from there.

Provider-hosted offerings: ``som job submit`` seals only to a key the provider vouched for with
the key of your contract (``--provider-key`` pins it explicitly); if your organisation's signing
key file exists (``--key-file``, ``$SOM_SIGNING_KEY``, ``~/.config/som/<org>.key``) the contract
must also carry your own acceptance signature.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import os
import re
import sys
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, die, emit

JOB_COLS = ["id", "offering_id", "kind", "status", "units", "charged", "error", "created_at"]


def _keys_dir() -> Path:
    return Path(os.environ.get("SOM_JOB_KEYS", str(Path.home() / ".som" / "job-keys")))


def _save_key(job_id: str, raw: bytes) -> Path:
    d = _keys_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{job_id}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    return path


def _fmt(path: Path, given: str | None) -> str:
    if given:
        return given
    ext = path.suffix.lower().lstrip(".")
    return ext if ext in ("csv", "npy", "npz") else "csv"


def _own_key(c: Any, key_file: Path | None) -> str | None:
    """The public key of this organisation's contract-signing key, if its file exists (never created here)."""
    from marketplace.sdk.contracts_api import default_key_path, load_signing_key

    path = key_file or default_key_path(re.sub(r"[^A-Za-z0-9._-]", "_", c.whoami()["org_name"]))
    if key_file is None and not path.exists():
        return None
    try:
        return load_signing_key(path, create=False).verify_key.to_text()
    except (ValueError, OSError) as e:
        die(f"cannot use signing key {path}: {e}")
        raise  # pragma: no cover - die exits


def _brief(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job.get(k) for k in JOB_COLS + ["code_digest", "error_reason", "usage_id", "finished_at"]}


def register(app: typer.Typer) -> None:
    job = typer.Typer(help="Remote-execution jobs (inputs and results sealed end to end).", no_args_is_help=True)
    app.add_typer(job, name="job")

    @job.command("submit")
    def submit(
        ctx: typer.Context,
        offering: str = typer.Argument(..., help="Offering id."),
        kind: str = typer.Option("predict", "--kind", help="predict | evaluate | custom"),
        input: Path = typer.Option(..., "--input", exists=True, dir_okay=False, help="CSV / .npy / .npz data."),
        format: str = typer.Option(None, "--format", help="csv | npy | npz (default: from the file name)"),
        code: Path = typer.Option(None, "--code", exists=True, dir_okay=False, help="custom: the main.py to run"),
        units: int = typer.Option(None, "--units", help="Rows to pay for (default: counted from the input)."),
        cpu_seconds: int = typer.Option(None, "--cpu-seconds"),
        memory_mb: int = typer.Option(None, "--memory-mb"),
        wall_seconds: float = typer.Option(None, "--wall-seconds"),
        contract: str = typer.Option(None, "--contract", help="Contract id (default: your single live one)."),
        wait: bool = typer.Option(False, "--wait", help="Wait for the job and write its result."),
        out: Path = typer.Option(None, "--out", help="With --wait: where to write the result body."),
        provider_key: str = typer.Option(
            None,
            "--provider-key",
            help="Pin the provider's key (ed25519:...) the "
            "compute site's sealing key must be vouched for by (default: your contract's).",
        ),
        key_file: Path = typer.Option(
            None,
            "--key-file",
            help="Your organisation's signing key file: the contract "
            "must carry your acceptance signature (default: the one `som contract` uses, if any).",
        ),
    ) -> None:
        """Seal INPUT to the compute site's key and submit it. Prints the job id."""
        from marketplace.sdk.jobs_api import SealKeyRefused

        limits = {
            k: v
            for k, v in (("cpu_seconds", cpu_seconds), ("memory_mb", memory_mb), ("wall_seconds", wall_seconds))
            if v
        }
        c = client(ctx)
        try:
            sub = c.submit_job(
                offering,
                kind,
                input.read_bytes(),
                format=_fmt(input, format),
                code=code.read_text() if code else None,
                units=units,
                limits=limits or None,
                contract_id=contract,
                provider_key=provider_key,
                consumer_key=_own_key(c, key_file),
            )
        except SealKeyRefused as e:
            die(f"{e}. Ask the provider for its key and pass --provider-key, or check the agent's --signing-key.")
        path = _save_key(sub.id, sub.reply_key.unsafe_private_bytes())
        if not wait:
            emit(ctx, {**_brief(sub.job), "reply_key": str(path)})
            return
        final = c.wait_job(sub.id, timeout=3600)
        if final["status"] != "succeeded":
            emit(ctx, _brief(final))
            die(f"job {sub.id} {final['status']}: {final.get('error') or ''}")
        _write_result(ctx, c, sub.id, out)

    def _write_result(ctx: typer.Context, c: Any, job_id: str, out: Path | None) -> None:
        from crypto.sealing import SealKeyPair

        key = _keys_dir() / f"{job_id}.key"
        if not key.exists():
            die(f"no reply key for {job_id} in {_keys_dir()} (set SOM_JOB_KEYS to where `som job submit` ran)")
        res = c.job_result(job_id, SealKeyPair.from_private_bytes(key.read_bytes()))
        info = {
            "id": job_id,
            "kind": res.kind,
            "format": res.format,
            "metrics": res.metrics,
            "outputs": list(res.outputs),
        }
        if res.body:
            if out is not None:
                out.write_bytes(res.body)
                info["written"] = str(out)
            elif not ctx.find_root().obj.json:
                sys.stdout.buffer.write(res.body)
                return
        if res.stdout:
            info["stdout"] = res.stdout[-2000:]
        emit(ctx, info)

    @job.command("status")
    def status(ctx: typer.Context, job_id: str) -> None:
        """A job's state."""
        emit(ctx, _brief(client(ctx).job(job_id)))

    @job.command("show")
    def show(ctx: typer.Context, job_id: str) -> None:
        """Everything about a job, including custom code (for review)."""
        emit(ctx, client(ctx).job(job_id))

    @job.command("list")
    def list_(
        ctx: typer.Context,
        role: str = typer.Option("consumer", help="consumer (your jobs) | provider (jobs on your offerings)"),
        status: str = typer.Option(None, help="Only this status (e.g. awaiting_approval)."),
        offering: str = typer.Option(None, help="Only this offering."),
    ) -> None:
        """List jobs."""
        emit(
            ctx, [_brief(j) for j in client(ctx).jobs(role=role, status=status, offering_id=offering)], columns=JOB_COLS
        )

    @job.command("result")
    def result(
        ctx: typer.Context, job_id: str, out: Path = typer.Option(None, "--out", help="Write the body here.")
    ) -> None:
        """Fetch and open the result (with the reply key saved at submission)."""
        _write_result(ctx, client(ctx), job_id, out)

    @job.command("cancel")
    def cancel(ctx: typer.Context, job_id: str) -> None:
        """Cancel a job that has not finished (its reserved units are released)."""
        emit(ctx, _brief(client(ctx).cancel_job(job_id)))

    @job.command("approve")
    def approve(
        ctx: typer.Context,
        job_id: str,
        digest: str = typer.Option(
            None, "--digest", help="The code digest you reviewed (default: the job's, after showing it)."
        ),
    ) -> None:
        """Approve a custom job's exact code (provider). Review it first with `som job show`."""
        c = client(ctx)
        if digest is None:
            j = c.job(job_id)
            digest = j.get("code_digest")
            if not digest:
                die(f"job {job_id} has no code to approve")
        emit(ctx, _brief(c.approve_job(job_id, str(digest))))

    @job.command("reject")
    def reject(
        ctx: typer.Context,
        job_id: str,
        reason: str = typer.Option("", "--reason"),
        digest: str = typer.Option(None, "--digest"),
    ) -> None:
        """Reject a custom job's code (provider)."""
        c = client(ctx)
        chosen = digest or c.job(job_id).get("code_digest")
        if not chosen:
            die(f"job {job_id} has no code to reject")
        emit(ctx, _brief(c.reject_job(job_id, str(chosen), reason)))
