"""Prometheus metrics and per-minute latency aggregates of this process.

For: :func:`record_inference` (every inference path calls it once per call: HE inference, jobs,
the gateway), :func:`record_http` (the HTTP middleware), :func:`exposition` (``GET /metrics``), and
the in-memory minute aggregates that :mod:`marketplace.services.monitoring_store` flushes to the
database. Not for: the database (``monitoring_store``), HTTP (``marketplace.api``).

Metric names follow the OpenTelemetry HTTP semantic conventions as Prometheus exports them:
``http_server_request_duration_seconds{http_route, http_request_method, http_response_status_code}``
(the route is the template, e.g. ``/v1/offerings/{offering_id}``, never the raw path) and
``som_inference_duration_seconds{offering, version, mode, phase}`` with ``phase`` in
``queue | model | overhead``; ``som_inference_errors_total{offering, version, mode, error_class}``.
Buckets: :data:`BUCKETS`, 100 us to 60 s, about three per decade (the client's defaults start at
5 ms and cannot resolve a 20 us model call).

Several processes: with ``PROMETHEUS_MULTIPROC_DIR`` set (before the process starts) the client
writes to memory-mapped files there and :func:`exposition` merges every process's files.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

__all__ = [
    "BUCKETS",
    "CONTENT_TYPE",
    "HTTP_METHODS",
    "MinuteAgg",
    "Phase",
    "exposition",
    "is_loopback",
    "mark_flushed",
    "pending",
    "quantile",
    "record_http",
    "record_inference",
    "writer_id",
]

#: Upper bounds (seconds) of the latency buckets: 100 us .. 60 s, roughly log-spaced (1-2.5-5).
BUCKETS: tuple[float, ...] = (
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
)
CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Methods kept as label values (OpenTelemetry's known methods); any other is ``_OTHER``.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.:-]{0,63}")
_ERROR_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,39}")
#: Distinct error classes kept per process; more become ``other`` (a bounded label set).
MAX_ERROR_CLASSES = 32
#: A minute aggregate for an offering this process's database does not know is kept this long.
ORPHAN_SECONDS = 600


class Phase(StrEnum):
    QUEUE = "queue"
    MODEL = "model"
    OVERHEAD = "overhead"


HTTP_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests (OpenTelemetry http.server.request.duration).",
    ["http_route", "http_request_method", "http_response_status_code"],
    buckets=BUCKETS,
)
INFERENCE_DURATION = Histogram(
    "som_inference_duration_seconds",
    "Inference time by phase: queue (waiting for a worker or agent), model, overhead (metering, I/O).",
    ["offering", "version", "mode", "phase"],
    buckets=BUCKETS,
)
INFERENCE_ERRORS = Counter(
    "som_inference_errors",
    "Failed inferences by error class.",
    ["offering", "version", "mode", "error_class"],
)

# -- labels ---------------------------------------------------------------------------------------


def _label(value: str) -> str:
    return value if _LABEL_RE.fullmatch(value) else "other"


def _seconds(v: float) -> float:
    return v if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0.0


_error_classes: set[str] = set()


def _error_class(value: str | None) -> str:
    if not value or not _ERROR_RE.fullmatch(value):
        return "other"
    if value not in _error_classes:
        if len(_error_classes) >= MAX_ERROR_CLASSES:
            return "other"
        _error_classes.add(value)
    return value


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a client address) is a loopback address (IPv4-mapped IPv6 included)."""
    try:
        ip = ipaddress.ip_address((host or "").strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# -- minute aggregates ----------------------------------------------------------------------------

Key = tuple[str, int, str, int]  # offering, version, mode, minute start (Unix seconds)


@dataclass
class MinuteAgg:
    """One minute of one offering version and mode, in this process (cumulative)."""

    calls: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    hist: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum_total: float = 0.0
    sum_queue: float = 0.0
    sum_model: float = 0.0
    sum_overhead: float = 0.0
    seq: int = 0
    flushed_seq: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "errors": dict(self.errors),
            "hist": list(self.hist),
            "sum_total": self.sum_total,
            "sum_queue": self.sum_queue,
            "sum_model": self.sum_model,
            "sum_overhead": self.sum_overhead,
        }


_lock = threading.Lock()
_aggs: dict[Key, MinuteAgg] = {}
_pid = os.getpid()
_writer = ""


def _reset_if_forked() -> None:
    global _pid, _writer
    if os.getpid() != _pid:  # a forked child starts with the parent's aggregates: not its own
        _pid, _writer = os.getpid(), ""
        _aggs.clear()


