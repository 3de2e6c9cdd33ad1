"""Issue 10 §3: the offline verifiers pin their trust root (as Go's sumdb and Sigstore clients do)
and never trust a key shipped with the data.

Against a real server (the app under uvicorn on loopback, SQLite) and the real `som` CLI in
subprocesses: the compliance officer exports the ledger; the attacker (an operator who can
rewrite the export or the served data, but does not hold the log key) removes a consumer's
charged usage leaves, rebuilds the tree, re-signs every checkpoint under a new key (and under a
new origin) and ships that key as ``log.vkey``. That history is self-consistent (it verifies
under its own key: the old behaviour), so only the key the officer pinned can tell.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from crypto.checkpoint import Checkpoint, sign_checkpoint
from crypto.errors import InvalidSignature
from crypto.logverify import vkey_fingerprint
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import NoteSigner
from crypto.signing import SigningKey
from marketplace.sdk import SomClient
from marketplace.sdk.ledger_api import verify_receipt
from marketplace.services import ledger
from tests.marketplace.test_ledger_support import contract_leaf, make_contract, usage

SOM = [sys.executable, "-m", "marketplace.cli"]
EXIT_DOES_NOT_VERIFY, EXIT_UNTRUSTED = 3, 5


def som(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SOM, *args], env=env, capture_output=True, text=True, timeout=120)  # noqa: S603


@pytest.fixture
def officer(live, tmp_path):  # type: ignore[no-untyped-def]
    """A seeded ledger on a live server; the officer's environment, with its own trust state."""
    world, url = live
    rt = world.rt
    c = make_contract(consumer_org=world.orgs["consumer"], provider_org=world.orgs["provider"], quota=1000)
    with rt.tx() as s:
        ledger.append(s, contract_leaf(c))
    for b in range(3):
        with rt.tx() as s:
            ledger.append_many(s, [usage(c, b * 5 + i, units=3) for i in range(5)])
        ledger.sign_checkpoint(rt)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update(
        {
            "SOM_URL": url,
            "SOM_API_KEY": world.keys["compliance"],
            "XDG_CONFIG_HOME": str(tmp_path / "config"),  # the default trust state lives here
            "HOME": str(tmp_path / "home"),
        }
    )
    return world, env


def export(env: dict[str, str], d: Path) -> Path:
    r = som("ledger", "export", str(d), env=env)
    assert r.returncode == 0, r.stderr
    return d


