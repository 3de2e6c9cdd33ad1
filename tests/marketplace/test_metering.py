"""Exactly-once metering against the real runtime, on SQLite and PostgreSQL.

Idempotent replays, conflicting keys, release, leases after a crash (a killed subprocess),
rate limits, and 200 concurrent threads against a quota of 100.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from crypto.canonical import canonicalize
from marketplace.db.base import utcnow
from marketplace.db.models_contracts import ContractRow, UsageRow
from marketplace.errors import Conflict, Invalid, NotFound, PolicyDenied
from marketplace.sdk.ledger_api import decode_receipt_header, verify_receipt
from marketplace.services import metering
from marketplace.services.identity import Principal
from tests.marketplace.test_contracts_support import make_deal, usage_leaves

RD = metering.request_digest


def _begin(world, d, key: str, *, units: int = 1, digest: str | None = None, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("mode", "remote_job")
    kw.setdefault("job_kind", "predict")
    return metering.begin(
        world.rt,
        d.consumer,
        offering_id=d.offering_id,
        units=units,
        idempotency_key=key,
        request_digest=digest or RD(key),
        **kw,
    )


def _counters(world, cid: str) -> tuple[int, int]:
    with world.rt.tx() as s:
        c = s.get(ContractRow, cid)
        return c.used_units, c.reserved_units


def test_commit_replay_and_receipt(world) -> None:
    d = make_deal(world, price=3)
    r = _begin(world, d, "k-1", units=4)
    assert r.replay is None and r.metered and r.contract_id == d.contract_id
    assert _counters(world, d.contract_id) == (0, 4)
    ch = metering.commit(world.rt, r, result=b"\x00ciphertext", media_type="application/octet-stream")
    assert _counters(world, d.contract_id) == (4, 0)
    # The receipt verifies offline against the ledger key and carries this use's leaf.
    verify_receipt(ch.receipt, world.consumer.ledger_key())
    leaf = json.loads(base64.b64decode(ch.receipt["leaf"]))
    assert leaf["usage_id"] == ch.usage_id and leaf["outcome"] == "charged"
    assert leaf["units"] == 4 and leaf["amount_minor"] == 12
    assert leaf["idempotency_key_digest"] == metering.key_digest("k-1") != "k-1"
    assert leaf["request_digest"] == RD("k-1")
    assert decode_receipt_header(metering.receipt_header(ch.receipt)) == ch.receipt
    # Same key, same request: the first answer again, nothing charged again.
    again = _begin(world, d, "k-1", units=4)
    assert again.replay is not None
    assert again.replay.body == b"\x00ciphertext" and again.replay.usage_id == ch.usage_id
    assert again.replay.media_type == "application/octet-stream"
    assert again.replay.receipt["index"] == ch.ledger_index
    with pytest.raises(ValueError):
        metering.commit(world.rt, again, result=b"other", media_type="x/y")
    assert _counters(world, d.contract_id) == (4, 0)
    assert len(usage_leaves(world, d.contract_id)) == 1
    # Same key, another request: 422.
    with pytest.raises(Invalid):
        _begin(world, d, "k-1", units=4, digest=RD("something else"))
    # The receipt endpoint: consumer and provider see it, others do not.
    assert world.consumer.receipt(ch.usage_id)["receipt"] == ch.receipt
    assert world.provider.receipt(ch.usage_id)["outcome"] == "charged"
    with pytest.raises(Exception) as ei:
        world.other_consumer.receipt(ch.usage_id)
    assert ei.value.status == 404  # type: ignore[attr-defined]


def test_in_flight_conflict_release_and_retry(world) -> None:
    d = make_deal(world)
    r = _begin(world, d, "k-2", units=2)
    with pytest.raises(Conflict) as ei:
        _begin(world, d, "k-2", units=2)
    assert "Retry-After" in ei.value.headers
    metering.release(world.rt, r, reason="worker crashed")
    metering.release(world.rt, r, reason="twice is a no-op")
    assert _counters(world, d.contract_id) == (0, 0)
    # A failed computation may be retried with the same key; it is charged exactly once.
    r2 = _begin(world, d, "k-2", units=2)
    assert r2.usage_id != r.usage_id
    metering.commit(world.rt, r2, result=b"ok", media_type="text/plain")
    with pytest.raises(Conflict):  # committing a released reservation charges nothing
        metering.commit(world.rt, r, result=b"late", media_type="text/plain")
    leaves = usage_leaves(world, d.contract_id)
    assert [(x["usage_id"], x["outcome"], x["amount_minor"]) for x in leaves] == [
        (r.usage_id, "released", 0),
        (r2.usage_id, "charged", 10),
    ]
    assert _counters(world, d.contract_id) == (2, 0)


def test_resolution_and_argument_errors(world) -> None:
    d = make_deal(world)
    with pytest.raises(Invalid):
        metering.begin(
            world.rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            units=1,
            idempotency_key="",
            request_digest=RD("x"),
        )
    with pytest.raises(Invalid):
        metering.begin(
            world.rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            units=0,
            idempotency_key="a",
            request_digest=RD("x"),
        )
    with pytest.raises(Invalid):
        metering.begin(
            world.rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            units=1,
            idempotency_key="a",
            request_digest="md5:xyz",
        )
    other = Principal("key_x", world.orgs["other_consumer"], frozenset({"consumer"}))
    with pytest.raises(NotFound):  # no contract of this org for the offering
        metering.begin(
            world.rt,
            other,
            offering_id=d.offering_id,
            mode="remote_job",
            job_kind="predict",
            units=1,
            idempotency_key="a",
            request_digest=RD("x"),
        )
    with pytest.raises(NotFound):  # someone else's contract by id
        metering.begin(
            world.rt,
            other,
            offering_id=d.offering_id,
            mode="remote_job",
            job_kind="predict",
            units=1,
            idempotency_key="a",
            request_digest=RD("x"),
            contract_id=d.contract_id,
        )
    # Idempotency keys are per organisation: the same key in another org is unrelated.
    r = _begin(world, d, "shared-key")
    metering.release(world.rt, r, reason="test")


def test_policy_denials(world) -> None:
    d = make_deal(world, quota=10, rate=3, window=60, modes=("he_inference", "remote_job"), max_batch=4)
    with pytest.raises(PolicyDenied) as ei:
        _begin(world, d, "x1", mode="he_inference", job_kind=None)  # no key set given
    assert ei.value.reason == "keyset_not_bound"
    with pytest.raises(PolicyDenied) as ei:
        _begin(world, d, "x2", job_kind="custom")
    assert ei.value.reason == "job_kind_not_allowed"
    with pytest.raises(PolicyDenied) as ei:
        _begin(world, d, "x3", units=2, batch_size=5)
    assert ei.value.reason == "batch_too_large"
    # A key set counts only when it is registered for this contract and not revoked.
    from marketplace.db.models_he import Keyset

    with world.rt.tx() as s:
        for kid, contract_id in (("ks_good", d.contract_id), ("ks_other", "ctr_someone_else")):
            s.add(
                Keyset(
                    id=kid,
                    org_id=d.consumer.org_id,
                    offering_id=d.offering_id,
                    contract_id=contract_id,
                    plan_digest="sha256:" + "0" * 64,
                    blob="sha256:" + "0" * 64,
                    size=0,
                    layouts=[],
                    created_by="key_test",
                )
            )
    for bad in ("ks_missing", "ks_other"):
        with pytest.raises(PolicyDenied) as ei:
            _begin(world, d, f"x4-{bad}", mode="he_inference", job_kind=None, keyset_id=bad)
        assert ei.value.reason == "keyset_not_bound"
    r = _begin(world, d, "x5", mode="he_inference", job_kind=None, keyset_id="ks_good")
    metering.commit(world.rt, r, result=b"", media_type="x/y")
    # Rate: 3 units per 60 s window; the 4th unit is a 429 with Retry-After.
    t0 = d_now = utcnow()
    for i in range(2):
        metering.commit(world.rt, _begin(world, d, f"r{i}", now=t0), result=b"", media_type="x/y")
    with pytest.raises(PolicyDenied) as ei:
        _begin(world, d, "r-over", now=t0)
    assert ei.value.reason == "rate_limited" and ei.value.status == 429
    wait = int(ei.value.headers["Retry-After"])
    assert 1 <= wait <= 60
    # After the window, the same request goes through.
    r = _begin(world, d, "r-over", now=d_now + timedelta(seconds=wait))
    metering.commit(world.rt, r, result=b"", media_type="x/y", now=d_now + timedelta(seconds=wait))
    # Quota: 10 units in total, 4 used so far; reservations in flight count too.
    later = d_now + timedelta(seconds=wait + 120)
    _begin(world, d, "q-1", units=3, now=later, batch_size=1)
    _begin(world, d, "q-2", units=3, now=later + timedelta(seconds=60), batch_size=1)
    with pytest.raises(PolicyDenied) as ei:
        _begin(world, d, "q-3", units=1, now=later + timedelta(seconds=120), batch_size=1)
    assert ei.value.reason == "quota_exhausted" and ei.value.status == 403


def test_expired_lease_returns_quota(world) -> None:
    d = make_deal(world, quota=5)
    t = utcnow()
    _begin(world, d, "hold", units=5, now=t, lease_seconds=30)
    with pytest.raises(PolicyDenied):
        _begin(world, d, "next", units=1, now=t + timedelta(seconds=10))
    r = _begin(world, d, "next", units=1, now=t + timedelta(seconds=31))
    metering.commit(world.rt, r, result=b"", media_type="x/y", now=t + timedelta(seconds=31))
    outcomes = Counter(x["outcome"] for x in usage_leaves(world, d.contract_id))
    assert outcomes == {"released": 1, "charged": 1}
    assert _counters(world, d.contract_id) == (1, 0)


def test_metering_off_passes_through(world) -> None:
    d = make_deal(world)
    world.rt.settings.metering = False
    try:
        r = _begin(world, d, "off-1", units=1000)
        assert not r.metered and r.replay is None
        ch = metering.commit(world.rt, r, result=b"x", media_type="x/y")
        assert ch.ledger_index is None and ch.receipt == {}
        metering.release(world.rt, r, reason="noop")
    finally:
        world.rt.settings.metering = True
    assert usage_leaves(world, d.contract_id) == []


def test_concurrent_requests_never_overspend(world) -> None:
    """200 threads, quota 100: exactly 100 charges, 100 records, 100 leaves, no duplicates."""
    d = make_deal(world, quota=100, rate=10_000)
    barrier = threading.Barrier(200)
    results: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        barrier.wait()
        try:
            r = _begin(world, d, f"c-{i}")
            metering.commit(world.rt, r, result=f"r{i}".encode(), media_type="text/plain")
            out = "ok"
        except PolicyDenied as e:
            out = e.reason
        except Exception as e:  # noqa: BLE001 - reported below
            out = f"error {type(e).__name__}: {e}"
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert Counter(results) == {"ok": 100, "quota_exhausted": 100}
    with world.rt.tx() as s:
        n = s.scalar(
            select(func.count())
            .select_from(UsageRow)
            .where(UsageRow.contract_id == d.contract_id, UsageRow.state == "charged")
        )
    assert n == 100
    leaves = usage_leaves(world, d.contract_id)
    assert len(leaves) == 100 and len({x["usage_id"] for x in leaves}) == 100
    assert len({x["idempotency_key_digest"] for x in leaves}) == 100
    assert _counters(world, d.contract_id) == (100, 0)


def test_concurrent_retries_of_one_key_charge_once(world) -> None:
    d = make_deal(world, quota=100)
    barrier = threading.Barrier(40)
    outcomes: list[str] = []

    def one() -> None:
        barrier.wait()
        try:
            r = _begin(world, d, "same-key", units=3)
            if r.replay is not None:
                outcomes.append("replay")
                return
            metering.commit(world.rt, r, result=b"first", media_type="text/plain")
            outcomes.append("charged")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=one) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert outcomes.count("charged") == 1 and len(outcomes) == 40
    assert [x["outcome"] for x in usage_leaves(world, d.contract_id)] == ["charged"]
    assert _counters(world, d.contract_id) == (3, 0)


_CRASH = """
import sys, time
from marketplace.runtime import Runtime
from marketplace.settings import Settings
from marketplace.services import metering
from marketplace.services.identity import Principal
data_dir, db_url, org, offering, key = sys.argv[1:6]
rt = Runtime(Settings(data_dir=data_dir, database_url=db_url), migrate=False)
p = Principal("key_crash", org, frozenset({"consumer"}))
r = metering.begin(rt, p, offering_id=offering, mode="remote_job", job_kind="predict", units=2,
                   idempotency_key=key, request_digest=metering.request_digest(key), lease_seconds=60)
