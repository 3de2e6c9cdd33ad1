"""``som worker``: run a Celery compute worker for scale-out deployments.

``SOM_JOB_BACKEND=celery som worker --concurrency 2`` consumes HE evaluations and
marketplace-hosted jobs from Redis (``SOM_REDIS_URL``). The host must see the same data directory
as the API replicas (``SOM_DATA_DIR``: the blob store) and their key directory (``SOM_KEY_DIR``:
``kek.json`` or ``SOM_KEK``, ``job_seal.key``, ``task_mac.key``), e.g. a shared volume and a
secrets mount; it needs no database and no API process.
See docs/deployment.md.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import os
import socket
from pathlib import Path

import typer

from marketplace.cli.common import die


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        data_dir: Path = typer.Option(
            None, envvar="SOM_DATA_DIR", help="The data directory shared with the API replicas."
        ),
        concurrency: int = typer.Option(None, "--concurrency", "-c", help="Worker processes (default SOM_WORKERS)."),
        pool: str = typer.Option("prefork", "--pool", help="Celery pool: prefork, solo or threads."),
        name: str = typer.Option("", "--name", help="Worker name (default som-<pid>@<hostname>)."),
        log_level: str = typer.Option("INFO", "--log-level", help="DEBUG, INFO, WARNING or ERROR."),
    ) -> None:
        """Run a compute worker (Celery over Redis) until interrupted."""
        from marketplace.settings import Settings, SettingsError
        from marketplace.worker.celery_app import QUEUE, make_celery

        s = Settings(data_dir=data_dir) if data_dir is not None else Settings()
        try:
            s.check_secrets()
        except SettingsError as e:
            die(str(e), 2)
        n = s.workers if concurrency is None else concurrency
        if n < 1:
            die(f"--concurrency must be >= 1, got {n}", 2)
        if pool not in ("prefork", "solo", "threads"):
            die(f"--pool must be prefork, solo or threads, got {pool!r}", 2)
        if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            die(f"--log-level must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}", 2)
        from marketplace.emptycwd import enter_empty_cwd

        enter_empty_cwd(s)  # docs/deployment.md: the worker runs in an empty working directory
        root = s.data_dir
        if not root.is_dir():
            typer.echo(
                f"warning: {root} does not exist; the worker must share the API replicas' data directory", err=True
            )
        from marketplace.custody import notice, resolve_key_dir

        os.umask(0o077)
        try:
            typer.echo("som worker: " + notice(s, resolve_key_dir(s, create=False)), err=True)
        except SettingsError as e:
            die(str(e), 2)
        app = make_celery(s, worker=True)
        app.worker_main(
            [
                "worker",
                f"--concurrency={n}",
                f"--pool={pool}",
                f"--loglevel={log_level.upper()}",
                f"--queues={QUEUE}",
                f"--hostname={name or f'som-{os.getpid()}@{socket.gethostname()}'}",
                "--without-gossip",
                "--without-mingle",
            ]
        )
