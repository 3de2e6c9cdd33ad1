"""``som ledger`` (export, verify, witness, checkpoint) and ``som receipt verify``.

``verify`` and ``receipt verify`` are offline: they use ``crypto`` and ``contracts`` only, never
the server. ``export``, ``key``, ``witness`` and ``checkpoint`` talk to the server. The verifiers
trust the log key given with ``--vkey`` or pinned in the local state (:mod:`marketplace.cli.trust`),
never the ``log.vkey`` shipped inside an export.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import base64
import json
import sys
from pathlib import Path
from typing import Any

import typer

from marketplace.cli.common import client, die, emit, err_console, machine, state, write_private

LEDGER_HELP = "The tamper-evident usage ledger: export, verify offline, witness, checkpoints."

_VKEY_HELP = "The log's vkey obtained out of band: a C2SP vkey string, or a file holding one."
_ORIGIN_HELP = "The log's origin you expect (default: the trusted key's name)."
_STATE_HELP = (
    "Trust state (JSON; the file `som ledger witness --state` keeps). Without --vkey, the log "
    "key pinned there is trusted; if none is, the first verified key is pinned (TOFU)."
)


def verify_dir(
    path: Path, *, trusted_vkey: str, origin: str | None = None, trusted: Path | None = None
) -> dict[str, Any]:
    """Verify an export directory offline against ``trusted_vkey`` (and ``origin``, default the
    key's name); return a summary dict.

    One pass over ``leaves.jsonl``: each line is decoded once; its leaf bytes are hashed into the
    Merkle tree (:func:`crypto.logverify.verify_export_dir`: roots at every checkpoint,
    signatures, contiguity, the kept checkpoint) and parsed once into the compliance walk
    (:class:`contracts.compliance.ComplianceWalk`). Raises
    :class:`crypto.logverify.LogVerificationError` in preference to
    :class:`contracts.errors.ComplianceViolation` (a leaf breaks its contract; the first one is
    kept while the Merkle pass goes on to the end).
    """
    from contracts.compliance import ComplianceWalk
    from contracts.errors import ComplianceViolation
    from crypto.logverify import verify_export_dir

    trusted_note = trusted.read_bytes() if trusted is not None else None
    walk = ComplianceWalk()
    add = walk.add_leaf
    violation: ComplianceViolation | None = None

    def leaf_check(index: int, leaf: bytes) -> None:
        nonlocal violation
        if violation is None:
            try:
                add(index, leaf)
            except ComplianceViolation as e:
                violation = e

    log = verify_export_dir(
        path,
        trusted_vkey=trusted_vkey,
        origin=origin,
        trusted_checkpoint=trusted_note,
        leaf_check=leaf_check,
    )
    if violation is not None:
        raise violation
    comp = walk.summary()
    return {
        "log": str(log),
        "origin": log.origin,
        "leaves": log.leaves,
        "checkpoints": log.checkpoints,
        "latest_size": log.latest_size,
        "latest_root": base64.b64encode(log.latest_root).decode(),
        "trusted_size": log.trusted_size,
        "compliance": comp.to_dict(),
    }


def register(app: typer.Typer) -> None:
    led = typer.Typer(help=LEDGER_HELP, no_args_is_help=True)
    app.add_typer(led, name="ledger")
    rec = typer.Typer(help="Usage receipts.", no_args_is_help=True)
    app.add_typer(rec, name="receipt")

    @led.command("export")
    def export(
        ctx: typer.Context,
        directory: Path = typer.Argument(..., help="Directory to write (created)."),
    ) -> None:
        """Export the ledger: leaves.jsonl, checkpoints/<size>.note, log.vkey (compliance, admin)."""
        c = client(ctx)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "log.vkey").write_text(c.ledger_key() + "\n")
        cps = c.ledger_checkpoints()
        cp_dir = directory / "checkpoints"
        cp_dir.mkdir(exist_ok=True)
        for cp in cps:
            (cp_dir / f"{cp['size']}.note").write_text(cp["note"])
        # Only leaves covered by the newest checkpoint we saved: the export is then self-contained.
        latest = max((cp["size"] for cp in cps), default=0)
        n = 0
        tmp = directory / ".leaves.jsonl.tmp"
        with tmp.open("wb") as f:
            for line in c.ledger_export_lines(size=latest):
                f.write(line + b"\n")
                n += 1
        tmp.replace(directory / "leaves.jsonl")
        emit(ctx, {"directory": str(directory), "leaves": n, "checkpoints": len(cps), "latest_size": latest})

    @led.command("verify")
    def verify(
        ctx: typer.Context,
        directory: Path = typer.Argument(..., help="An export directory (`som ledger export`)."),
        trusted_checkpoint: Path | None = typer.Option(
            None, "--trusted-checkpoint", help="A signed checkpoint note you kept from before."
        ),
        vkey: str | None = typer.Option(None, "--vkey", help=_VKEY_HELP),
        origin: str | None = typer.Option(None, "--origin", help=_ORIGIN_HELP),
        state_file: Path | None = typer.Option(
            None, "--state", envvar="SOM_LEDGER_STATE", help=_STATE_HELP, show_default=False
        ),
    ) -> None:
        """Verify an export offline: leaf hashes, roots at every checkpoint, signatures,
        contiguity, consistency with a kept checkpoint, and every contract's totals against its terms.

        The log key trusted is the one given with --vkey, or the one pinned in --state (default
        ~/.config/som/ledger-state.json); the export's log.vkey is only compared with it. With
        neither, the export's key is pinned on first use (TOFU), with a notice on stderr: check its
        fingerprint out of band (`som ledger key`).

        Exit codes: 0 verified; 2 the export or --vkey/state cannot be read; 3 the log does not verify
        (changed, missing or reordered leaf, bad signature, fork, kept checkpoint of another history);
        4 a leaf breaks its contract; 5 the export's log key or origin is not the trusted one.
        """
        from contracts.errors import ComplianceViolation
        from crypto.logverify import LogVerificationError, UntrustedLogKey
        from marketplace.cli import trust

        st = state_file or trust.default_state_path()
        first_use = False
        try:
            if vkey is not None:
                log_key = trust.read_vkey_arg(vkey, origin)
            else:
                got = trust.pinned(st)
                if got is None:
                    first_use = True
                    shipped = (directory / "log.vkey").read_text()
                    got_key = trust.read_vkey_arg(shipped.strip(), origin)
                    log_key = trust.TrustedLog(
                        got_key.vkey, got_key.origin, f"first use: the export's log.vkey, to be pinned in {st}"
                    )
                else:
                    log_key = got
                    if origin is not None and origin != got.origin:
                        die(
                            f"the log is NOT the trusted one: --origin {origin!r} but {got.source} is {got.origin!r}",
                            trust.EXIT_UNTRUSTED,
                        )
        except trust.TrustError as e:
            die(str(e), 2)
        except OSError as e:
            die(f"cannot read the export: {e}", 2)
        try:
            summary = verify_dir(
                directory, trusted_vkey=log_key.vkey, origin=log_key.origin, trusted=trusted_checkpoint
            )
        except UntrustedLogKey as e:
            die(
                f"the log is NOT the trusted one ({log_key.source}): {e}. If the operator really "
                f"rotated its key, check the new one out of band and pass it with --vkey.",
                trust.EXIT_UNTRUSTED,
            )
        except LogVerificationError as e:
            die(f"ledger does NOT verify: {e}", 3)
        except ComplianceViolation as e:
            if first_use:
                trust.pin(st, log_key.vkey, log_key.origin)
                sys.stderr.write(trust.tofu_notice(log_key, st) + "\n")
            die(f"ledger does NOT comply: leaf {e.index}: {e}", 4)
        except OSError as e:
            die(f"cannot read the export: {e}", 2)
        if first_use:
            trust.pin(st, log_key.vkey, log_key.origin)
            sys.stderr.write(trust.tofu_notice(log_key, st) + "\n")
        if state(ctx).json:
            emit(ctx, summary)
            return
        comp = summary["compliance"]
        typer.echo(f"OK {summary['log']}")
        typer.echo(f"leaves per schema: {json.dumps(comp['per_schema'], sort_keys=True)}")
        from contracts.terms import format_minor

        for cid, t in comp["contracts"].items():
            amount = f"{t['currency']} {format_minor(t['amount_minor'], t['currency'])}" if t["currency"] else "0"
            typer.echo(
                f"contract {cid}: {t['charged_units']} units charged, {amount}, "
                f"{t['usage_records']} usage records ({t['released_records']} released)"
            )

    @led.command("key")
    def key_cmd(
        ctx: typer.Context,
        out: Path | None = typer.Option(None, "--out", help="Also write the vkey to this file."),
    ) -> None:
        """Fetch the log's vkey (GET /v1/ledger/key) and show its fingerprint, to compare with the
        one the operator publishes before passing it to `som ledger verify --vkey`."""
        from crypto.logverify import vkey_fingerprint

        vk = client(ctx).ledger_key()
        if out is not None:
            out.write_text(vk + "\n")
        emit(ctx, {"vkey": vk, "fingerprint": vkey_fingerprint(vk)})

    @led.command("checkpoint")
    def checkpoint(
        ctx: typer.Context,
        sign: bool = typer.Option(False, "--sign", help="Sign a new checkpoint now (compliance, admin)."),
        out: Path | None = typer.Option(None, "--out", help="Also write the note to this file."),
    ) -> None:
        """Show the latest signed checkpoint (or sign one with --sign)."""
        c = client(ctx)
        note = c.sign_ledger_checkpoint()["note"].encode() if sign else c.ledger_checkpoint()
        if out is not None:
            out.write_bytes(note)
        sys.stdout.write(note.decode())

    @led.command("witness")
    def witness(
        ctx: typer.Context,
        state_file: Path = typer.Option(..., "--state", help="Witness state (JSON; created on first run)."),
        name: str = typer.Option("som-witness", "--name", help="The witness's key name."),
        key: Path | None = typer.Option(None, "--key", help="Witness signing key (default: STATE.key; created)."),
    ) -> None:
        """Cosign the latest checkpoint after checking it extends the last one this witness saw."""
        from crypto.checkpoint import open_checkpoint
        from crypto.errors import InvalidProof, InvalidSignature
        from crypto.note import NoteVerifier, add_signature_lines
        from crypto.signing import SigningKey
        from crypto.witness import ForkDetected, Witness, WitnessError, WitnessState

        c = client(ctx)
        key_path = key or state_file.with_name(state_file.name + ".key")
        if key_path.exists():
            sk = SigningKey.from_private_bytes(base64.b64decode(key_path.read_text().strip()))
        else:
            sk = SigningKey.generate()
            write_private(key_path, base64.b64encode(sk.unsafe_private_bytes()) + b"\n")
        saved: dict[str, Any] = json.loads(state_file.read_text()) if state_file.exists() else {}
        server_vkey = c.ledger_key()
        log_vkey = saved.get("log_vkey", server_vkey)
        if log_vkey != server_vkey:
            die(
                "the server now presents a different log key than the one this witness follows "
                f"({log_vkey}); refusing. If the operator rotated keys, start a new state file.",
                5,
            )
        prev = WitnessState.from_json(saved["state"]) if "state" in saved else None
        note = c.ledger_checkpoint()
        w = Witness(name, sk, log_vkey)
        try:
            size = open_checkpoint(note, NoteVerifier.from_vkey(log_vkey)).size
        except InvalidSignature as e:
            die(f"the checkpoint is not signed by the log key: {e}", 5)
        old = prev.size if prev is not None else 0
        proof: list[bytes] = []
        if prev is not None and 0 < old < size:
            got = c.consistency_proof(old, size)
            proof = [base64.b64decode(h) for h in got["proof"]]
        try:
            new_state, line = w.update(prev, note, old, proof)
        except ForkDetected as e:
            die(f"FORK: {e}", 6)
        except InvalidProof as e:
            die(
                f"refusing to cosign: the log's checkpoint of size {size} is not consistent with "
                f"the one this witness cosigned at size {old} ({e}); the log rewrote history "
                f"or forked. Keep {state_file} and the served note as evidence.",
                6,
            )
        except (WitnessError, InvalidSignature) as e:
            die(f"refusing to cosign: {e}", 6)
        cosigned = add_signature_lines(note, line)
        saved = {
            **saved,
            "log_vkey": log_vkey,
            "witness_vkey": w.vkey,
            "state": new_state.to_json(),
            "cosigned": cosigned.decode(),
        }
        write_private(state_file, json.dumps(saved, indent=2).encode() + b"\n")
        emit(ctx, {"cosigned_size": new_state.size, "previous_size": old, "witness_vkey": w.vkey})

    @rec.command("show")
    def receipt_show(
        ctx: typer.Context,
        index: int | None = typer.Argument(None, help="The leaf index of the use (the receipt header names it)."),
        last: bool = typer.Option(False, "--last", help="The receipt of this CLI's last metered call."),
        usage: str | None = typer.Option(None, "--usage", help="The usage id of a metered call (X-Som-Usage-Id)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Also write the receipt (JSON) here."),
    ) -> None:
        """Fetch and print a receipt: what was charged, where it sits in the log, the checkpoint."""
        from marketplace.cli.common import last_receipt_path

        if sum(x is not None and x is not False for x in (index, usage, last or None)) != 1:
            die("give exactly one of INDEX, --last or --usage USAGE_ID", 2)
        if last:
            path = last_receipt_path()
            try:
                receipt = json.loads(path.read_text())
            except (OSError, ValueError):
                die(f"no receipt kept yet at {path}: run a metered command (som infer, som predict) first", 2)
                return
            index = int(receipt["index"])
        c = client(ctx)
        receipt = c.receipt(usage) if usage is not None else c.ledger_receipt(int(index or 0))
        if "receipt" in receipt and "index" not in receipt:
            receipt = receipt["receipt"]
        if out is not None:
            write_private(out, json.dumps(receipt, indent=2).encode() + b"\n")
        record = json.loads(base64.b64decode(receipt["leaf"]))
        checkpoint = receipt["checkpoint"].splitlines()
        emit(
            ctx,
            receipt
            if machine(ctx)
            else {
                "index": receipt["index"],
                "schema": record.get("schema"),
                "contract_id": record.get("contract_id"),
                "mode": record.get("mode"),
                "units": record.get("units"),
                "amount_minor": record.get("amount_minor"),
                "outcome": record.get("outcome"),
                "time": record.get("time"),
                "checkpoint": f"{checkpoint[0]} size {checkpoint[1] if len(checkpoint) > 1 else '?'}",
                "file": str(out) if out else None,
            },
        )
        if not machine(ctx):
            err_console.print(
                f"next: som receipt verify {out or 'RECEIPT.json'} --vkey LOG_KEY   (offline)", highlight=False
            )

    @rec.command("verify")
    def receipt_verify(
        ctx: typer.Context,
        receipt_file: Path = typer.Argument(..., help="A receipt (JSON) from a metered response."),
        vkey: str | None = typer.Option(None, "--vkey", help=_VKEY_HELP),
        origin: str | None = typer.Option(None, "--origin", help=_ORIGIN_HELP),
        state_file: Path | None = typer.Option(
            None,
            "--state",
            envvar="SOM_LEDGER_STATE",
            show_default=False,
            help="Trust state (JSON; as `som ledger verify --state`): without --vkey, the log key pinned there.",
        ),
    ) -> None:
        """Verify one receipt offline: leaf hash, inclusion proof against the checkpoint, signature
        by the log key you trust (--vkey, or the one pinned in --state by `som ledger verify`).

        Exit codes: 0 verified; 2 the receipt, --vkey or state cannot be read, or no key is trusted
        yet; 3 the receipt does not verify against the trusted key and origin.
        """
        from crypto.errors import CryptoError
        from marketplace.cli import trust
        from marketplace.sdk.ledger_api import verify_receipt

        st = state_file or trust.default_state_path()
        try:
            log_key = trust.read_vkey_arg(vkey, origin) if vkey is not None else trust.pinned(st)
        except trust.TrustError as e:
            die(str(e), 2)
        if log_key is None:
            die(
                f"no trusted log key: pass --vkey FILE_OR_TEXT (the log's key obtained out of band) "
                f"or pin one in {st} with `som ledger verify`",
                2,
            )
            return
        if origin is not None and origin != log_key.origin:
            die(f"receipt NOT from the trusted log: --origin {origin!r} but {log_key.source} is {log_key.origin!r}", 3)
        try:
            obj = json.loads(receipt_file.read_text())
            if isinstance(obj, dict) and "receipt" in obj and "index" not in obj:
                obj = obj["receipt"]
            cp = verify_receipt(obj, log_key.vkey, origin=log_key.origin)
        except (OSError, ValueError) as e:
            die(f"not a readable receipt: {e}", 2)
        except CryptoError as e:
            die(
                f"receipt does NOT verify against the trusted log key {log_key.origin} "
                f"(fingerprint {log_key.fingerprint}, {log_key.source}): {e}",
                3,
            )
        record = json.loads(base64.b64decode(obj["leaf"]))
        emit(
            ctx,
            {
                "ok": True,
                "index": obj["index"],
                "checkpoint_size": cp.size,
                "origin": cp.origin,
                "record": record,
            },
        )
