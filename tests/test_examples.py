"""examples/ run in CI: the demo tells the whole story and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_the_whole_story() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    out = r.stdout
    for marker in (
        "Provider lists a model",
        "encrypted inference",
        "inference gateway",
        "remote job",
        "ledger export",
        "receipt verified offline",
        "demo finished",
    ):
        assert marker in out, f"demo output lacks {marker!r}"


@pytest.mark.slow
def test_federated_demo_three_hospitals_improve_the_shared_model() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    r = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "federated_demo.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for marker in (
        "masked updates summed",
        "validated, stored envelope-encrypted",
        "ledger receipts",
        "federated demo finished",
    ):
        assert marker in r.stdout, f"federated demo output lacks {marker!r}"
