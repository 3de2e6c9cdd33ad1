"""Write docs/peers.md from the two JSON results of `make bench-peers` (standard library only).

Reads the metrics of bench/peers/concrete_lr.py (Concrete-ML) and bench/peers/ours_lr.py
(crypto.he), prints one markdown table side by side and writes the page with versions, date,
machine and the exact commands. If Concrete-ML could not be installed or run, ``--cml`` holds
``{"error": ...}`` and the page says why instead of showing numbers for it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ms(s: float) -> str:
    return f"{s * 1000:,.1f} ms" if s < 1 else f"{s:,.2f} s"


def size(b: float) -> str:
    if b >= 1e6:
        return f"{b / 1e6:,.1f} MB"
    if b >= 1e3:
        return f"{b / 1e3:,.1f} kB"
    return f"{b:,.0f} B"


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ratio_time(ours: float, peer: float) -> str:
    """For times: how many times faster ours is (peer/ours)."""
    r = peer / ours
    return f"**{r:,.1f}x faster**" if r >= 1 else f"{1 / r:,.1f}x slower"


def ratio_rate(ours: float, peer: float) -> str:
    r = ours / peer
    return f"**{r:,.1f}x faster**" if r >= 1 else f"{1 / r:,.1f}x slower"


def table(c: dict[str, Any], o: dict[str, Any]) -> list[str]:
    n = o["n_test"]
    rows = [
        ("scheme", c["scheme"], o["scheme"], ""),
        ("compile (provider)", ms(c["compile_s"]), ms(o["compile_s"]), ""),
        (
            "key generation (client)",
            ms(c["keygen_s"]),
            f"{ms(o['keygen_s'])} (single layout); {ms(o['keygen_batch_s'])} (batch)",
            ratio_time(o["keygen_s"], c["keygen_s"]),
        ),
        (
            "key set sent to the server",
            size(c["keyset_bytes"]),
            f"{size(o['keyset_bytes'])} (single); {size(o['keyset_batch_bytes'])} (batch)",
            "",
        ),
        (
            "**per-sample latency**, median (encrypt + compute + decrypt)",
            ms(c["latency_median_s"]),
            ms(o["latency_median_s"]) + " (single layout)",
            ratio_time(o["latency_median_s"], c["latency_median_s"]),
        ),
        (
            "  encrypt / compute / decrypt, medians",
            " / ".join(ms(c[k]) for k in ("encrypt_median_s", "compute_median_s", "decrypt_median_s")),
            " / ".join(ms(o[k]) for k in ("encrypt_median_s", "compute_median_s", "decrypt_median_s")),
            "",
        ),
        (
            f"**throughput**, the {n}-sample test split, end to end",
            f"{c['throughput_per_s']:,.0f} samples/s (client/server loop); "
            f'{c["predict_execute_per_s"]:,.0f}/s with `predict(fhe="execute")`',
            f"{o['throughput_per_s']:,.0f} samples/s (one batch request)",
            ratio_rate(o["throughput_per_s"], c["throughput_per_s"]),
        ),
        (
            "throughput at a full batch",
            "same (one sample per circuit run, no cross-sample batching)",
            f"{o['throughput_full_per_s']:,.0f} samples/s ({o['full_batch_samples']:,} samples, one ciphertext per feature)",
            ratio_rate(o["throughput_full_per_s"], c["throughput_per_s"]),
        ),
        (
            "request / response bytes per sample (one-sample request)",
            f"{size(c['request_bytes_per_sample'])} / {size(c['response_bytes_per_sample'])}",
            f"{size(o['request_bytes_per_sample'])} / {size(o['response_bytes_per_sample'])} (single); "
            f"{size(o['batch_request_bytes_per_sample'])} / {size(o['batch_response_bytes_per_sample'])} "
            f"(batch of {n})",
            "",
        ),
        ("**accuracy vs the labels** (encrypted inference)", pct(c["acc_labels"]), pct(o["acc_labels"]), ""),
        (
            "agreement with the clear model",
            f"{pct(c['agree_clear'])} ({c['clear_name']})",
            f"{pct(o['agree_clear'])} ({o['clear_name']})",
            "",
        ),
        ("agreement with the float scikit-learn model", pct(c["agree_float"]), pct(o["agree_float"]), ""),
        ("float model's accuracy vs the labels", pct(c["acc_float_labels"]), pct(o["acc_float_labels"]), ""),
    ]
    out = ["| | Concrete-ML | ours (crypto.he) | ours vs Concrete-ML |", "| --- | --- | --- | --- |"]
    out += [f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows]
    return out


def verdict(c: dict[str, Any], o: dict[str, Any]) -> list[str]:
    lat = o["latency_median_s"] / c["latency_median_s"]
    thr = o["throughput_per_s"] / c["throughput_per_s"]
    out = ["## Reading it", ""]
    out.append(
        f"* **Throughput: ours is {thr:,.0f}x Concrete-ML's** on the {o['n_test']}-sample test split "
        f"and {o['throughput_full_per_s'] / c['throughput_per_s']:,.0f}x at a full batch: CKKS packs "
        "one sample per slot, so one ciphertext per feature carries the whole split, while "
        "Concrete-ML's circuit takes one sample per run (input shape (1, 30)). Accuracy vs the "
        f"labels: {pct(o['acc_labels'])} ours, {pct(c['acc_labels'])} Concrete-ML."
    )
    if lat > 1:
        out.append(
            f"* **Single-sample latency: ours is {lat:,.1f}x slower** (and key generation, which "
            "Concrete-ML barely needs: its leveled circuit has no bootstrapping or key-switching "
            "keys, so its evaluation-key set is a few bytes). Almost all of our time is the compute "
            f"step of the `single` layout ({ms(o['compute_median_s'])} of {ms(o['latency_median_s'])}): "
            "the rotations of the encrypted vector-matrix product, which Concrete-ML's leveled "
            "integer dot product does not need. For scale, raw TenSEAL at N=4096 (measured once by "
            "hand): `vec.mm(W)` for 30x1 (one rotation per input feature) ~40 ms, rotate-and-sum "
            "`vec.dot(w)` (5 rotations) ~3.4 ms; rotate-and-sum leaves partial sums in the "
            "non-output slots, so masking them costs one more plaintext multiply (a level). Until "
            'this row flips, "faster than Concrete-ML" holds for throughput (batched inference), '
            "not for one query."
        )
    else:
        out.append(f"* **Single-sample latency: ours is {1 / lat:,.1f}x faster.**")
    out.append(
        "* Not like for like, in Concrete-ML's favour on latency: its inputs and weights are 8-bit "
        "integers and the result is the raw integer dot product (sigmoid in the clear); our result "
        "is circuit-private (masked, re-randomised, flooded), which Concrete-ML's is not."
    )
    return out


FOOTER = [
    "## How it was run",
    "",
    "```sh",
    "make bench-peers            # = bash bench/peers/run.sh",
    "# run.sh does:",
    "python3 -m venv .bench-peers/venv",
    ".bench-peers/venv/bin/pip install concrete-ml==1.9.0      # only if not installed yet",
    "git archive HEAD crypto | tar -x -C .bench-peers/head-src   # PEERS_OURS=head (default)",
    "for i in 1 2 3; do   # PEERS_ROUNDS=3, alternating",
    "  .bench-peers/venv/bin/python bench/peers/concrete_lr.py \\",
    "      --out .bench-peers/concrete_lr.$i.json --data .bench-peers/lr_data.npz",
    "  .venv/bin/python bench/peers/ours_lr.py --data .bench-peers/lr_data.npz \\",
    "      --out .bench-peers/ours_lr.$i.json --src .bench-peers/head-src",
    "done",
    ".venv/bin/python bench/peers/report.py --cml .bench-peers/concrete_lr.*.json \\",
    "    --ours .bench-peers/ours_lr.*.json --out docs/peers.md",
    "```",
    "",
    "## Installing Concrete-ML here",
    "",
    "* `pip index versions concrete-ml`: 1.9.0, 1.8.0, 1.7.0. 1.9.0 is a pure-Python wheel "
    "(Python >=3.8.1,<3.13) over `concrete-python==2.10.0` (cp311 manylinux wheel, ~72 MB).",
    "* It pins `torch==2.3.1` (and numpy 1.26.4, scikit-learn 1.5.0, onnx 1.17.0, brevitas 0.10.2, "
    "...), so it never shares the main venv (numpy 2, scikit-learn 1.9). The machine's local CPU "
    "build of torch is 2.13.0, which the pin refuses; PyPI's Linux torch 2.3.1 is the CUDA 12.1 "
    "build, which pulls `nvidia-*` wheels (2.8 GB) and triton (0.4 GB). A CPU-only install is not "
    "possible from PyPI: installing `torch==2.3.1 --no-deps` without the nvidia wheels fails at "
    "`import torch` with `ValueError: libcublas.so.*[0-9] not found in the system path` "
    "(torch's `_preload_cuda_deps`), and the CPU wheel lives only on PyTorch's own index, which "
    "this machine cannot reach. So the venv takes the CUDA wheels (~6 GB in all, on the CPU here: "
    "no GPU is used; torch only serves Concrete-ML's quantisation and ONNX export). run.sh checks "
    "for 10 GB free before installing. A fresh install took 90 to 190 s here.",
    "* `.bench-peers/` is gitignored; delete it to reclaim the space.",
]


def merge(paths: list[str]) -> dict[str, Any]:
    """Median of every numeric metric over the rounds; the rest from the first round.
    A round that failed (``{"error": ...}``) makes the whole side fail."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    for r in runs:
        if "error" in r:
            return r
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            m = statistics.median(float(r[k]) for r in runs)
            out[k] = round(m) if isinstance(v, int) else m
    out["rounds"] = len(runs)
    return out


