"""Where the offline verifiers (``som ledger verify``, ``som receipt verify``) get the log key
they trust: ``--vkey`` (text or a file) and ``--origin``, or the key pinned in the officer's
local state on first use (trust on first use, with a loud notice).

The state file is the one ``som ledger witness --state FILE`` keeps (JSON; ``log_vkey`` is the
log key the witness follows, ``log_origin`` the pinned origin), so one file pins the log for the
witness and the verifiers. Default: ``$SOM_LEDGER_STATE``, else
``$XDG_CONFIG_HOME/som/ledger-state.json`` (``~/.config/som/ledger-state.json``).

Not for: verification itself (``crypto.logverify``, ``marketplace.sdk.ledger_api``) or fetching
anything from the server.
"""

from __future__ import annotations

# lazy imports: start-up cost. Every command imports what it needs inside its function, so that
# `som --help` and simple commands never load the service stack, numpy or the crypto libraries.
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.logverify import vkey_fingerprint
from crypto.note import NoteVerifier
from marketplace.cli.common import write_private

__all__ = [
    "EXIT_UNTRUSTED",
    "TrustError",
    "TrustedLog",
    "default_state_path",
    "pin",
    "pinned",
    "read_vkey_arg",
    "tofu_notice",
]

# The exit code for "the export's key or origin is not the trusted one" (as `som ledger
# witness` exits 5 when the server presents another log key).
EXIT_UNTRUSTED = 5


class TrustError(ValueError):
    """A --vkey that is not a vkey, or a state file that does not parse."""


@dataclass(frozen=True)
class TrustedLog:
    """The log key and origin a verifier trusts, and where they came from (for messages)."""

    vkey: str
    origin: str
    source: str

    @property
    def fingerprint(self) -> str:
        return vkey_fingerprint(self.vkey)


def default_state_path() -> Path:
    env = os.environ.get("SOM_LEDGER_STATE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "som" / "ledger-state.json"


def _check_vkey(text: str, what: str) -> str:
    try:
        NoteVerifier.from_vkey(text)
    except Exception as e:
        raise TrustError(f"{what} is not a C2SP note verifier key (name+keyid+base64): {e}") from e
    return text.strip()


def read_vkey_arg(value: str, origin: str | None) -> TrustedLog:
    """``--vkey``: a vkey string, or the path of a file holding one."""
    text, source = value, "--vkey"
    if "+" not in value or Path(value).is_file():
        try:
            text, source = Path(value).read_text(), f"--vkey {value}"
        except OSError as e:
            raise TrustError(f"--vkey {value}: not a vkey and not a readable file ({e})") from e
    vkey = _check_vkey(text, source)
    return TrustedLog(vkey, origin or NoteVerifier.from_vkey(vkey).name, source)


def _load(state: Path) -> dict[str, Any]:
    if not state.exists():
        return {}
    try:
        saved = json.loads(state.read_text())
    except (OSError, ValueError) as e:
        raise TrustError(f"cannot read the trust state {state}: {e}") from e
    if not isinstance(saved, dict):
        raise TrustError(f"the trust state {state} is not a JSON object")
    return saved


def pinned(state: Path) -> TrustedLog | None:
    """The log pinned in ``state``, or None if nothing is pinned yet."""
    saved = _load(state)
    if "log_vkey" not in saved:
        return None
    vkey = saved["log_vkey"]
    if not isinstance(vkey, str):
        raise TrustError(f"the trust state {state}: log_vkey is not a string")
    vkey = _check_vkey(vkey, f"log_vkey in {state}")
    origin = saved.get("log_origin")
    if not isinstance(origin, str):
        origin = NoteVerifier.from_vkey(vkey).name
    return TrustedLog(vkey, origin, f"pinned in {state}")


def pin(state: Path, vkey: str, origin: str) -> TrustedLog:
    """Pin ``vkey`` and ``origin`` in ``state`` (mode 0600, atomic; other keys kept)."""
    saved = _load(state)
    saved.update({"log_vkey": vkey.strip(), "log_origin": origin})
    write_private(state, json.dumps(saved, indent=2).encode() + b"\n")
    return TrustedLog(vkey.strip(), origin, f"pinned in {state}")


def tofu_notice(log: TrustedLog, state: Path) -> str:
    return (
        "NOTICE: TRUST ON FIRST USE. Nothing pinned a log key yet, so this run PINNED the key\n"
        "shipped with the data (nobody vouched for it):\n"
        f"  vkey:        {log.vkey}\n"
        f"  fingerprint: {log.fingerprint}\n"
        f"  origin:      {log.origin}\n"
        f"  pinned in:   {state}\n"
        "Check the fingerprint OUT OF BAND now (the operator's published fingerprint, or\n"
        "`som ledger key` run against the server over a channel you trust). Later data signed\n"
        "by another key or for another origin is refused (exit 5). To trust a key explicitly\n"
        "instead, pass --vkey FILE_OR_TEXT (and --origin)."
    )