def out_of_band_key(env: dict[str, str], tmp_path: Path) -> Path:
    """What the officer fetched at setup and compared with the operator's published fingerprint."""
    f = tmp_path / "pinned.vkey"
    r = som("--json", "ledger", "key", "--out", str(f), env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["fingerprint"] == vkey_fingerprint(f.read_text())
    return f


def forge(src: Path, dst: Path, consumer_org: str, *, origin: str | None = None) -> tuple[NoteSigner, int]:
    """Drop the consumer's charged usage leaves, rebuild, re-sign under a new key; return it."""
    kept: list[bytes] = []
    removed = 0
    for line in (src / "leaves.jsonl").read_text().splitlines():
        leaf = base64.b64decode(json.loads(line)["leaf"])
        rec = json.loads(leaf)
        if (
            rec.get("schema") == "som.usage/v1"
            and rec.get("outcome") == "charged"
            and rec.get("consumer_org") == consumer_org
        ):
            removed += 1
            continue
        kept.append(leaf)
    assert removed > 0
    old_origin = Checkpoint.parse(next((src / "checkpoints").iterdir()).read_text().split("\n\n")[0] + "\n").origin
    name = origin or old_origin
    signer = NoteSigner(name, SigningKey.generate())
    tree = MerkleTree(kept)
    (dst / "checkpoints").mkdir(parents=True)
    (dst / "leaves.jsonl").write_text(
        "".join(
            json.dumps({"index": i, "leaf": base64.b64encode(x).decode()}, separators=(",", ":")) + "\n"
            for i, x in enumerate(kept)
        )
    )
    for size in sorted({len(kept) // 2, len(kept)}):
        (dst / "checkpoints" / f"{size}.note").write_bytes(
            sign_checkpoint(Checkpoint(name, size, tree.root(size)), signer)
        )
    (dst / "log.vkey").write_text(signer.verifier.vkey() + "\n")
    return signer, removed


@pytest.mark.parametrize("new_origin", [None, "evil.example/ledger"], ids=["same-origin", "new-origin"])
def test_export_resigned_under_a_new_key_is_refused(officer, tmp_path, new_origin):
    world, env = officer
    real = export(env, tmp_path / "real")
    pinned = out_of_band_key(env, tmp_path)
    forged = tmp_path / "forged"
    signer, _ = forge(real, forged, world.orgs["consumer"], origin=new_origin)

    # The forged export is self-consistent: trusting the key shipped inside it, it verifies.
    r = som("ledger", "verify", str(forged), "--vkey", signer.verifier.vkey(), env=env)
    assert r.returncode == 0, r.stderr
    # Against the key obtained out of band it is refused, naming expected vs got.
    r = som("ledger", "verify", str(forged), "--vkey", str(pinned), env=env)
    assert r.returncode == EXIT_UNTRUSTED, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert "NOT the trusted one" in err
    assert vkey_fingerprint(pinned.read_text()).replace(" ", "") in err.replace(" ", "")
    assert vkey_fingerprint(signer.verifier.vkey()).replace(" ", "") in err.replace(" ", "")
    if new_origin:
        assert new_origin in err
    # Keeping the real log.vkey beside the forged checkpoints: a signature failure (exit 3).
    (forged / "log.vkey").write_text(pinned.read_text())
    r = som("ledger", "verify", str(forged), "--vkey", str(pinned), env=env)
    want = EXIT_UNTRUSTED if new_origin else EXIT_DOES_NOT_VERIFY
    assert r.returncode in (EXIT_DOES_NOT_VERIFY, want), r.stderr
    assert r.returncode != 0
    # The real export still verifies with the pinned key (file or text).
    assert som("ledger", "verify", str(real), "--vkey", str(pinned), env=env).returncode == 0
    assert som("ledger", "verify", str(real), "--vkey", pinned.read_text().strip(), env=env).returncode == 0
    # And the expected origin is checked too.
    r = som("ledger", "verify", str(real), "--vkey", str(pinned), "--origin", "other.example/ledger", env=env)
    assert r.returncode == EXIT_UNTRUSTED and "other.example/ledger" in r.stderr


def test_trust_on_first_use_pins_and_refuses_a_later_key(officer, tmp_path):
    world, env = officer
    real = export(env, tmp_path / "real")
    state = tmp_path / "config" / "som" / "ledger-state.json"
    assert not state.exists()
    r = som("ledger", "verify", str(real), env=env)  # default state under XDG_CONFIG_HOME
    assert r.returncode == 0, r.stderr
    vk = (real / "log.vkey").read_text().strip()
    assert "TRUST ON FIRST USE" in r.stderr and vkey_fingerprint(vk) in r.stderr
    assert "OUT OF BAND" in r.stderr and str(state) in r.stderr
    saved = json.loads(state.read_text())
    assert saved["log_vkey"] == vk and state.stat().st_mode & 0o777 == 0o600
    # The second run uses the pinned key, quietly.
    r = som("ledger", "verify", str(real), env=env)
    assert r.returncode == 0 and "TRUST ON FIRST USE" not in r.stderr

    # A later export under another key is refused, with expected vs got fingerprints.
    forged = tmp_path / "forged"
    signer, _ = forge(export(env, tmp_path / "later"), forged, world.orgs["consumer"])
    r = som("ledger", "verify", str(forged), env=env)
    assert r.returncode == EXIT_UNTRUSTED, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    assert f"expected {saved['log_origin']} (fingerprint {vkey_fingerprint(vk)})" in err
    assert f"(fingerprint {vkey_fingerprint(signer.verifier.vkey())})" in err
    assert json.loads(state.read_text())["log_vkey"] == vk  # the pin is unchanged
    # An --origin that differs from the pinned one is refused too.
    r = som("ledger", "verify", str(real), "--origin", "evil.example/ledger", env=env)
    assert r.returncode == EXIT_UNTRUSTED and "evil.example/ledger" in r.stderr

    # The witness's state file is the same kind of state: pinned by `ledger verify --state`.
    wstate = tmp_path / "witness.json"
    assert som("ledger", "verify", str(real), "--state", str(wstate), env=env).returncode == 0
    r = som("--json", "ledger", "witness", "--state", str(wstate), env=env)
    assert r.returncode == 0, r.stderr
    after = json.loads(wstate.read_text())
    assert after["log_vkey"] == vk and after["log_origin"] == saved["log_origin"] and "state" in after
    r = som("ledger", "verify", str(forged), "--state", str(wstate), env=env)
    assert r.returncode == EXIT_UNTRUSTED


def _forged_receipt(genuine: dict[str, Any], signer: NoteSigner, origin: str) -> dict[str, Any]:
    """The consumer's receipt rewritten to 1 unit and anchored in a one-leaf tree signed by ``signer``."""
    rec = json.loads(base64.b64decode(genuine["leaf"]))
    rec["units"] = 1
    leaf = json.dumps(rec, separators=(",", ":"), sort_keys=True).encode()
    note = sign_checkpoint(Checkpoint(origin, 1, leaf_hash(leaf)), signer)
    return {
        "index": 0,
        "leaf": base64.b64encode(leaf).decode(),
        "leaf_hash": base64.b64encode(leaf_hash(leaf)).decode(),
        "inclusion_proof": [],
        "checkpoint": note.decode(),
    }


def test_receipt_resigned_with_another_key_is_refused(officer, tmp_path):
    world, env = officer
    url = env["SOM_URL"]
    consumer = SomClient(url, world.keys["consumer"])
    leaves = world.compliance.ledger_leaves()
    mine = next(lf for lf in leaves if lf["record"].get("schema") == "som.usage/v1")
    genuine = consumer.ledger_receipt(mine["index"])
    pinned = out_of_band_key(env, tmp_path)
    vk = pinned.read_text().strip()
    cp = verify_receipt(genuine, vk)  # the SDK with the trusted key
    origin = cp.origin
    g = tmp_path / "genuine.json"
    g.write_text(json.dumps(genuine))

    impostor = NoteSigner(origin, SigningKey.generate())
    forged = _forged_receipt(genuine, impostor, origin)
    verify_receipt(forged, impostor.verifier.vkey())  # self-consistent under its own key
    with pytest.raises(InvalidSignature):
        verify_receipt(forged, vk)
    with pytest.raises(ValueError, match="trusted_vkey"):
        verify_receipt(forged, "")
    f = tmp_path / "forged.json"
    f.write_text(json.dumps(forged))

    # --vkey from out of band.
    assert som("receipt", "verify", str(g), "--vkey", str(pinned), env=env).returncode == 0
    r = som("receipt", "verify", str(f), "--vkey", str(pinned), env=env)
    assert r.returncode == EXIT_DOES_NOT_VERIFY and "does NOT verify" in r.stderr
    assert vkey_fingerprint(vk) in " ".join(r.stderr.split())
    # Another origin, even with the impostor key named after it, is refused.
    other = NoteSigner("evil.example/ledger", SigningKey.generate())
    f.write_text(json.dumps(_forged_receipt(genuine, other, "evil.example/ledger")))
    assert som("receipt", "verify", str(f), "--vkey", str(pinned), env=env).returncode == EXIT_DOES_NOT_VERIFY
    f.write_text(json.dumps(forged))

    # No key given and none pinned: refused, saying how to get one.
    r = som("receipt", "verify", str(g), env=env)
    assert r.returncode == 2 and "no trusted log key" in r.stderr
    # The key pinned by `som ledger verify` (TOFU) is the one receipts are checked against.
    assert som("ledger", "verify", str(export(env, tmp_path / "e")), env=env).returncode == 0
    assert som("receipt", "verify", str(g), env=env).returncode == 0
    r = som("receipt", "verify", str(f), env=env)
    assert r.returncode == EXIT_DOES_NOT_VERIFY and "pinned in" in r.stderr
