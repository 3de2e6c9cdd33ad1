"""`make bench`: run every bench/bench_*.py (each prints a markdown section) into docs/benchmarks.md.

Each script compares our code with the raw library in the same run and reports medians and
ratios. Pass ``--quick`` for small sizes (a smoke run); the committed file comes from a full run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "bench_ledger.py",
    "bench_metering.py",
    "bench_he.py",
    "bench_he_service.py",
    "bench_jobs.py",
    "bench_jail.py",
    "bench_gateway.py",
    "bench_federated.py",
    "bench_overload.py",
]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", nargs="*", default=None, help="script names to run")
    args = ap.parse_args()
    scripts = [ROOT / "bench" / n for n in ORDER if (ROOT / "bench" / n).exists()]
    scripts += sorted(p for p in (ROOT / "bench").glob("bench_*.py") if p.name not in ORDER)
    if args.only:
        scripts = [s for s in scripts if s.name in args.only or s.stem in args.only]
    head = [
        "# Benchmarks",
        "",
        f"Written by `make bench` on {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        + (" (quick run: small sizes)" if args.quick else "")
        + ". Medians unless noted; each section compares our code with the raw library in the same run.",
        "",
    ]
    sections = []
    failed = []
    for script in scripts:
        t0 = time.monotonic()
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"running {script.name} ...", flush=True)
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        took = time.monotonic() - t0
        if r.returncode != 0:
            failed.append(script.name)
            sections.append(f"## {script.stem}\n\nFAILED (exit {r.returncode}):\n\n```\n{r.stderr[-3000:]}\n```\n")
        else:
            sections.append(r.stdout.strip() + f"\n\n_{script.name} took {took:.0f} s._\n")
        print(f"  {script.name}: {'ok' if r.returncode == 0 else 'FAILED'} in {took:.0f} s", flush=True)
    out = ROOT / args.out
    foot = (
        "## Peers\n\nConcrete-ML's FHE logistic regression on the same data runs in its own venv "
        "(`make bench-peers`, several GB): see [peers.md](peers.md).\n"
    )
    out.write_text("\n".join(head) + "\n" + "\n".join(sections) + "\n" + foot)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
