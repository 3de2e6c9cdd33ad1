"""`som contract` against the real app served by uvicorn on loopback (in-process CLI runner)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import httpx
from typer.testing import CliRunner

from marketplace.services import metering
from marketplace.services.identity import Principal


def run(url: str, key: str, *args: str) -> str:
    from marketplace.cli import app

    r = CliRunner().invoke(app, ["--json", *args], env={"SOM_URL": url, "SOM_API_KEY": key})
    if r.exit_code != 0:
        raise AssertionError(f"som {' '.join(args)} -> {r.exit_code}\n{r.output}\n{r.exception!r}")
    return r.stdout


def test_contract_cli_story(live, tmp_path: Path) -> None:
    w, url = live
    off = w.provider.create_offering(name="m", task="t", hosting="provider")
    w.provider.publish(off["id"])
    pkey, ckey = str(tmp_path / "p.key"), str(tmp_path / "c.key")
    offer = json.loads(
        run(
            url,
            w.keys["provider"],
            "contract",
            "offer",
            off["id"],
            "--quota",
            "10",
            "--rate",
            "5",
            "--price",
            "25",
            "--key-file",
            pkey,
        )
    )
    assert offer["status"] == "open" and (tmp_path / "p.key").stat().st_mode & 0o777 == 0o600
    listed = json.loads(run(url, w.keys["consumer"], "contract", "offers", off["id"]))
    assert [o["id"] for o in listed] == [offer["id"]]
    c = json.loads(
        run(
            url,
            w.keys["consumer"],
            "contract",
            "accept",
            offer["id"],
            "--yes",
            "--key-file",
            ckey,
            "--provider-key",
            offer["provider_key"],
        )
    )
    assert c["status"] == "active"
    assert [x["id"] for x in json.loads(run(url, w.keys["provider"], "contract", "list"))] == [c["id"]]
    p = Principal("key_cli", w.orgs["consumer"], frozenset({"consumer"}))
    r = metering.begin(
        w.rt,
        p,
        offering_id=off["id"],
        mode="remote_job",
        job_kind="predict",
        units=2,
        idempotency_key="cli-1",
        request_digest=metering.request_digest("x"),
    )
    metering.commit(w.rt, r, result=b"", media_type="x/y")
    s = run(url, w.keys["consumer"], "contract", "statement", c["id"], "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(s)))
    assert [(x["units"], x["amount_minor"], x["amount"]) for x in rows] == [("2", "50", "0.50")]
    sus = json.loads(
        run(url, w.keys["provider"], "contract", "suspend", c["id"], "--reason", "audit", "--key-file", pkey)
    )
    assert sus["status"] == "suspended"
    shown = json.loads(run(url, w.keys["consumer"], "contract", "show", c["id"]))
    assert shown["events"][0]["reason"] == "audit"
    run(url, w.keys["provider"], "contract", "resume", c["id"], "--key-file", pkey)
    end = json.loads(run(url, w.keys["consumer"], "contract", "terminate", c["id"], "--key-file", ckey))
    assert end["status"] == "terminated"
    # The server never saw a private key: only the public keys in the signed records.
    assert httpx.get(f"{url}/v1/health").status_code == 200
    dbfile = Path(w.rt.settings.resolved_database_url().split("///", 1)[1])
    db = b"".join(f.read_bytes() for f in (dbfile, dbfile.with_name(dbfile.name + "-wal")) if f.exists())
    assert len(db) > 0
    for f in (pkey, ckey):
        seed = Path(f).read_text().split(":", 1)[1].strip()
        assert seed.encode() not in db
