"""Monitoring benchmark: the dashboard's chart build in Chromium, and the cost of recording.

Prints a markdown section (``make bench`` collects it). The server is the real app under uvicorn
on loopback (it serves the UI's static files); Debian's Chromium, driven by Playwright, imports
the dashboard's own ``monitor.js`` and builds a chart of 30 days of one-minute points (43,200 x
3 series, p50/p95/p99), timed with ``performance.now()`` from the call to the end of uPlot's first
draw; then ``setData`` of new data of the same size (what a refresh does). Verdict: the median
build must be under 150 ms. Also: :func:`marketplace.services.monitoring.record_inference` per
call (histograms + minute aggregate), against a bare ``Histogram.observe`` in the same run, and
one flush of 1,000 minute rows to SQLite.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
LIMIT_MS = 150.0
POINTS = 43_200

BUILD_JS = """async (n) => {
  const m = await import('/ui/monitor.js');
  const el = document.createElement('div');
  el.style.width = '1200px';
  document.body.append(el);
  const t0 = Math.floor(Date.now() / 60000) * 60 - n * 60;
  const t = Array.from({length: n}, (_, i) => t0 + 60 * i);
  const v = (k, ph) => t.map((_, i) => 0.002 * k * (1 + 0.5 * Math.sin(i / 90 + ph)));
  const spec = (ph) => ({id: 'bench', title: 'bench', t, series: [
    {label: 'p50', values: v(1, ph), kind: 'duration'}, {label: 'p95', values: v(2, ph), kind: 'duration'},
    {label: 'p99', values: v(3, ph), kind: 'duration'}]});
  const tick = () => new Promise((r) => setTimeout(r, 0));
  m.chart(el, spec(0));
  await tick();
  const build = window.somMonitoring.drawMs.bench;
  m.chart(el, spec(1));
  await tick();
  const refresh = window.somMonitoring.drawMs.bench;
  window.somMonitoring.charts.get('bench').chart.destroy();
  window.somMonitoring.charts.delete('bench');
  el.remove();
  return {build, refresh};
}"""


def _serve(app: object) -> tuple[str, object, threading.Thread]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))  # type: ignore[arg-type]
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, th


def chart_times(url: str, runs: int) -> tuple[list[float], list[float]]:
    from playwright.sync_api import sync_playwright

    builds, refreshes = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url + "/ui/")
        page.evaluate(BUILD_JS, 2000)  # warm-up: module load and JIT
        for _ in range(runs):
            r = page.evaluate(BUILD_JS, POINTS)
            builds.append(float(r["build"]))
            refreshes.append(float(r["refresh"]))
        browser.close()
    return builds, refreshes


def record_cost(n: int) -> tuple[float, float]:
    from prometheus_client import CollectorRegistry, Histogram

    from marketplace.services import monitoring

    bare = Histogram("bench_bare_seconds", "bare", ["a"], buckets=monitoring.BUCKETS, registry=CollectorRegistry())
    t0 = time.perf_counter()
    for i in range(n):
        bare.labels("x").observe(i * 1e-6)
    t_bare = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        monitoring.record_inference(
            "off_bench", 1, "he_inference", queue_s=0.0, model_s=i * 1e-6, overhead_s=1e-4, ok=True
        )
    return (time.perf_counter() - t0) / n, t_bare


def flush_cost(rt: object, rows: int, repeats: int = 5) -> tuple[float, float]:
    """(first flush, median of the next ones) of ``rows`` changed minute rows."""
    from marketplace.services import monitoring, monitoring_store

    now = time.time() // 60 * 60
    times = []
    for _ in range(repeats):
        with monitoring._lock:
            for i in range(rows):
                a = monitoring._aggs.setdefault(
                    ("off_bench", 1, "he_inference", int(now - 60 * i)), monitoring.MinuteAgg()
                )
                a.calls, a.seq = a.calls + 1, a.seq + 1
        t0 = time.perf_counter()
        monitoring_store.flush(rt)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    runs = 3 if args.quick else 9
    from marketplace.api.app import create_app
    from marketplace.db.models import Offering, Org
    from marketplace.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="som-bench-mon-"))
    app = create_app(Settings(data_dir=tmp, database_url=f"sqlite:///{tmp / 'som.db'}"))
    rt = app.state.runtime
    with rt.tx() as s:
        s.add(Org(id="org_bench", name="bench"))
        s.flush()
        s.add(
            Offering(
                id="off_bench",
                org_id="org_bench",
                name="bench",
                task="t",
                input_schema={},
                output_schema={},
                tags=[],
                hosting="provider",
            )
        )
    url, server, th = _serve(app)
    try:
        builds, refreshes = chart_times(url, runs)
    finally:
        server.should_exit = True  # type: ignore[attr-defined]
        th.join(timeout=10)
    rec, bare = record_cost(2000 if args.quick else 20000)
    fl_first, fl = flush_cost(rt, 1000)
    fl1_first, fl1 = flush_cost(rt, 1)
    rt.close()
    med = statistics.median(builds)
    print("## Monitoring (dashboards and recording)\n")
    print(
        f"Chromium {CHROMIUM}, uPlot 1.6.32 through the dashboard's own `monitor.js`; {POINTS:,} one-minute "
        f"points (30 days) x 3 series; {runs} runs after a warm-up; time from the call to the end of the first draw.\n"
    )
    print("| measure | median | max |")
    print("| --- | --- | --- |")
    print(f"| build a 30-day one-minute chart | {med:.1f} ms | {max(builds):.1f} ms |")
    print(f"| refresh it (`setData`, same size) | {statistics.median(refreshes):.1f} ms | {max(refreshes):.1f} ms |")
    print(f"| `record_inference` (3 phase histograms + minute aggregate) | {rec * 1e6:.1f} us | |")
    print(f"| bare `Histogram.observe` (same buckets), same run | {bare * 1e6:.2f} us | |")
    print(
        f"| flush 1,000 changed minute rows (one upsert statement, executemany, SQLite) | {fl * 1e3:.1f} ms | first: {fl_first * 1e3:.1f} ms |"
    )
    print(
        f"| flush 1 changed minute row (the usual case: one per offering, version, mode) | {fl1 * 1e3:.2f} ms | first: {fl1_first * 1e3:.1f} ms |"
    )
    print()
    verdict = "PASS" if med < LIMIT_MS else "FAIL"
    print(f"Verdict: {verdict}: median build {med:.1f} ms against the {LIMIT_MS:.0f} ms budget.")
    return 0 if med < LIMIT_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
