"""`som offering compile` and `som infer --encrypted` against the real app on a uvicorn thread."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract


@pytest.fixture
def served(tmp_path: Path, sqlite_url: str) -> Iterator[tuple[Any, str]]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, workers=1))
    try:
        with serve_in_thread(app, lifespan="on") as url:
            yield build_world(app), url
    finally:
        app.state.runtime.close()


def test_cli_compile_and_encrypted_infer(served: tuple[Any, str], tmp_path: Path) -> None:
    from marketplace.cli import app as cli

    w, url = served
    d = lr_breast_cancer()
    runner = CliRunner()
    off = lr_offering(w, compile_=False, publish=False)
    cal = tmp_path / "cal.csv"
    with cal.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow([f"f{j}" for j in range(30)])
        wr.writerows(d.x_train.tolist())
    env = {"SOM_URL": url, "SOM_API_KEY": w.keys["provider"]}
    r = runner.invoke(cli, ["--json", "offering", "compile", off, "--version", "1", "--calibration", str(cal)], env=env)
    assert r.exit_code == 0, r.output
    assert '"argmax_agreement": 1.0' in r.output or '"argmax_agreement": 0.99' in r.output
    w.provider.publish(off)
    cid = make_contract(w, off)
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow([f"f{j}" for j in range(30)])
        wr.writerows(d.x_test.tolist())
    out = tmp_path / "preds.csv"
    env = {"SOM_URL": url, "SOM_API_KEY": w.keys["consumer"]}
    args = [
        "infer",
        off,
        "--input",
        str(data),
        "--encrypted",
        "--output",
        str(out),
        "--contract",
        cid,
        "--key-dir",
        str(tmp_path / "keys"),
    ]
    r = runner.invoke(cli, args, env=env)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(d.x_test) and set(rows[0]) == {"probability", "label"}
    proba = np.array([float(x["probability"]) for x in rows])
    assert np.mean((proba > 0.5) == (d.plain_proba > 0.5)) >= 0.99
    # without --encrypted there is nothing to run here: a clear error, non-zero exit
    r = runner.invoke(cli, ["infer", off, "--input", str(data)], env=env)
    assert r.exit_code != 0 and "--encrypted" in r.output
    r = runner.invoke(cli, ["--json", "he", "keysets"], env=env)
    assert r.exit_code == 0 and cid in r.output