def writer_id() -> str:
    """This process's name in ``monitoring_latency.writer``: host, pid and a nonce."""
    global _writer
    with _lock:
        _reset_if_forked()
        if not _writer:
            _writer = f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(4)}"
        return _writer


def bucket_index(seconds: float) -> int:
    """Index of the bucket ``seconds`` falls in (``len(BUCKETS)``: over the last bound)."""
    return bisect.bisect_left(BUCKETS, seconds)


def record_inference(
    offering_id: str,
    version: int,
    mode: str,
    *,
    queue_s: float,
    model_s: float,
    overhead_s: float,
    ok: bool,
    error_class: str | None = None,
) -> None:
    """Record one inference call (any mode): the phase histograms, the error counter, and this
    process's minute aggregate (flushed to the DB by :mod:`monitoring_store`). Never raises."""
    try:
        off, ver, md = _label(str(offering_id)), int(version) if type(version) is int else 0, _label(str(mode))
        q, m, o = _seconds(queue_s), _seconds(model_s), _seconds(overhead_s)
        v = str(ver)
        INFERENCE_DURATION.labels(off, v, md, Phase.QUEUE.value).observe(q)
        INFERENCE_DURATION.labels(off, v, md, Phase.MODEL.value).observe(m)
        INFERENCE_DURATION.labels(off, v, md, Phase.OVERHEAD.value).observe(o)
        with _lock:
            _reset_if_forked()
            err = None if ok else _error_class(error_class)
            key = (off, ver, md, int(time.time()) // 60 * 60)
            a = _aggs.get(key)
            if a is None:
                a = _aggs[key] = MinuteAgg()
            total = q + m + o
            a.calls += 1
            a.hist[bucket_index(total)] += 1
            a.sum_total += total
            a.sum_queue += q
            a.sum_model += m
            a.sum_overhead += o
            if err is not None:
                a.errors[err] = a.errors.get(err, 0) + 1
            a.seq += 1
        if err is not None:
            INFERENCE_ERRORS.labels(off, v, md, err).inc()
    except Exception:  # noqa: BLE001 - monitoring must never break an inference
        return


def pending() -> list[tuple[Key, int, dict[str, Any]]]:
    """The aggregates changed since their last flush: ``(key, seq, row values)``."""
    with _lock:
        _reset_if_forked()
        return [(k, a.seq, a.row()) for k, a in _aggs.items() if a.seq != a.flushed_seq]


def mark_flushed(done: Iterable[tuple[Key, int]], *, now: float | None = None) -> None:
    """Note what was written; forget closed minutes that are flushed, and orphans that are old."""
    t = time.time() if now is None else now
    current = int(t) // 60 * 60
    with _lock:
        for key, seq in done:
            a = _aggs.get(key)
            if a is not None:
                a.flushed_seq = max(a.flushed_seq, seq)
        for key in [
            k for k, a in _aggs.items() if k[3] < current and (a.seq == a.flushed_seq or k[3] < t - ORPHAN_SECONDS)
        ]:
            del _aggs[key]


def quantile(hist: list[int], q: float) -> float | None:
    """The ``q`` quantile of a bucket histogram (counts per :data:`BUCKETS` bound plus overflow),
    interpolated linearly within its bucket like Prometheus's ``histogram_quantile``; None if empty."""
    total = sum(hist)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(hist):
        if n and seen + n >= rank:
            if i >= len(BUCKETS):
                return BUCKETS[-1]
            lo = BUCKETS[i - 1] if i > 0 else 0.0
            return lo + (BUCKETS[i] - lo) * max(0.0, rank - seen) / n
        seen += n
    return BUCKETS[-1]


# -- HTTP and exposition ---------------------------------------------------------------------------


def record_http(route: str, method: str, status: int, seconds: float) -> None:
    """One HTTP request: ``route`` must be the route template (bounded), never the raw path."""
    m = method if method in HTTP_METHODS else "_OTHER"
    code = str(status) if type(status) is int and 100 <= status <= 599 else "500"
    HTTP_DURATION.labels(route, m, code).observe(_seconds(seconds))


def exposition() -> bytes:
    """The Prometheus text exposition: this process's metrics, or every process's files in
    ``PROMETHEUS_MULTIPROC_DIR`` when that is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(generate_latest(registry))
    return bytes(generate_latest(REGISTRY))
