"""CLI conventions a newcomer relies on, each against a real server on loopback.

`--json` anywhere, ids never cut in tables, hints that name the server's real reason, terms shown
before signing, `som serve` saying where it is, large inputs split to the contract's max_batch,
and a start-up that does not load the crypto and numeric stack for `som --help`.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from typer.testing import CliRunner

from marketplace.cli import app as cli
from tests.marketplace.test_cli_server import free_port
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract


def _run(url: str, key: str, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, list(args), env={"SOM_URL": url, "SOM_API_KEY": key, **(env or {})})


def test_json_is_accepted_after_the_subcommand(live) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    off = w.provider.create_offering(name="a-model", task="binary-classification")
    before = _run(url, w.keys["provider"], "--json", "offering", "show", off["id"])
    after = _run(url, w.keys["provider"], "offering", "show", off["id"], "--json")
    assert before.exit_code == after.exit_code == 0, after.output
    assert json.loads(before.stdout)["id"] == json.loads(after.stdout)["id"] == off["id"]
    # after `--` it is an argument, not the flag
    r = _run(url, w.keys["provider"], "offering", "show", "--", "--json")
    assert r.exit_code != 0


def test_ids_are_never_cut_in_tables(live) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    offs = [w.provider.create_offering(name=f"model with a long descriptive name {i}" * 3, task="t") for i in range(2)]
    r = _run(url, w.keys["provider"], "offering", "list", env={"COLUMNS": "60"})
    assert r.exit_code == 0, r.output
    for o in offs:
        assert o["id"] in r.stdout, r.stdout


def _cli_contract(w, url: str, off: str, tmp_path: Path, *, max_batch: int) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """Offer (provider) and accept (consumer) through the CLI; returns (contract id, provider key file)."""
    pkey, ckey = str(tmp_path / "p.key"), str(tmp_path / "c.key")
    r = _run(
        url,
        w.keys["provider"],
        "--json",
        "contract",
        "offer",
        off,
        "--quota",
        "1000",
        "--rate",
        "1000",
        "--max-batch",
        str(max_batch),
        "--key-file",
        pkey,
    )
    assert r.exit_code == 0, r.output
    r = _run(
        url, w.keys["consumer"], "--json", "contract", "accept", json.loads(r.stdout)["id"], "--yes", "--key-file", ckey
    )
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["id"], pkey


def test_a_403_hint_names_the_real_reason(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    off = lr_offering(w)
    cid, pkey = _cli_contract(w, url, off, tmp_path, max_batch=4)
    data = tmp_path / "x.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows(lr_breast_cancer().x_test[:3].tolist())
    infer = ("infer", off, "--input", str(data), "--encrypted", "--contract", cid, "--key-dir", str(tmp_path / "keys"))
    # a missing role: the hint points at the key's roles
    r = _run(url, w.keys["consumer"], "offering", "publish", off)
    assert r.exit_code != 0 and "roles do not allow this" in r.output, r.output
    # a batch over max_batch, sent raw: the hint names max_batch
    r = _run(url, w.keys["consumer"], *infer, "--layout", "batch")
    assert r.exit_code == 0, r.output  # the CLI itself splits to max_batch
    # a suspended contract: the hint says so, not "ask an admin"
    r = _run(url, w.keys["provider"], "contract", "suspend", cid, "--reason", "audit", "--key-file", pkey)
    assert r.exit_code == 0, r.output
    r = _run(url, w.keys["consumer"], *infer)
    assert r.exit_code != 0
    assert "suspended this contract" in r.output and "ask an admin" not in r.output, r.output


def test_offers_and_accept_show_the_terms_and_accept_asks(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    off = w.provider.create_offering(name="m", task="t", hosting="provider")
    w.provider.publish(off["id"])
    pkey, ckey = str(tmp_path / "p.key"), str(tmp_path / "c.key")
    r = _run(
        url,
        w.keys["provider"],
        "--json",
        "contract",
        "offer",
        off["id"],
        "--quota",
        "500",
        "--rate",
        "50",
        "--price",
        "125",
        "--max-batch",
        "32",
        "--key-file",
        pkey,
    )
    assert r.exit_code == 0, r.output
    offer = json.loads(r.stdout)
    r = _run(url, w.keys["consumer"], "contract", "offers", off["id"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert offer["id"] in r.stdout, r.stdout  # ids are never cut, whatever the terminal's width
    r = _run(url, w.keys["consumer"], "contract", "offers", off["id"], "--json")
    shown = json.loads(r.stdout)[0]
    assert shown["id"] == offer["id"] and shown["offer"]["terms"]["price"]["unit_price_minor"] == 125
    # no --yes and no terminal: refused, nothing signed
    r = _run(url, w.keys["consumer"], "contract", "accept", offer["id"], "--key-file", ckey)
    assert r.exit_code == 2 and "--yes" in r.output
    assert "EUR 1.25 per unit" in r.output and "max_batch: 32" in r.output
    assert w.consumer.list_contracts() == []
    r = _run(url, w.keys["consumer"], "contract", "accept", offer["id"], "--yes", "--key-file", ckey)
    assert r.exit_code == 0, r.output
    assert "next: som infer" in r.stdout
    [c] = w.consumer.list_contracts()
    r = _run(url, w.keys["consumer"], "contract", "show", c["id"])
    assert r.exit_code == 0 and "EUR 1.25 per unit" in r.stdout and "500 units" in r.stdout


def test_large_inputs_are_split_to_the_contracts_max_batch(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    d = lr_breast_cancer()
    off = lr_offering(w)
    cid = make_contract(w, off, max_batch=16)
    data = tmp_path / "x.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows(d.x_test[:40].tolist())
    out = tmp_path / "preds.csv"
    r = _run(
        url,
        w.keys["consumer"],
        "infer",
        off,
        "--input",
        str(data),
        "--encrypted",
        "--output",
        str(out),
        "--layout",
        "batch",
        "--key-dir",
        str(tmp_path / "keys"),
    )
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(out.open()))) == 40
    assert w.consumer.get_contract(cid)["usage"]["used_units"] == 40
    lines = w.consumer.statement(cid)["lines"]
    assert sorted(ln["units"] for ln in lines) == [8, 16, 16]  # three metered requests, none over max_batch


def test_cli_start_up_does_not_load_the_heavy_stack() -> None:
    code = (
        "import sys, marketplace.cli\n"
        "heavy = {'numpy', 'tenseal', 'sqlalchemy', 'httpx', 'cryptography', 'onnx', 'fastapi'}\n"
        "print(','.join(sorted(heavy & {m.split('.')[0] for m in sys.modules})))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"`som --help` imports {r.stdout.strip()}"


def test_serve_says_where_it_is_and_where_the_admin_key_comes_from(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "SOM_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "marketplace.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}" in err
    assert str((tmp_path / "data").resolve()) in err
    assert "som admin bootstrap" in err


def test_receipt_show_by_index_last_and_usage(live, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    w, url = live
    d = lr_breast_cancer()
    off = lr_offering(w)
    make_contract(w, off, max_batch=64)
    data = tmp_path / "x.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows(d.x_test[:5].tolist())
    state = {"XDG_STATE_HOME": str(tmp_path / "state")}
    r = _run(
        url,
        w.keys["consumer"],
        "infer",
        off,
        "--input",
        str(data),
        "--encrypted",
        "--output",
        str(tmp_path / "p.csv"),
        "--key-dir",
        str(tmp_path / "keys"),
        env=state,
    )
    assert r.exit_code == 0, r.output
    last = _run(
        url, w.keys["consumer"], "--json", "receipt", "show", "--last", "--out", str(tmp_path / "r.json"), env=state
    )
    assert last.exit_code == 0, last.output
    shown = json.loads(last.stdout)
    assert json.loads((tmp_path / "r.json").read_text()) == shown
    by_index = _run(url, w.keys["consumer"], "receipt", "show", str(shown["index"]), env=state)
    assert by_index.exit_code == 0 and "he_inference" in by_index.stdout and "5" in by_index.stdout, by_index.output
    # the receipt verifies offline with the log key obtained out of band
    vkey = w.consumer.ledger_key()
    v = _run(url, w.keys["consumer"], "receipt", "verify", str(tmp_path / "r.json"), "--vkey", vkey)
    assert v.exit_code == 0, v.output
    # no receipt kept yet, or two selectors: a clear error, exit 2
    r = _run(url, w.keys["consumer"], "receipt", "show", "--last", env={"XDG_STATE_HOME": str(tmp_path / "none")})
    assert r.exit_code == 2 and "no receipt kept yet" in r.output
    r = _run(url, w.keys["consumer"], "receipt", "show", "3", "--last", env=state)
    assert r.exit_code == 2
    # another organisation cannot read this consumer's receipt
    r = _run(url, w.keys["other_consumer"], "receipt", "show", str(shown["index"]))
    assert r.exit_code == 1 and "404" in r.output
