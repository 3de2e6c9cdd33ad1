"""Job-jail benchmark: the start-up cost of running consumer code in the jail.

Prints a markdown section (``make bench`` collects it). Measures, on this machine, the wall time
of ``run_isolated`` for an empty ``main.py`` and for one that imports numpy, jailed
(bubblewrap + per-job cgroups, :mod:`marketplace.compute.jail`) and unjailed (the old plain
child process, ``jail=None``), and the in-process ``predict`` of 100 rows that the predict and
evaluate runners do today, so the cost of moving those into the jail can be judged
(docs/jobs.md, "The jail").
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from crypto.sealing import SealKeyPair  # noqa: E402
from marketplace.compute.jail import JailConfig, probe  # noqa: E402
from marketplace.compute.jobs import load_model, run_job  # noqa: E402
from marketplace.compute.payload import JobInput  # noqa: E402
from marketplace.compute.sandbox import run_isolated  # noqa: E402

D_IN, ROWS = 30, 100


def _median_ms(fn: Any, n: int) -> float:
    fn()  # warm caches (the jail's layout, page cache)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    n = 5 if args.quick else args.repeats
    cfg = JailConfig()
    problem = probe(cfg)
    print("## Job jail (custom-job start-up)\n")
    if problem is not None:
        print(f"The jail is unavailable on this machine ({problem}); nothing measured.\n")
        return
    work = Path(tempfile.mkdtemp(prefix="som-bench-jail-"))

    def run(code: str, jail: JailConfig | None) -> None:
        r = run_isolated(
            code,
            inputs={"data.csv": b"1,2\n"},
            workdir=work,
            cpu_seconds=30,
            memory_mb=1024,
            wall_seconds=60,
            jail=jail,
        )
        if not r.ok:
            raise SystemExit(f"bench job failed: {r.message}: {r.stderr[-500:]}")

    empty_j = _median_ms(lambda: run("pass\n", cfg), n)
    empty_u = _median_ms(lambda: run("pass\n", None), n)
    np_j = _median_ms(lambda: run("import numpy\n", cfg), n)
    np_u = _median_ms(lambda: run("import numpy\n", None), n)

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            "layer0.weight": rng.normal(size=(1, D_IN)),
            "layer0.bias": rng.normal(size=(1,)),
            "layer0.activation": np.array("sigmoid"),
        },
    )
    model = load_model(buf.getvalue(), "npz")
    data = ("\n".join(",".join(repr(float(v)) for v in r) for r in rng.normal(size=(ROWS, D_IN))) + "\n").encode()
    reply = SealKeyPair.generate()
    job = JobInput("job_bench", "predict", reply.public_text(), data)
    local = _median_ms(lambda: run_job(model, job, expected_kind="predict", workdir=work), n * 4)

    print(
        f"Medians of {n} runs of `run_isolated` (limits: 30 s CPU, 1 GiB). Jailed = bubblewrap (all namespaces, "
        "nobody uid, read-only root, tmpfs outputs) + per-job cgroup v1 memory/pids/freezer/cpuacct, created, "
        "killed and removed per job. Unjailed = the plain child process (`jail=None`).\n"
    )
    print("| measure | jailed | unjailed | jail overhead |")
    print("| --- | --- | --- | --- |")
    print(f"| empty `main.py` | {empty_j:.1f} ms | {empty_u:.1f} ms | {empty_j - empty_u:+.1f} ms |")
    print(f"| `import numpy` | {np_j:.1f} ms | {np_u:.1f} ms | {np_j - np_u:+.1f} ms |")
    print()
    print(
        f"In-process `predict` of {ROWS} rows x {D_IN} features (parse CSV, predict, format), what the predict "
        f"and evaluate runners do today: {local:.2f} ms. Running it in the jail would cost at least the "
        f"`import numpy` start-up above ({np_j:.0f} ms), x{np_j / max(local, 1e-3):.0f} the computation itself, "
        'and several times the whole round trip of a predict job through the agent ("Remote jobs" above), '
        'so predict/evaluate stay in-process (docs/jobs.md, "The jail"). Most of the jailed time is the '
        "interpreter's own start-up: the unjailed child pays it too, and the difference between the two "
        f"columns is within this run's noise (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores).\n"
    )


if __name__ == "__main__":
    main()
