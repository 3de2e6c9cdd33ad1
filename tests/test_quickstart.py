"""docs/quickstart.md runs as written: its shell blocks, in order, in one bash, against a real server.

The page is the newcomer's path from nothing to a verified ledger; this test is what keeps it
true. It runs in a fresh folder beside a link to this checkout's ``.venv`` (the page starts with
``source .venv/bin/activate``), with its own HOME and XDG folders, on a free port.
"""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quickstart.md"


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = shell_blocks(DOC.read_text())
    assert len(blocks) >= 10, "the quickstart lost its shell blocks"
    venv = Path(sys.prefix)
    assert (venv / "bin" / "activate").exists(), f"tests must run from a virtualenv, not {venv}"
    work = tmp_path / "newcomer"
    work.mkdir()
    (work / ".venv").symlink_to(venv)
    script = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + "\n".join(blocks)
    home = tmp_path / "home"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_STATE_HOME": str(home / ".local" / "state"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "SOM_PORT": str(_free_port()),
        "LANG": "C.UTF-8",
        "COLUMNS": "160",
    }
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SOM_TEST_PG"):
        if k in os.environ:
            env[k] = os.environ[k]
    r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = (work / "server.log").read_text() if (work / "server.log").exists() else ""
    assert r.returncode == 0, (
        f"quickstart failed:\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-4000:]}\n--- server.log\n{log[-2000:]}"
    )

    # what the page promises actually happened
    preds = list(csv.reader((work / "predictions.csv").open()))
    assert preds[0] == ["probability", "label"] and len(preds) == 21
    assert len((work / "job-predictions.csv").read_text().strip().splitlines()) == 20
    assert "OK " in r.stdout  # som ledger verify
    assert (work / "receipt.json").exists() and (work / "witness.json").exists()
    assert "Traceback" not in r.stderr and "Traceback" not in log
