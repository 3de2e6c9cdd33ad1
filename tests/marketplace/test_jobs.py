"""Remote-execution jobs through the real app (SQLite and PostgreSQL): sealed end to end,
metered once, approval of custom code, cancellation, limits, bad payloads."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto.sealing import SealKeyPair, job_info, seal
from marketplace.compute.payload import JobInput, code_digest, open_result, seal_input
from marketplace.sdk import SomAPIError
from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import (
    expected,
    features,
    offering,
    to_csv,
    usage_rows,
    wait_usage,
)
from tests.scan import find_bytes, float_patterns


@pytest.fixture
def jw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, agent_lease_seconds=2.0, agent_offline_seconds=4.0, workers=1))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _parse_csv(body: bytes) -> np.ndarray:
    return np.array([[float(v) for v in line.split(",")] for line in body.decode().splitlines() if line])


def test_predict_on_marketplace_hosted_is_sealed_and_charged_once(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    x = features(25)
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(x))
    assert sub.job["status"] == "queued" and sub.job["units"] == 25
    job = jw.consumer.wait_job(sub.id, timeout=30)
    assert job["status"] == "succeeded", job
    assert job["charged"] and job["usage_id"] and job["receipt"]["index"] >= 0
    res = jw.consumer.job_result(sub.id, sub.reply_key)
    np.testing.assert_allclose(_parse_csv(res.body), expected(st.weight, st.bias, x), rtol=1e-9)
    assert usage_rows(jw, st.contract_id) == [("charged", 25)]
    # another party cannot see it; the provider sees the job but not the result
    with pytest.raises(SomAPIError) as e:
        jw.other_consumer.job(sub.id)
    assert e.value.status == 404
    assert jw.provider.job(sub.id)["id"] == sub.id
    with pytest.raises(SomAPIError) as e:
        jw.provider.job_result_sealed(sub.id)
    assert e.value.status == 404
    # the marketplace stored opaque bytes only: no input value in its DB, blobs or logs
    rt = jw.rt
    paths = [rt.data_dir]
    if rt.engine.url.database and rt.engine.dialect.name == "sqlite":
        paths.append(Path(rt.engine.url.database))
    assert find_bytes(float_patterns(x), paths=paths) == []
    assert find_bytes([to_csv(x)[:40]], paths=paths) == []
    # the worker decrypted the model for this job, and the audit trail says so
    events = [ev["action"] for ev in jw.admin.paginate("/v1/audit", limit=200)]
    assert "artifact.decrypt" in events and "job.succeed" in events


def test_evaluate_returns_metrics_only(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    x = features(40)
    p = expected(st.weight, st.bias, x)[:, 0]
    y = (p > 0.5).astype(float)
    y[:4] = 1 - y[:4]  # four wrong labels: accuracy 0.9
    data = to_csv(np.column_stack([x, y]))
    sub = jw.consumer.submit_job(st.offering_id, "evaluate", data)
    assert jw.consumer.wait_job(sub.id, timeout=30)["status"] == "succeeded"
    res = jw.consumer.job_result(sub.id, sub.reply_key)
    assert res.body == b"" and res.metrics["n"] == 40
    assert res.metrics["accuracy"] == pytest.approx(0.9)


def test_too_many_rows_fails_and_releases(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(10)), units=3)
    job = jw.consumer.wait_job(sub.id, timeout=30)
    assert job["status"] == "failed" and job["error_reason"] == "too_many_rows" and not job["charged"]
    assert wait_usage(jw, st.contract_id, [("released", 3)]) == [("released", 3)]
    with pytest.raises(SomAPIError) as e:
        jw.consumer.job_result_sealed(sub.id)
    assert e.value.status == 409


def test_custom_job_needs_approval_of_the_exact_code(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    code = "import os\nrows = open('inputs/data.csv').read().splitlines()\nopen('outputs/n.txt','w').write(str(len(rows)))\nprint('ok')\n"
    sub = jw.consumer.submit_job(st.offering_id, "custom", to_csv(features(7)), code=code, limits={"cpu_seconds": 10})
    assert sub.job["status"] == "awaiting_approval"
    pending = jw.provider.jobs(role="provider", status="awaiting_approval")
    assert [j["id"] for j in pending] == [sub.id] and pending[0]["code"] == code
    assert pending[0]["code_digest"] == code_digest(code)
    with pytest.raises(SomAPIError) as e:  # a digest of other code is not an approval
        jw.provider.approve_job(sub.id, code_digest("print(1)"))
    assert e.value.status == 409
    with pytest.raises(SomAPIError) as e:  # the consumer cannot approve its own code
        jw.consumer.approve_job(sub.id, code_digest(code))
    assert e.value.status in (403, 404)
    with pytest.raises(SomAPIError) as e:
        jw.other_provider.approve_job(sub.id, code_digest(code))
    assert e.value.status == 404
    approved = jw.provider.approve_job(sub.id, code_digest(code))
    assert approved["status"] == "queued"
    job = jw.consumer.wait_job(sub.id, timeout=60)
    assert job["status"] == "succeeded", job
    res = jw.consumer.job_result(sub.id, sub.reply_key)
    assert res.outputs == ("n.txt",) and "ok" in res.stdout
    with zipfile.ZipFile(io.BytesIO(res.body)) as z:
        assert z.read("n.txt") == b"7"
    # approval is an audit event and a ledger leaf
    actions = [ev["action"] for ev in jw.admin.paginate("/v1/audit", limit=500)]
    assert "job.approve" in actions
    leaves = _ledger_leaves(jw)
    assert any(
        r["schema"] == "som.job-approval/v1" and r["job_id"] == sub.id and r["decision"] == "approved" for r in leaves
    )


def _ledger_leaves(w: Any) -> list[dict[str, Any]]:
    from contracts.records import parse_record
    from marketplace.services import ledger

    with w.rt.sessions() as s:
        size = ledger.tree_size(s)
    return [parse_record(data) for _, data in ledger.iter_leaves(w.rt, 0, size)]


def test_rejected_custom_job_fails_uncharged(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    code = "import socket\n"
    sub = jw.consumer.submit_job(st.offering_id, "custom", b"1,2\n", code=code)
    out = jw.provider.reject_job(sub.id, code_digest(code), reason="no network code")
    assert out["status"] == "failed" and out["error_reason"] == "rejected"
    assert wait_usage(jw, st.contract_id, [("released", 1)]) == [("released", 1)]
    leaves = _ledger_leaves(jw)
    assert any(r["schema"] == "som.job-approval/v1" and r["decision"] == "rejected" for r in leaves)


@pytest.mark.parametrize(
    ("code", "limits", "reason"),
    [
        ("x = bytearray(400 * 1024 * 1024)\n", {"memory_mb": 128}, "memory_limit"),
        ("while True:\n    pass\n", {"cpu_seconds": 1, "wall_seconds": 5}, "cpu_limit"),
        ("import time\ntime.sleep(30)\n", {"cpu_seconds": 5, "wall_seconds": 1}, "timeout"),
    ],
)
def test_custom_job_over_its_limits_fails_cleanly(
    jw: Any, tmp_path: Path, code: str, limits: dict[str, Any], reason: str
) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    sub = jw.consumer.submit_job(st.offering_id, "custom", b"1\n", code=code, limits=limits)
    jw.provider.approve_job(sub.id, code_digest(code))
    job = jw.consumer.wait_job(sub.id, timeout=60)
    assert job["status"] == "failed" and job["error_reason"] == reason, job
    assert job["error"] and not job["charged"]
    assert wait_usage(jw, st.contract_id, [("released", 1)]) == [("released", 1)]


def test_cancel_releases_and_final_jobs_cannot_be_cancelled(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    code = "print(1)\n"
    sub = jw.consumer.submit_job(st.offering_id, "custom", b"1\n", code=code)
    with pytest.raises(SomAPIError) as e:
        jw.other_consumer.cancel_job(sub.id)
    assert e.value.status == 404
    assert jw.consumer.cancel_job(sub.id)["status"] == "cancelled"
    with pytest.raises(SomAPIError) as e:
        jw.consumer.cancel_job(sub.id)
    assert e.value.status == 409
    with pytest.raises(SomAPIError) as e:
        jw.provider.approve_job(sub.id, code_digest(code))
    assert e.value.status == 409
    assert wait_usage(jw, st.contract_id, [("released", 1)]) == [("released", 1)]


def test_malformed_oversized_and_replayed_payloads(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace")
    job = jw.consumer.create_job(st.offering_id, "predict", units=2, idempotency_key="k-1")
    again = jw.consumer.create_job(st.offering_id, "predict", units=2, idempotency_key="k-1")
    assert again["id"] == job["id"]
    with pytest.raises(SomAPIError) as e:
        jw.consumer.create_job(st.offering_id, "evaluate", units=2, idempotency_key="k-1")
    assert e.value.status == 422
    for bad in (b"", b"plain text, not sealed", b"SOMSEAL\x02\x01" + bytes(60)):
        with pytest.raises(SomAPIError) as e:
            jw.consumer.upload_job_payload(job["id"], bad)
        assert e.value.status == 422, bad
    r = jw.consumer._http.post(
        f"/v1/jobs/{job['id']}/payload",
        content=b"x" * (jw.rt.settings.max_sealed_bytes + 2048),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 413
    r = jw.consumer._http.post(f"/v1/jobs/{job['id']}/payload", content=b"x", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    with pytest.raises(SomAPIError) as e:  # no Idempotency-Key
        jw.consumer.post_json("/v1/jobs", {"offering_id": st.offering_id, "kind": "predict"})
    assert e.value.status == 422
    # sealed to the wrong key: accepted as opaque bytes, fails at the compute site, uncharged
    reply = SealKeyPair.generate()
    blob = seal_input(
        SealKeyPair.generate().public_text(), JobInput(job["id"], "predict", reply.public_text(), to_csv(features(2)))
    )
    assert jw.consumer.upload_job_payload(job["id"], blob)["status"] == "queued"
    assert jw.consumer.upload_job_payload(job["id"], blob)["status"] in (
        "queued",
        "running",
        "failed",
    )  # same bytes: idempotent
    other = seal(job["seal_public"], b"x", info=job_info(job["id"], "input"))
    with pytest.raises(SomAPIError) as e:
        jw.consumer.upload_job_payload(job["id"], other)
    assert e.value.status == 409
    done = jw.consumer.wait_job(job["id"], timeout=30)
    assert done["status"] == "failed" and done["error_reason"] == "bad_input" and not done["charged"]


def test_quota_denies_submission(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace", quota=5)
    with pytest.raises(SomAPIError) as e:
        jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(6)))
    assert e.value.status in (403, 429) and e.value.code == "policy_denied"


def _denials(jw: Any) -> list[Any]:
    from sqlalchemy import select

    from marketplace.db.models import AuditEvent

    with jw.rt.tx() as s:
        return [
            (e.actor, e.org_id, e.target, e.outcome, e.detail, e.request_id)
            for e in s.scalars(select(AuditEvent).where(AuditEvent.action == "authz.denied").order_by(AuditEvent.seq))
        ]


def test_policy_denials_are_audited_with_the_reason(jw: Any, tmp_path: Path) -> None:
    """A use the contract does not allow is a failed authorization: one authz.denied event,
    naming the contract and the reason, also a ledger leaf; the error names the contract."""
    st = offering(jw, tmp_path, hosting="marketplace", quota=5, kinds=("predict",))
    who = jw.consumer.get_json("/v1/whoami")
    assert _denials(jw) == []
    for kind, data, reason in (
        ("predict", to_csv(features(6)), "quota_exhausted"),
        ("evaluate", to_csv(np.column_stack([features(2), np.ones(2)])), "job_kind_not_allowed"),
    ):
        with pytest.raises(SomAPIError) as e:
            jw.consumer.submit_job(st.offering_id, kind, data)
        assert e.value.status == 403 and e.value.body["error"]["reason"] == reason
        assert e.value.body["error"]["contract_id"] == st.contract_id
        rid = e.value.headers.get("x-request-id")
        actor, org, target, outcome, detail, req = _denials(jw)[-1]
        assert (actor, org, target, outcome) == (who["key_id"], who["org_id"], st.contract_id, "denied")
        assert detail["reason"] == reason and detail["offering_id"] == st.offering_id and detail["mode"] == "remote_job"
        assert detail["job_kind"] == kind and rid and req == rid
    assert [d[4]["reason"] for d in _denials(jw)] == ["quota_exhausted", "job_kind_not_allowed"]  # once each
    leaves = _ledger_leaves(jw)  # every audit event is a leaf, so each denial is on the ledger
    assert [r["target"] for r in leaves if r.get("action") == "authz.denied"] == [st.contract_id] * 2
    assert usage_rows(jw, st.contract_id) == []  # nothing reserved, nothing charged


def test_kind_not_allowed_by_contract(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="marketplace", kinds=("predict",))
    with pytest.raises(SomAPIError) as e:
        jw.consumer.submit_job(st.offering_id, "evaluate", to_csv(np.column_stack([features(3), np.ones(3)])))
    assert e.value.status == 403


def test_result_opens_only_with_the_reply_key(jw: Any, tmp_path: Path) -> None:
    from crypto.errors import DecryptionError

    st = offering(jw, tmp_path, hosting="marketplace")
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(3)))
    assert jw.consumer.wait_job(sub.id, timeout=30)["status"] == "succeeded"
    blob, headers = jw.consumer.job_result_sealed(sub.id)
    assert headers.get("x-som-usage-id") == jw.consumer.job(sub.id)["usage_id"]
    assert json.loads(__import__("base64").urlsafe_b64decode(headers["x-som-receipt"]))["index"] >= 0
    with pytest.raises(DecryptionError):
        open_result(SealKeyPair.generate(), sub.id, blob)
    with pytest.raises(DecryptionError):
        open_result(sub.reply_key, "job_other", blob)
