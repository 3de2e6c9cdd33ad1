"""Issue 10 §5, data hygiene: attacks on what the marketplace keeps, run against a real server.

Each test starts the app under uvicorn on loopback (real SQLite, real worker threads, real
sandbox) and talks to it over HTTP with the SDK, as a consumer, provider or outsider would:

* a final job (succeeded, failed, rejected, cancelled, expired) keeps no sealed input anywhere;
* a storm of requests with bad keys appends a bounded number of ledger leaves, not one each;
* failed submissions consume the contract's rate window (the next one is a 429 + Retry-After);
* an organisation's storage quota refuses an upload beyond it (413) and frees when jobs finish;
* a secret-looking CSV cell that fails parsing appears in no stored error, view, audit event,
  ledger export or log (nor a custom job's stderr).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from contracts.terms import JobLimits, Terms
from crypto.sealing import SealKeyPair
from crypto.signing import SigningKey
from marketplace.compute.payload import JobInput, seal_input
from marketplace.db.base import utcnow
from marketplace.sdk import SomAPIError, SomClient
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_jobs_support import features, model_arrays, model_npz, to_csv
from tests.scan import find_bytes

SECRET = "SECRET-4242"


@dataclass
class Live:
    """The app served on loopback and SDK clients speaking HTTP to it."""

    url: str
    rt: Any
    keys: dict[str, str]
    tmp: Path
    log_lines: list[str]

    def client(self, who: str | None) -> SomClient:
        return SomClient(self.url, self.keys[who] if who else None)

    @property
    def provider(self) -> SomClient:
        return self.client("provider")

    @property
    def consumer(self) -> SomClient:
        return self.client("consumer")

    @property
    def compliance(self) -> SomClient:
        return self.client("compliance")


class _Collect(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(self.format(record))


@pytest.fixture
def serve(tmp_path: Path, sqlite_url: str) -> Iterator[Callable[..., Any]]:
    """``serve(**settings)``: a real server on loopback with a world of organisations and keys."""
    from marketplace.api.app import create_app

    apps: list[Any] = []
    lines: list[str] = []
    handler = _Collect(lines)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # the server's loggers (som, uvicorn) at INFO, as `som serve` runs

    @contextmanager
    def _serve(**kw: Any) -> Iterator[Live]:
        kw.setdefault("workers", 1)
        kw.setdefault("agent_lease_seconds", 2.0)
        app = create_app(make_settings(tmp_path, sqlite_url, **kw))
        apps.append(app)
        world = build_world(app)
        with serve_in_thread(app) as url:
            yield Live(url=url, rt=app.state.runtime, keys=world.keys, tmp=tmp_path, log_lines=lines)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"

    try:
        yield _serve
    finally:
        for app in apps:
            app.state.runtime.close()
        root.removeHandler(handler)
        root.setLevel(old_level)


def _terms(*, rate: int = 100_000, window: int = 60) -> Terms:
    now = utcnow()
    return Terms(
        modes=frozenset({"remote_job"}),
        quota_units=10_000,
        rate_units=rate,
        rate_window_seconds=window,
        valid_from=now - timedelta(seconds=5),
        valid_until=now + timedelta(days=30),
        unit_price_minor=3,
        currency="EUR",
        max_batch=64,
        job_limits=JobLimits(frozenset({"predict", "evaluate", "custom"}), 30, 512, 60),
    )


def _offering(lv: Live, *, rate: int = 100_000, window: int = 60) -> str:
    """A published marketplace-hosted offering and the consumer's contract for it (over HTTP)."""
    w, b = model_arrays()
    prov, cons = lv.provider, lv.consumer
    off = prov.create_offering(name="risk", task="binary-classification", hosting="marketplace")
    prov.upload_version(off["id"], model_npz(w, b), format="npz")
    prov.publish(off["id"])
    offer = prov.publish_offer(off["id"], _terms(rate=rate, window=window), signing_key=SigningKey.generate())
    cons.accept_offer(offer["id"], signing_key=SigningKey.generate())
    return str(off["id"])


