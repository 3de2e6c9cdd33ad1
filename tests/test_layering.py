"""The one dependency direction: crypto/ and contracts/ never import the service layer or I/O."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = [
    "marketplace",
    "fastapi",
    "sqlalchemy",
    "typer",
    "httpx",
    "celery",
    "redis",
    "uvicorn",
    "starlette",
    "psycopg",
]


def _modules(pkg: str) -> list[str]:
    return [pkg] + [f"{pkg}.{m.name}" for m in pkgutil.walk_packages([str(ROOT / pkg)]) if not m.name.startswith("_")]


def test_pure_libraries_import_no_service_layer() -> None:
    mods = _modules("crypto") + [m for m in _modules("contracts")]
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted({{n.split('.')[0] for n in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"pure libraries pulled in: {r.stdout.strip()}"
