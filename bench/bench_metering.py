"""Metering overhead: begin + commit (policy, reservation, usage record, ledger leaf, result kept
for replays) around the same small piece of work, with metering on and off, in one run.

Prints a markdown section (``make bench`` collects it into docs/benchmarks.md). SQLite (WAL) on a
temporary data dir, sequential requests from one thread; the receipt (inclusion proof and a
checkpoint, signed when none covers the leaf yet) is reported separately because a caller can
fetch it lazily.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.offer import accept_offer, make_offer  # noqa: E402
from contracts.terms import Terms  # noqa: E402
from crypto.signing import SigningKey  # noqa: E402
from marketplace.db.base import utcnow  # noqa: E402
from marketplace.db.models import Offering  # noqa: E402
from marketplace.runtime import Runtime  # noqa: E402
from marketplace.services import audit, identity, metering  # noqa: E402
from marketplace.services import contracts as svc  # noqa: E402
from marketplace.settings import Settings  # noqa: E402

PAYLOAD = bytes(range(256)) * 64  # 16 KiB "ciphertext"


def work(body: bytes) -> bytes:
    """The same stand-in computation in both arms: hash the body a few times."""
    h = body
    for _ in range(8):
        h = hashlib.sha256(h).digest()
    return h * 64


def setup(rt: Runtime) -> tuple[identity.Principal, str]:
    with rt.tx() as s:
        prov = identity.create_org(s, "bench-provider")
        cons = identity.create_org(s, "bench-consumer")
        off = Offering(
            org_id=prov.id,
            name="bench",
            task="t",
            input_schema={},
            output_schema={},
            tags=[],
            hosting="provider",
            status="published",
        )
        s.add(off)
        s.flush()
        pid, cid, oid = prov.id, cons.id, off.id
    now = utcnow()
    terms = Terms(
        modes=frozenset({"remote_job"}),
        quota_units=10**9,
        rate_units=10**9,
        rate_window_seconds=60,
        valid_from=now - timedelta(days=1),
        valid_until=now + timedelta(days=1),
        unit_price_minor=1,
        currency="EUR",
        max_batch=64,
    )
    offer = make_offer(
        offer_id="ofr_bench0001", offering_id=oid, provider_org=pid, terms=terms, signing_key=SigningKey.generate()
    )
    pp = identity.Principal("key_p", pid, frozenset({"provider"}))
    cp = identity.Principal("key_c", cid, frozenset({"consumer"}))
    with rt.tx() as s:
        svc.publish_offer(s, pp, oid, offer.to_dict(), audit.Actor("key_p", pid))
    acc = accept_offer(offer, consumer_org=cid, signing_key=SigningKey.generate()).acceptance
    with rt.tx() as s:
        svc.accept_offer(s, cp, offer.offer_id, acc.to_dict(), audit.Actor("key_c", cid))
    return cp, oid


def one(rt: Runtime, p: identity.Principal, oid: str, i: int, *, receipt: bool) -> float:
    t0 = time.perf_counter()
    r = metering.begin(
        rt,
        p,
        offering_id=oid,
        mode="remote_job",
        job_kind="predict",
        units=1,
        idempotency_key=f"bench-{i}",
        request_digest=metering.request_digest(PAYLOAD, str(i)),
    )
    out = work(PAYLOAD)
    if receipt:
        metering.commit(rt, r, result=out, media_type="application/octet-stream")
    else:  # commit without fetching the receipt: the transaction only
        _commit_no_receipt(rt, r, out)
    return time.perf_counter() - t0


def _commit_no_receipt(rt: Runtime, r: metering.Reservation, out: bytes) -> None:
    real = metering.reserve.ledger_receipt
    metering.reserve.ledger_receipt = lambda _rt, _i: {}  # type: ignore[assignment]
    try:
        metering.commit(rt, r, result=out, media_type="application/octet-stream")
    finally:
        metering.reserve.ledger_receipt = real  # type: ignore[assignment]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-n", type=int, default=None)
    args = ap.parse_args()
    n = args.n or (200 if args.quick else 2000)
    with tempfile.TemporaryDirectory() as d:
        rt = Runtime(Settings(data_dir=Path(d) / "data", key_dir=Path(d) / "keys"))
        try:
            p, oid = setup(rt)
            for i in range(50):  # warm up caches, connections, the ledger key
                one(rt, p, oid, -1 - i, receipt=True)
            arms: dict[str, list[float]] = {"off": [], "tx": [], "full": []}
            for i in range(n):  # interleaved so that drift hits every arm alike
                rt.settings.metering = False
                arms["off"].append(one(rt, p, oid, 10 * n + i, receipt=False))
                rt.settings.metering = True
                arms["tx"].append(one(rt, p, oid, 20 * n + i, receipt=False))
                arms["full"].append(one(rt, p, oid, 30 * n + i, receipt=True))
        finally:
            rt.close()
    off50, off99 = pct(arms["off"], 0.5), pct(arms["off"], 0.99)
    print("## Metering overhead (SQLite, WAL)\n")
    print(
        f"{n} sequential requests per arm, interleaved; work = 16 KiB body hashed; one thread. "
        "Overhead = metered minus unmetered at the same percentile.\n"
    )
    print("| arm | p50 ms | p99 ms | overhead p50 ms | overhead p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    labels = {
        "off": "metering off (work only)",
        "tx": "metering on: policy + reservation + usage record + ledger leaf + stored result",
        "full": "... plus the receipt (inclusion proof, checkpoint signed when needed)",
    }
    for k in ("off", "tx", "full"):
        p50, p99 = pct(arms[k], 0.5), pct(arms[k], 0.99)
        print(f"| {labels[k]} | {p50:.3f} | {p99:.3f} | {p50 - off50:.3f} | {p99 - off99:.3f} |")
    mean = statistics.fmean(arms["tx"]) * 1000 - statistics.fmean(arms["off"]) * 1000
    print(f"\nMean overhead (on, without receipt): {mean:.3f} ms. Target: under 3 ms p50 on SQLite.")


if __name__ == "__main__":
    main()
