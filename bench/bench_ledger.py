"""Ledger benchmark: append throughput vs a bare SQLite insert, proof latency and offline
verification at a large tree size.

Prints a markdown section (``make bench`` collects it into docs/benchmarks.md).

* Appends: ``ledger.append_many`` (schema validation, canonical JSON, sequencer lock, leaf rows,
  Merkle node rows, frontier update, through SQLAlchemy) in batches, against a bare ``sqlite3``
  insert of the same leaf rows: the same table (DDL compiled from the ledger's own
  ``ledger_leaves`` metadata: same columns, same indexes), rows built from the same record dicts
  (canonical bytes, leaf hash, usage columns), same batches, same PRAGMAs (WAL,
  synchronous=NORMAL). That is what a log without a Merkle tree needs to store and serve the same
  leaves. A second baseline, a one-table ``(idx, data)`` log of the canonical bytes, is shown
  for scale. Also single appends (one transaction each).
* Proofs: the tree is built with ``append_many`` in big batches; then the median latency of an
  inclusion proof (random index, full size) and a consistency proof (random old size), each one
  DB transaction reading the plan's nodes in one query and folding them.
* Offline verification: the ``som ledger verify`` code path (one pass over the export: leaf
  hashes and roots with crypto.logverify, every leaf through contracts.compliance) on an export
  of the whole tree, wall clock and CPU time of this process.

``--size`` sets the tree size (default 1,000,000; ``--quick`` uses 10,000). Run the full size
sparingly: building it takes about a minute and ~0.5 GB of disk in a temporary directory.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.offer import Contract, accept_offer, make_offer  # noqa: E402
from contracts.records import contract_record, usage_record  # noqa: E402
from contracts.terms import JobLimits, Terms  # noqa: E402
from crypto.canonical import canonicalize  # noqa: E402
from crypto.merkle import verify_consistency, verify_inclusion  # noqa: E402
from crypto.signing import SigningKey  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_contract(n: int) -> Contract:
    terms = Terms(
        modes=frozenset({"he_inference", "remote_job"}),
        quota_units=10 * n + 10,
        rate_units=10 * n + 10,
        rate_window_seconds=86400 * 365,
        valid_from=T0,
        valid_until=T0 + timedelta(days=365),
        unit_price_minor=5,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset({"predict"}), 600, 2048, 900),
    )
    offer = make_offer(
        offer_id="offer-bench",
        offering_id="off_bench",
        provider_org="org_provider",
        terms=terms,
        signing_key=SigningKey.generate(),
        now=T0 - timedelta(days=1),
    )
    return accept_offer(
        offer, consumer_org="org_consumer", signing_key=SigningKey.generate(), now=T0 - timedelta(hours=1)
    )


def records(c: Contract, start: int, n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(start, start + n):
        d = "sha256:" + hashlib.sha256(b"%d" % i).hexdigest()
        out.append(
            usage_record(
                c,
                usage_id=f"use_{i}",
                mode="he_inference",
                units=1 + i % 3,
                outcome="charged",
                request_digest=d,
                idempotency_key_digest=d,
                time=T0 + timedelta(milliseconds=10 * i),
            )
        )
    return out


def runtime(d: Path) -> Any:
    from marketplace.runtime import Runtime
    from marketplace.settings import Settings

    d.mkdir(parents=True, exist_ok=True)  # the data dir d/data, its keys apart in d/keys
    return Runtime(Settings(data_dir=d / "data", key_dir=d / "keys", database_url=f"sqlite:///{d / 'som.db'}"))


def _bare_conn(d: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(d / "bare.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def bare_rows(d: Path, recs: list[dict[str, Any]], batch: int) -> float:
    """A bare sqlite3 insert of the same leaf rows into the same table, from the record dicts."""
    from operator import itemgetter

    from sqlalchemy.dialects import sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    from contracts.records import USAGE_SCHEMA
    from marketplace.db.models_ledger import LedgerLeaf, leaf_hash_prefix
    from marketplace.services.ledger import _LEAF_COLS, _USAGE_COLS

    table: Any = LedgerLeaf.__table__
    conn = _bare_conn(d)
    dialect = sqlite.dialect()
    conn.execute(str(CreateTable(table).compile(dialect=dialect)))
    for ix in table.indexes:
        conn.execute(str(CreateIndex(ix).compile(dialect=dialect)))
    marks = ", ".join("?" * len(_LEAF_COLS))
    sql = f"INSERT INTO {table.name} ({', '.join(_LEAF_COLS)}) VALUES ({marks})"  # noqa: S608 (constants)
    cols, none, sha = itemgetter(*_USAGE_COLS), (None,) * len(_USAGE_COLS), hashlib.sha256
    t = time.perf_counter()
    for b in range(0, len(recs), batch):
        rows = []
        for k, r in enumerate(recs[b : b + batch], b):
            data = canonicalize(r)
            h = sha(b"\x00" + data).digest()
            rows.append(
                (k, h, leaf_hash_prefix(h), data, r["schema"], *(cols(r) if r["schema"] == USAGE_SCHEMA else none))
            )
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows)
        conn.execute("COMMIT")
    took = time.perf_counter() - t
    conn.close()
    return took


def bare_sqlite(d: Path, recs: list[dict[str, Any]] | list[bytes], batch: int) -> float:
    """A one-table (idx, data) log of the canonical bytes: the least a log can store."""
    conn = _bare_conn(d)
    conn.execute("CREATE TABLE log (idx INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    t = time.perf_counter()
    for b in range(0, len(recs), batch):
        rows = [(b + k, r if isinstance(r, bytes) else canonicalize(r)) for k, r in enumerate(recs[b : b + batch])]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO log (idx, data) VALUES (?, ?)", rows)
        conn.execute("COMMIT")
    took = time.perf_counter() - t
    conn.close()
    return took


def ours(rt: Any, recs: list[dict[str, Any]], batch: int) -> float:
    from marketplace.services import ledger

    t = time.perf_counter()
    for b in range(0, len(recs), batch):
        with rt.tx() as s:
            ledger.append_many(s, recs[b : b + batch])
    return time.perf_counter() - t


def ours_prepared(rt: Any, prepared: list[Any], batch: int) -> float:
    from marketplace.services import ledger

    t = time.perf_counter()
    for b in range(0, len(prepared), batch):
        with rt.tx() as s:
            ledger.tree._append_prepared(s, prepared[b : b + batch])
    return time.perf_counter() - t


def bench_appends(n: int, batch: int, repeats: int) -> list[str]:
    from marketplace.services import ledger

    c = make_contract(n)
    recs = [contract_record(c, time=T0 - timedelta(hours=1)), *records(c, 0, n - 1)]
    prepared = [ledger.tree._prepare(r) for r in recs]
    raw = [p[1][2] for p in prepared]  # the canonical bytes
    bare, log1, mine, bare_b, mine_b = [], [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            bare.append(bare_rows(Path(tmp), recs, batch))
        with tempfile.TemporaryDirectory() as tmp:
            log1.append(bare_sqlite(Path(tmp), recs, batch))
        with tempfile.TemporaryDirectory() as tmp:
            rt = runtime(Path(tmp))
            mine.append(ours(rt, recs, batch))
            rt.close()
        with tempfile.TemporaryDirectory() as tmp:
            bare_b.append(bare_sqlite(Path(tmp), raw, batch))
        with tempfile.TemporaryDirectory() as tmp:
            rt = runtime(Path(tmp))
            mine_b.append(ours_prepared(rt, prepared, batch))
            rt.close()
    single_n = min(n, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        rt = runtime(Path(tmp))
        one = ours(rt, recs[:single_n], 1)
        rt.close()
    b, lg, m = statistics.median(bare), statistics.median(log1), statistics.median(mine)
    bb, mb = statistics.median(bare_b), statistics.median(mine_b)
    return [
        f"### Appends ({n:,} leaves, batches of {batch:,}, median of {repeats})",
        "",
        "| path | leaves/s | ratio to the bare insert of the same rows |",
        "| --- | ---: | ---: |",
        f"| bare sqlite3 insert of the same leaf rows (same table and indexes) | {n / b:,.0f} | 1.00 |",
        f"| `ledger.append_many` (validation, tree nodes, frontier, sequencer lock) | {n / m:,.0f} | **{b / m:.2f}** |",
        f"| `ledger.append`, one transaction per leaf ({single_n:,}) | {single_n / one:,.0f} | {(single_n / one) / (n / b):.2f} |",
        f"| for scale: bare one-table `(idx, data)` log of the canonical bytes | {n / lg:,.0f} | {b / lg:.2f} |",
        f"| storage only: bare `(idx, data)` insert of already canonical bytes | {n / bb:,.0f} | |",
        f"| storage only: ledger append of already validated, canonical, hashed leaves | {n / mb:,.0f} | |",
        "",
        "All main rows start from the record dicts, so all pay for RFC 8785 canonicalization "
        "(`crypto.canonical`); the storage-only rows leave it out. `append_many` against the "
        f"one-table log: {lg / m:.2f}.",
        "",
        f"Target: ratio >= 0.5 with batched appends: {'met' if b / m >= 0.5 else 'NOT met'}.",
        "",
    ]


def bench_large(size: int, samples: int) -> list[str]:
    from marketplace.cli.cmd_ledger import verify_dir
    from marketplace.services import ledger

    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        rt = runtime(d / "data")
        c = make_contract(size)
        t = time.perf_counter()
        chunk = 50_000
        with rt.tx() as s:
            ledger.append(s, contract_record(c, time=T0 - timedelta(hours=1)))
        done = 1
        while done < size:
            k = min(chunk, size - done)
            recs = records(c, done, k)
            with rt.tx() as s:
                ledger.append_many(s, recs)
            done += k
            if done % 200_000 < chunk or done == size:
                ledger.sign_checkpoint(rt)
        build = time.perf_counter() - t
        cp = ledger.sign_checkpoint(rt)
        rng = random.Random(7)
        inc, con = [], []
        for _ in range(samples):
            i = rng.randrange(size)
            t = time.perf_counter()
            with rt.tx() as s:
                proof = ledger.inclusion_proof(s, i, size)
                lh = ledger.leaf_row(s, i).leaf_hash
            inc.append(time.perf_counter() - t)
            verify_inclusion(bytes(lh), i, size, proof, cp.root_hash)
        for j in range(samples):
            m = rng.randrange(1, size)
            t = time.perf_counter()
            with rt.tx() as s:
                proof = ledger.consistency_proof(s, m, size)
            con.append(time.perf_counter() - t)
            if j < 5:
                with rt.tx() as s:
                    r1 = ledger.root_at(s, m)
                verify_consistency(m, size, proof, r1, cp.root_hash)
        # Export (the same files `som ledger export` writes) and verify offline.
        ex = d / "export"
        (ex / "checkpoints").mkdir(parents=True)
        (ex / "log.vkey").write_text(ledger.vkey(rt) + "\n")
        with rt.tx() as s:
            rows = s.execute(ledger._CPS.select()).all()
        for row in rows:
            (ex / "checkpoints" / f"{row.size}.note").write_text(row.note)
        with (ex / "leaves.jsonl").open("wb") as f:
            for idx, data in ledger.iter_leaves(rt, 0, size, batch=50_000):
                f.write(b'{"index":%d,"leaf":"%s"}\n' % (idx, base64.b64encode(data)))
        rt.close()
        t, cpu = time.perf_counter(), time.process_time()
        summary = verify_dir(ex, trusted_vkey=ledger.vkey(rt))
        verify, cpu = time.perf_counter() - t, time.process_time() - cpu
        if summary["leaves"] != size:
            raise SystemExit(f"verified {summary['leaves']} leaves, expected {size}")
        ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        out += [
            f"### Proofs and offline verification at {size:,} leaves",
            "",
            f"Built with `append_many` in batches of {chunk:,} (checkpoint every 200,000) in {build:.1f} s "
            f"({size / build:,.0f} leaves/s).",
            "",
            "| operation | median | p95 | target |",
            "| --- | ---: | ---: | --- |",
            f"| inclusion proof (one transaction, one node query), {samples} samples | {ms(inc):.2f} ms | "
            f"{sorted(inc)[int(0.95 * len(inc))] * 1e3:.2f} ms | < 5 ms: {'met' if ms(inc) < 5 else 'NOT met'} |",
            f"| consistency proof, {samples} samples | {ms(con):.2f} ms | "
            f"{sorted(con)[int(0.95 * len(con))] * 1e3:.2f} ms | < 5 ms: {'met' if ms(con) < 5 else 'NOT met'} |",
            f"| offline `som ledger verify` of the export (roots, signatures, compliance) | {verify:.1f} s | | "
            f"< 20 s: {'met' if verify < 20 else 'NOT met'} |",
            "",
            f"The verification used {cpu:.1f} s of CPU (one process) for {verify:.1f} s of wall clock.",
            "",
        ]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (10,000 leaves)")
    ap.add_argument("--size", type=int, default=None, help="tree size for proofs/verification (default 1,000,000)")
    ap.add_argument("--append", type=int, default=None, help="leaves for the append benchmark (default 50,000)")
    ap.add_argument("--batch", type=int, default=1000, help="append batch size")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=300)
    args = ap.parse_args()
    size = args.size or (10_000 if args.quick else 1_000_000)
    n_append = args.append or (10_000 if args.quick else 50_000)
    lines = ["## Ledger", ""]
    lines += bench_appends(n_append, args.batch, 1 if args.quick else args.repeats)
    lines += bench_large(size, 50 if args.quick else args.samples)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
