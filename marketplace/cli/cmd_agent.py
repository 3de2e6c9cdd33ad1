"""``som agent``: run the provider agent beside the weights; manage agent keys.

``som agent --offering ID --model PATH [--calibration cal.npy] [--signing-key FILE]`` runs until
interrupted, connecting outbound to SOM_URL with the agent key in SOM_API_KEY (read once, then
dropped from the process's environment). Custom jobs run in the job jail (docs/jobs.md); an agent
whose machine cannot jail does not take them unless SOM_UNSAFE_UNJAILED_CUSTOM_JOBS=true. The signing key is
the provider's offer-signing key file (``--signing-key``, else ``$SOM_SIGNING_KEY``, else
``~/.config/som/<org name>.key`` if it exists): with it the agent vouches for its sealing key,
and consumers refuse to seal job inputs to an agent that does not.
``som agent key create --offering ID`` (with a provider key) makes that agent key.
``som agent review --syft-dir DIR`` (with a provider key, not an agent key) mirrors custom jobs
awaiting approval into a syft-job folder for review with syft-job's tooling and forwards the
approvals and rejections made there to the marketplace, bound to the code's digest
(:mod:`marketplace.agent.syft_review`; it never runs jobs).
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import logging
import re
from pathlib import Path

import typer

from marketplace.cli.common import client, die, emit, state


def _federate(ctx: typer.Context, fed_id: str, data: Path | None, wait: float) -> None:
    """``som agent --federation ID --data FILE.csv``: the participant loop (marketplace.federated)."""
    if data is None:
        die("--data FILE.csv is required with --federation")
        return
    # Imported here: Flower loads only for federation participants, not for every `som` command.
    from marketplace.federated import learning, participant
    from marketplace.federated.recipe import Recipe

    c = client(ctx)
    c.join_federation(fed_id, samples=0)  # join first (only participants may read the recipe); run() declares the rows
    fed = c.federation(fed_id)
    try:
        x, y = learning.load_csv(data.read_bytes(), dim=Recipe.from_dict(fed["recipe"]).dim)
    except ValueError as e:
        die(f"{data}: {e}")
    out = participant.run(c, fed_id, x, y, wait=wait)
    emit(ctx, {k: out[k] for k in ("id", "status", "rounds_done", "epsilon_spent", "result_version_id", "answered")})


def register(app: typer.Typer) -> None:
    agent = typer.Typer(help="The provider agent (weights stay on this machine).", invoke_without_command=True)
    app.add_typer(agent, name="agent")

    @agent.callback()
    def run(
        ctx: typer.Context,
        offering: list[str] = typer.Option(
            None, "--offering", help="Offering id to serve (repeatable; default: all of the key's)."
        ),
        model: Path = typer.Option(
            None, "--model", exists=True, dir_okay=False, help="The model artifact (.npz or .onnx)."
        ),
        calibration: Path = typer.Option(
            None,
            "--calibration",
            exists=True,
            dir_okay=False,
            help="Calibration .npy: compile the HE plan here, publish only the public plan.",
        ),
        seal_key: Path = typer.Option(None, "--seal-key", help="Sealing key file (0600; default: next to the model)."),
        signing_key: Path = typer.Option(
            None,
            "--signing-key",
            help="The provider's offer-signing key file (default: $SOM_SIGNING_KEY, "
            "else ~/.config/som/<org>.key): vouches for the sealing key; without it consumers refuse to seal jobs.",
        ),
        name: str = typer.Option("", "--name", help="A name shown to the provider."),
        workdir: Path = typer.Option(None, "--workdir", help="Scratch folder for custom jobs."),
        lease_wait: float = typer.Option(20.0, "--lease-wait", help="Long-poll wait in seconds."),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
        federation: str = typer.Option("", "--federation", help="Take part in this federation (with --data)."),
        data: Path = typer.Option(
            None,
            "--data",
            exists=True,
            dir_okay=False,
            help="The participant's training CSV (features + 0/1 label); it never leaves.",
        ),
    ) -> None:
        """Run the agent (when no subcommand is given)."""
        if ctx.invoked_subcommand is not None:
            return
        if federation:
            _federate(ctx, federation, data, lease_wait)
            return
        if model is None:
            die("--model is required to run the agent (or use `som agent key create`)")
        st = state(ctx)
        if not st.api_key:
            die("no agent key: set SOM_API_KEY to a key from `som agent key create`")
        logging.basicConfig(
            level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
        )
        from marketplace.agent.runner import AgentConfig, forget_env, run_forever

        forget_env("SOM_API_KEY")  # read once: no child and no reader of /proc/<pid>/environ sees it
        from marketplace.sdk.contracts_api import default_key_path, load_signing_key

        if signing_key is None:
            org = client(ctx).whoami()["org_name"]
            found = default_key_path(re.sub(r"[^A-Za-z0-9._-]", "_", org))
            signing_key = found if found.exists() else None
        if signing_key is not None:
            try:
                load_signing_key(signing_key, create=False)
            except (ValueError, OSError) as e:
                die(f"cannot use signing key {signing_key}: {e}")
        run_forever(
            AgentConfig(
                url=st.url,
                api_key=str(st.api_key),
                model_path=model,
                offering_ids=list(offering or []),
                seal_key_path=seal_key,
                signing_key_path=signing_key,
                calibration_path=calibration,
                name=name,
                workdir=workdir,
                lease_wait=lease_wait,
            )
        )

    key = typer.Typer(help="Agent keys (bound to your organisation and offerings).", no_args_is_help=True)
    agent.add_typer(key, name="key")

    @key.command("create")
    def key_create(
        ctx: typer.Context,
        offering: list[str] = typer.Option(..., "--offering", help="Offering id (repeatable)."),
        name: str = typer.Option("agent", "--name"),
        ttl_days: int = typer.Option(365, "--ttl-days"),
    ) -> None:
        """Create an agent key (provider). The key is shown once."""
        emit(ctx, client(ctx).create_agent_key(list(offering), name=name, ttl_days=ttl_days))

    @agent.command("review")
    def review(
        ctx: typer.Context,
        syft_dir: Path = typer.Option(
            ...,
            "--syft-dir",
            file_okay=False,
            help="The syft-job folder to mirror code requests into (created if missing).",
        ),
        email: str = typer.Option(None, "--email", help="Your syft-job identity (default: <org id>@som.invalid)."),
        offering: list[str] = typer.Option(None, "--offering", help="Only this offering (repeatable; default: all)."),
        interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between syncs."),
        once: bool = typer.Option(False, "--once", help="Sync once, print what was done and exit."),
        verbose: bool = typer.Option(False, "--verbose", "-v"),
    ) -> None:
        """Review custom-job code with syft-job (provider): mirror jobs awaiting approval into
        --syft-dir; approve or reject them there (syft_job.get_client(DIR, EMAIL).jobs[...]
        .approve() / .reject(reason)); this forwards the decisions, bound to the code's digest.
        Approved jobs run only in the som sandbox; never run syft-job's runner on this folder."""
        import dataclasses
        import threading

        from marketplace.agent.syft_review import SyftReviewBridge, provider_email

        logging.basicConfig(
            level=logging.INFO if verbose or not once else logging.WARNING, format="%(asctime)s %(name)s %(message)s"
        )
        api = client(ctx)
        who = api.whoami()
        if "provider" not in who.get("roles", []):
            die("som agent review needs a provider key (SOM_API_KEY), not an agent or consumer key")
        bridge = SyftReviewBridge(
            api, syft_dir, email=email or provider_email(str(who["org_id"])), offering_ids=list(offering or [])
        )
        if once:
            emit(ctx, {"syft_dir": str(bridge.dir), "email": bridge.email, **dataclasses.asdict(bridge.sync())})
            return
        stop = threading.Event()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        bridge.run(stop, interval=interval)

    @agent.command("list")
    def list_(ctx: typer.Context, offering: str = typer.Option(None, "--offering")) -> None:
        """Your organisation's agents and whether they are online (provider)."""
        emit(
            ctx,
            client(ctx).agents(offering_id=offering),
            columns=["id", "name", "offering_ids", "online", "last_seen_at"],
        )