def _submit(
    cons: SomClient, offering_id: str, kind: str, data: bytes, *, units: int = 1, code: str | None = None
) -> tuple[dict[str, Any], bytes]:
    """Create, seal and upload a job by hand, keeping the sealed bytes; (job, sealed)."""
    job = cons.create_job(offering_id, kind, units=units, code=code, idempotency_key=str(uuid.uuid4()))
    inp = JobInput(
        job_id=job["id"],
        kind=kind,
        reply_public=SealKeyPair.generate().public_text(),
        data=data,
        format="csv",
        code=code,
    )
    sealed = seal_input(job["seal_public"], inp)
    return cons.upload_job_payload(job["id"], sealed), sealed


def _wait(cons: SomClient, job_id: str, states: set[str], timeout: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        job = cons.job(job_id)
        if job["status"] in states or time.monotonic() > end:
            return job
        time.sleep(0.05)


def _leaf_count(lv: Live) -> int:
    from sqlalchemy import func, select

    from marketplace.db.models_ledger import LedgerLeaf

    with lv.rt.tx() as s:
        return int(s.scalar(select(func.count()).select_from(LedgerLeaf)) or 0)


# -- sealed inputs are deleted when the job is final ---------------------------------------------


def test_sealed_input_is_gone_once_the_job_is_final(serve: Any) -> None:
    from marketplace.services import jobs

    with serve() as lv:
        off = _offering(lv)
        cons, prov = lv.consumer, lv.provider
        code = "open('outputs/n.txt', 'w').write(str(len(open('inputs/data.csv').read())))\n"
        good = to_csv(features(5))
        bad = b"1,2,3,4,5,6\n1,x,3,4,5,6\n"

        # a custom job awaiting approval holds its sealed input: it is in the store
        waiting, sealed_w = _submit(cons, off, "custom", good, code=code)
        addr_w = "sha256:" + hashlib.sha256(sealed_w).hexdigest()
        assert waiting["status"] == "awaiting_approval" and lv.rt.blobs.exists(addr_w)

        finals: dict[str, tuple[str, bytes]] = {}
        j, sealed = _submit(cons, off, "predict", good, units=5)
        finals["succeeded"] = (j["id"], sealed)
        j, sealed = _submit(cons, off, "predict", bad, units=2)
        finals["failed"] = (j["id"], sealed)
        j, sealed = _submit(cons, off, "custom", good, code=code)
        prov.reject_job(j["id"], j["code_digest"], "no")
        finals["rejected"] = (j["id"], sealed)
        j, sealed = _submit(cons, off, "custom", good, code=code)
        cons.cancel_job(j["id"])
        finals["cancelled"] = (j["id"], sealed)
        assert _wait(cons, finals["succeeded"][0], {"succeeded"})["status"] == "succeeded"
        assert _wait(cons, finals["failed"][0], {"failed"})["status"] == "failed"
        # the waiting job passes its deadline: the server's own sweeper, run at that time
        jobs.sweep(lv.rt, now=utcnow() + timedelta(hours=2))
        assert cons.job(waiting["id"])["status"] == "expired"
        finals["expired"] = (waiting["id"], sealed_w)

        from marketplace.db.models_jobs import Job

        for state, (job_id, sealed) in finals.items():
            job = cons.job(job_id)
            assert job["status"] == ("failed" if state == "rejected" else state), (state, job)
            addr = "sha256:" + hashlib.sha256(sealed).hexdigest()
            assert not lv.rt.blobs.exists(addr), f"the sealed input of a {state} job is still stored"
            with lv.rt.tx() as s:
                assert s.get(Job, job_id).input_blob == "", state
            # nothing of the sealed bytes anywhere: blob store, DB (and its WAL), logs, temp files
            assert find_bytes([sealed[64:128], sealed[-64:]], paths=[lv.tmp]) == [], state
        # the succeeded job's result is still there for the consumer, sealed to its reply key
        assert cons.job(finals["succeeded"][0])["result_available"]


# -- failed authentication is aggregated, not a leaf per request ---------------------------------


def test_a_storm_of_bad_keys_appends_a_bounded_number_of_leaves(serve: Any) -> None:
    window = 2.0
    # the failed-authentication throttle (429 after 20 per client) is raised here: this test is
    # about what 200 refused requests append to the log, not about the throttle
    with serve(
        auth_failure_window_seconds=window, auth_fail_max_per_client=10_000, auth_fail_max_per_prefix=10_000
    ) as lv:
        before = _leaf_count(lv)
        t0 = time.monotonic()
        bad_headers = [
            {},
            {"Authorization": "Bearer nope"},
            {"Authorization": "bearer som_abc_def"},
            {"Authorization": "Basic Zm9vOmJhcg=="},
        ]
        with httpx.Client(base_url=lv.url, timeout=30) as http:
            for i in range(200):
                h = bad_headers[i % 4] if i % 5 else {"Authorization": f"Bearer som_{uuid.uuid4().hex[:12]}_x"}
                r = http.get(["/v1/whoami", "/v1/jobs", "/v1/offerings", "/v1/audit"][i % 4], headers=h)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
            spanned = int((time.monotonic() - t0) / window) + 2  # windows the storm touched, at most
            during = _leaf_count(lv)
            assert during - before <= spanned, (before, during)
            # the summaries come when the window ends (a daemon flushes about twice per window)
            end = time.monotonic() + 5 * window
            total = 0
            while time.monotonic() < end:
                events = lv.compliance.audit(action="auth.failures")
                total = sum(e["detail"]["count"] for e in events)
                if total >= 200:
                    break
                time.sleep(0.2)
        after = _leaf_count(lv)
        assert total == 200, events
        # 200 failures from one client: one summary leaf per window it spanned, not 200
        assert len(events) <= spanned and after - before == len(events), (before, during, after, spanned)
        assert all(e["target"] == "127.0.0.1" and e["actor"] == "anonymous" for e in events)
        assert all(len(e["detail"]["key_prefixes"]) <= 8 for e in events)
        # authenticated denials stay one leaf each: a real principal refused on an object
        job = lv.consumer.create_job(_offering(lv), "predict", units=1)
        n = _leaf_count(lv)
        other = lv.client("other_consumer")
        for _ in range(3):
            with pytest.raises(SomAPIError) as e:
                other.job(job["id"])
            assert e.value.status == 404
        denied = lv.compliance.audit(action="authz.denied")
        assert len([d for d in denied if d["target"] == job["id"]]) == 3
        assert _leaf_count(lv) >= n + 3


# -- failed submissions consume the rate window ------------------------------------------------


def test_failed_submissions_count_against_the_rate_window(serve: Any) -> None:
    with serve() as lv:
        off = _offering(lv, rate=4, window=3600)
        cons = lv.consumer
        bad = b"1,2,3,4,5,6\nnot,a,row,of,numbers,!\n"
        for _ in range(4):  # four probes that fail; each used one unit of the window
            job, _sealed = _submit(cons, off, "predict", bad, units=1)
            done = _wait(cons, job["id"], {"failed"})
            assert done["status"] == "failed" and not done["charged"], done
        # nothing was charged, but the window is used up: the next submission is a 429
        with pytest.raises(SomAPIError) as e:
            _submit(cons, off, "predict", to_csv(features(1)), units=1)
        assert e.value.status == 429 and e.value.body["error"]["reason"] == "rate_limited"
        headers = {k.lower(): v for k, v in e.value.headers.items()}
        assert 1 <= int(headers["retry-after"]) <= 3600
        usage = lv.compliance.ledger_usage(offering_id=off)
        assert [u["record"]["outcome"] for u in usage] == ["released"] * 4


# -- per-organisation storage quota ----------------------------------------------------------------


def _big_model(n: int = 100_000) -> bytes:
    buf = io.BytesIO()
    np.savez(
        buf, **{"layer0.weight": np.ones((1, n)), "layer0.bias": np.ones(1), "layer0.activation": np.array("sigmoid")}
    )
    return buf.getvalue()


def test_storage_quota_refuses_uploads_beyond_it_and_frees_when_jobs_end(serve: Any) -> None:
    with serve(org_storage_quota_mb=1) as lv:
        off = _offering(lv)
        prov, cons = lv.provider, lv.consumer
        # the provider: a first big version fits in 1 MiB, a second one does not
        big = prov.create_offering(name="big", task="binary-classification", hosting="marketplace")
        prov.upload_version(big["id"], _big_model(), format="npz")
        r = httpx.post(
            f"{lv.url}/v1/offerings/{big['id']}/versions",
            params={"format": "npz"},
            content=_big_model(),
            headers={"Authorization": f"Bearer {lv.keys['provider']}", "Content-Type": "application/octet-stream"},
        )
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "payload_too_large" and "storage quota" in err["message"]
        assert len(prov.get_json(f"/v1/offerings/{big['id']}/versions")) == 1
        # the consumer: one stored input of ~600 KiB fits, a second one does not
        code = "print(1)\n"
        data = b"0.5,0.5,0.5,0.5,0.5,0.5\n" * 26_000
        first, _ = _submit(cons, off, "custom", data, code=code)
        assert first["status"] == "awaiting_approval"
        with pytest.raises(SomAPIError) as e:
            _submit(cons, off, "custom", data, code=code)
        assert e.value.status == 413 and e.value.code == "payload_too_large" and "quota" in e.value.message
        # the first job ends (cancelled): its input is deleted and the quota freed
        cons.cancel_job(first["id"])
        again, _ = _submit(cons, off, "custom", data, code=code)
        assert again["status"] == "awaiting_approval"


# -- consumer input values never reach stored errors, views, audit, ledger or logs ---------------


def test_a_secret_cell_that_fails_parsing_appears_nowhere(serve: Any) -> None:
    with serve() as lv:
        off = _offering(lv)
        cons, prov = lv.consumer, lv.provider
        csv = b"0.1,0.2,0.3,0.4,0.5,0.6\n0.1,0.2,0.3,0.4,0.5,0.6\n0.1," + SECRET.encode() + b",0.3,0.4,0.5,0.6\n"
        job, _ = _submit(cons, off, "predict", csv, units=3)
        done = _wait(cons, job["id"], {"failed"})
        assert done["status"] == "failed" and done["error_reason"] == "bad_input"
        assert done["error"] == "csv line 3, column 2: not a number", done["error"]
        # a custom job whose code prints the input to stderr and fails: the stderr is not stored
        code = "import sys\nsys.stderr.write(open('inputs/data.csv').read())\nsys.exit(3)\n"
        cj, _ = _submit(cons, off, "custom", csv, code=code)
        prov.approve_job(cj["id"], cj["code_digest"])
        cdone = _wait(cons, cj["id"], {"failed"})
        assert cdone["status"] == "failed" and cdone["error"], cdone

        secret = SECRET.encode()
        for view in (
            cons.job(job["id"]),
            prov.job(job["id"]),
            prov.job(cj["id"]),
            *prov.jobs(role="provider"),
            *cons.jobs(),
        ):
            assert SECRET not in json.dumps(view), view
        trail = lv.compliance.paginate("/v1/audit", limit=200)
        assert trail and SECRET not in json.dumps(trail)
        export = b"\n".join(lv.compliance.ledger_export_lines())
        assert export and secret not in export
        logs = "\n".join(lv.log_lines)
        assert SECRET not in logs
        lv.rt.close()  # flush everything to disk before scanning it
        # the DB (and WAL), the blob store and the server's log file under the data directory
        assert find_bytes([secret], paths=[lv.tmp]) == []
        assert lv.rt.log_path.exists() and secret not in lv.rt.log_path.read_bytes()