print(r.usage_id, flush=True)
time.sleep(600)  # "computing" when it is killed
"""


def test_crash_between_compute_and_commit(world, tmp_path: Path) -> None:
    d = make_deal(world)
    rt = world.rt
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and script
        [
            sys.executable,
            "-c",
            _CRASH,
            str(rt.settings.data_dir),
            rt.settings.resolved_database_url(),
            world.orgs["consumer"],
            d.offering_id,
            "crash-key",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith("use_"), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    # The process died holding a reservation: nothing was charged, units are held.
    assert _counters(world, d.contract_id) == (0, 2)
    assert usage_leaves(world, d.contract_id) == []
    # A retry inside the lease is told to wait.
    with pytest.raises(Conflict):
        _begin(world, d, "crash-key", units=2, digest=RD("crash-key"))
    # After the lease, the retry proceeds and completes exactly once.
    later = utcnow() + timedelta(seconds=61)
    r = _begin(world, d, "crash-key", units=2, digest=RD("crash-key"), now=later)
    assert r.replay is None and r.usage_id != line
    metering.commit(rt, r, result=b"done", media_type="text/plain", now=later)
    again = _begin(world, d, "crash-key", units=2, digest=RD("crash-key"), now=later)
    assert again.replay is not None and again.replay.body == b"done"
    leaves = usage_leaves(world, d.contract_id)
    assert [(x["usage_id"], x["outcome"]) for x in leaves] == [(line, "released"), (r.usage_id, "charged")]
    assert _counters(world, d.contract_id) == (2, 0)


def test_receipt_header_is_canonical_base64url() -> None:
    rec = {"b": 1, "a": [1, 2], "leaf": "x+/="}
    h = metering.receipt_header(rec)
    assert "+" not in h and "/" not in h
    assert base64.urlsafe_b64decode(h) == canonicalize(rec)