def git_state(src: str) -> str:
    if src:
        return src
    root = Path(__file__).resolve().parents[2]
    git = shutil.which("git")
    if git is None:
        return "unknown commit"
    try:
        head = subprocess.run(
            [git, "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,  # noqa: S603
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            [git, "status", "--porcelain", "--", "crypto"],
            cwd=root,  # noqa: S603
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (" with uncommitted changes under crypto/ (work in progress)" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cml", required=True, nargs="+", help="one JSON per round")
    ap.add_argument("--ours", required=True, nargs="+", help="one JSON per round")
    ap.add_argument("--out", required=True)
    ap.add_argument("--venv-size", default="?")
    ap.add_argument("--ours-src", default="", help="what our crypto/ was imported from (text)")
    ap.add_argument("--install-seconds", default="")
    args = ap.parse_args()
    c = merge(args.cml)
    o = merge(args.ours)
    now = dt.datetime.now(dt.UTC)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        "# Peers: Concrete-ML next to our HE engine",
        "",
        "Written by `make bench-peers` (bench/peers/run.sh) on "
        f"{now:%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.machine()}, Python {o['versions']['python']}; load average at the end {load} "
        f"(the machine is shared: timings are medians, and each metric is the median over {o['rounds']} "
        "rounds that alternate Concrete-ML and ours, but still noisy). Our engine as of "
        f"{git_state(args.ours_src)}.",
        "",
        "Same data and same model on both sides: scikit-learn's breast-cancer set, "
        "`train_test_split(test_size=0.25, random_state=0)`, `StandardScaler` fitted on the training "
        f"split, {o['n_test']} test samples. Concrete-ML's `LogisticRegression` is trained on the "
        "training split; we compile the float weights of the very scikit-learn model it quantised "
        "(its `sklearn_model`), calibrated on the training split. Both run real encrypted inference "
        '(Concrete-ML `fhe="execute"`, not simulation) with bytes across the client/server '
        "boundary, at 128-bit security.",
        "",
    ]
    if "error" in c:
        lines += [
            "## Concrete-ML could not run here",
            "",
            c["error"],
            "",
            "## Ours alone",
            "",
            "```json",
            json.dumps(o, indent=2),
            "```",
        ]
    else:
        lines += ["## Side by side", ""] + table(c, o) + [""]
        lines += [
            "Versions: Concrete-ML side "
            + ", ".join(f"{k} {v}" for k, v in c["versions"].items())
            + " (its own venv `.bench-peers/venv`, "
            + f"{args.venv_size}"
            + (f", installed in {args.install_seconds} s by this run" if args.install_seconds else "")
            + "); ours "
            + ", ".join(f"{k} {v}" for k, v in o["versions"].items())
            + " (the main `.venv`).",
            "",
            f"Our max |logit error| vs the float model on the test split: {o['max_logit_error']:.1e} "
            "(promise 2^-8). Concrete-ML's circuit has "
            f"{c['circuit']['statistics_pbs']} programmable bootstraps (a linear model is a leveled "
            "integer dot product in TFHE; sigmoid is applied in the clear by the client). "
            "Diagnostics of our single-layout compute: "
            f"{ms(o['compute_no_privacy_median_s'])} without circuit privacy vs "
            f"{ms(o['compute_median_s'])} with it (re-randomisation and flooding); one sample in the "
            "batch layout takes "
            f"{ms(o['latency_batch_layout_one_sample_s'])} end to end.",
        ]
        lines += [""] + verdict(c, o)
    lines += [""] + FOOTER
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
