"""Provider review of custom-job code with syft-job (``marketplace.agent.syft_review``) through the
real app (SQLite and PostgreSQL): the folder holds the code and its digest but no input; syft-job
approvals and rejections reach the marketplace bound to the digest; tampered code is refused;
execution stays in our sandbox (syft-job's runner runs nothing of the consumer's)."""

from __future__ import annotations

import io
import json
import logging
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marketplace.agent.syft_review import REFUSING_RUN_SH, SyftReviewBridge, provider_email
from marketplace.compute.payload import code_digest
from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import (
    agent_key,
    features,
    offering,
    running_agent,
    to_csv,
    usage_rows,
    wait_usage,
)
from tests.scan import find_bytes, float_patterns

HOST_ONLY_VAR = "SOM_TEST_REVIEW_SECRET"
CODE = (
    "import os\n"
    "rows = [r for r in open('inputs/data.csv').read().splitlines() if r]\n"
    "total = sum(float(v) for r in rows for v in r.split(','))\n"
    "open('outputs/total.txt', 'w').write(repr(total))\n"
    f"open('outputs/leak.txt', 'w').write(repr(os.environ.get('{HOST_ONLY_VAR}')))\n"
    "print('rows', len(rows))\n"
)


@pytest.fixture(autouse=True)
def _no_interpreter_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "never")


@pytest.fixture
def rw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, agent_lease_seconds=2.0, agent_offline_seconds=4.0, workers=1))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _bridge(w: Any, tmp_path: Path) -> SyftReviewBridge:
    return SyftReviewBridge(w.provider, tmp_path / "syftbox", email=provider_email(w.orgs["provider"]))


def _review_job(bridge: SyftReviewBridge, job_id: str) -> Any:
    """What the provider does: list the code requests with syft-job's own client."""
    import syft_job

    jobs = syft_job.get_client(str(bridge.dir), bridge.email).jobs
    return jobs[job_id]


def _leaves(w: Any) -> list[dict[str, Any]]:
    from contracts.records import parse_record
    from marketplace.services import ledger

    with w.rt.sessions() as s:
        size = ledger.tree_size(s)
    return [parse_record(data) for _, data in ledger.iter_leaves(w.rt, 0, size)]


def _audit(w: Any) -> list[dict[str, Any]]:
    return list(w.admin.paginate("/v1/audit", limit=500))


def test_approval_in_syft_job_runs_in_our_sandbox(rw: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_ONLY_VAR, "the-provider-machine-secret")
    st = offering(rw, tmp_path, hosting="provider")
    bridge = _bridge(rw, tmp_path)
    x = features(9)
    data = to_csv(x)
    with running_agent(rw, st, agent_key(rw, st.offering_id), tmp_path):
        sub = rw.consumer.submit_job(st.offering_id, "custom", data, code=CODE, limits={"cpu_seconds": 10})
        assert sub.job["status"] == "awaiting_approval"
        report = bridge.sync()
        assert report.mirrored == [sub.id] and report.approved == []
        assert bridge.sync().mirrored == []  # mirrored once

        # the provider reviews with syft-job: the exact code, its digest and the job's terms
        job = _review_job(bridge, sub.id)
        assert job.status == "pending" and job.code == CODE
        assert job.submitted_by == rw.orgs["consumer"] + "@som.invalid"
        h = job.job_headers
        assert h["som_code_digest"] == code_digest(CODE) == sub.job["code_digest"]
        assert (h["som_job_id"], h["som_kind"], h["som_consumer_org"]) == (sub.id, "custom", rw.orgs["consumer"])
        assert h["som_limits"]["cpu_seconds"] == 10
        assert (job.job_submission_path / "run.sh").read_text() == REFUSING_RUN_SH
        # ... and no input: it is sealed to the agent and the bridge never fetches it
        assert find_bytes([*float_patterns(x), data[:40]], paths=[bridge.dir]) == []

        job.approve(reason="reads the data, writes a sum")  # syft-job's API; nothing reaches the marketplace yet
        assert rw.consumer.job(sub.id)["status"] == "awaiting_approval"
        assert bridge.sync().approved == [sub.id]
        done = rw.consumer.wait_job(sub.id, timeout=60)
        assert done["status"] == "succeeded" and done["charged"], done

    res = rw.consumer.job_result(sub.id, sub.reply_key)
    with zipfile.ZipFile(io.BytesIO(res.body)) as z:
        total = z.read("total.txt")
        # run_isolated, not syft-job's runner: the provider machine's environment did not leak in
        assert z.read("leak.txt") == b"None"
    assert float(total) == pytest.approx(float(x.sum()))
    assert usage_rows(rw, st.contract_id) == [("charged", 1)]
    # the approval is bound to the digest, audited and a ledger leaf
    ev = [e for e in _audit(rw) if e["action"] == "job.approve" and e["target"] == sub.id]
    assert len(ev) == 1 and ev[0]["detail"]["code_digest"] == code_digest(CODE)
    assert any(
        r["schema"] == "som.job-approval/v1"
        and r["job_id"] == sub.id
        and r["decision"] == "approved"
        and r["code_digest"] == code_digest(CODE)
        for r in _leaves(rw)
    )

    # the final state is reflected in the folder; the results are not
    assert bridge.sync().reflected == [sub.id]
    assert _review_job(bridge, sub.id).status == "done"
    assert bridge.sync().reflected == []
    assert find_bytes([total, *float_patterns(x), data[:40]], paths=[bridge.dir]) == []


def test_rejection_in_syft_job_fails_uncharged(rw: Any, tmp_path: Path) -> None:
    st = offering(rw, tmp_path, hosting="marketplace")
    bridge = _bridge(rw, tmp_path)
    code = "import socket\nsocket.create_connection(('example.org', 80))\n"
    sub = rw.consumer.submit_job(st.offering_id, "custom", b"1,2\n", code=code)
    keep = rw.consumer.submit_job(st.offering_id, "custom", b"3,4\n", code=CODE)
    assert sorted(bridge.sync().mirrored) == sorted([sub.id, keep.id])

    _review_job(bridge, sub.id).reject(reason="opens network connections")
    report = bridge.sync()
    assert report.rejected == [sub.id] and report.approved == []
    job = rw.consumer.job(sub.id)
    assert job["status"] == "failed" and job["error_reason"] == "rejected" and not job["charged"]
    assert "opens network connections" in job["error"]
    assert rw.consumer.job(keep.id)["status"] == "awaiting_approval"  # undecided stays undecided
    assert wait_usage(rw, st.contract_id, [("released", 1), ("reserved", 1)]) == [("released", 1), ("reserved", 1)]
    ev = [e for e in _audit(rw) if e["action"] == "job.reject" and e["target"] == sub.id]
    assert len(ev) == 1 and ev[0]["detail"] == {"code_digest": code_digest(code), "reason": "opens network connections"}
    assert any(
        r["schema"] == "som.job-approval/v1" and r["job_id"] == sub.id and r["decision"] == "rejected"
        for r in _leaves(rw)
    )
    again = bridge.sync()  # a decided job is not decided twice
    assert again.rejected == [] and again.reflected == []  # already final in the folder
    assert _review_job(bridge, sub.id).status == "rejected"


@pytest.mark.parametrize("tamper", ["code", "code_and_recorded_digest", "extra_file"])
def test_code_changed_in_the_folder_is_not_approved(
    rw: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, tamper: str
) -> None:
    st = offering(rw, tmp_path, hosting="marketplace")
    bridge = _bridge(rw, tmp_path)
    sub = rw.consumer.submit_job(st.offering_id, "custom", b"1,2\n", code=CODE)
    bridge.sync()
    path = bridge.code_path(sub.id)
    assert path is not None and path.read_bytes() == CODE.encode()
    evil = "import os\nopen('outputs/x', 'w').write(open('inputs/model.npz', 'rb').read().hex())\n"
    if tamper in ("code", "code_and_recorded_digest"):
        path.write_text(evil)
    if tamper == "code_and_recorded_digest":  # a consistent forgery of the request still is not the job's code
        cfg = path.parent.parent / "config.yaml"
        cfg.write_text(cfg.read_text().replace(code_digest(CODE), code_digest(evil)))
    if tamper == "extra_file":
        (path.parent / "helper.py").write_text(evil)

    job = _review_job(bridge, sub.id)
    job.approve()  # the provider approved what the folder showed, which is not what was submitted
    with caplog.at_level(logging.ERROR, logger="som.agent.syft_review"):
        report = bridge.sync()
        assert report.refused == [sub.id] and report.approved == []
        msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(msgs) == 1 and f"refusing to approve job {sub.id}" in msgs[0]
        if tamper == "extra_file":
            assert "helper.py" in msgs[0]
        else:
            assert code_digest(evil) in msgs[0] and code_digest(CODE) in msgs[0]
        caplog.clear()
        assert bridge.sync().refused == [sub.id]
        assert [r for r in caplog.records if r.levelno == logging.ERROR] == []  # said once, not every poll
    assert rw.consumer.job(sub.id)["status"] == "awaiting_approval"
    assert not any(e["action"] == "job.approve" for e in _audit(rw))
    assert not any(r["schema"] == "som.job-approval/v1" for r in _leaves(rw))

    # recovery: delete the request; it is mirrored afresh as pending (a stale approval does not carry over)
    shutil.rmtree(job.job_submission_path)
    assert bridge.sync().mirrored == [sub.id]
    fresh = _review_job(bridge, sub.id)
    assert fresh.status == "pending" and fresh.code == CODE
    fresh.approve()
    assert bridge.sync().approved == [sub.id]
    assert rw.consumer.wait_job(sub.id, timeout=60)["status"] == "succeeded"


def test_syft_job_runner_on_the_folder_runs_nothing_of_the_consumer(rw: Any, tmp_path: Path) -> None:
    from syft_job import SyftJobConfig, SyftJobRunner

    st = offering(rw, tmp_path, hosting="marketplace")
    bridge = _bridge(rw, tmp_path)
    marker = tmp_path / "ran-outside-the-sandbox"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    sub = rw.consumer.submit_job(st.offering_id, "custom", b"1\n", code=code)
    bridge.sync()
    _review_job(bridge, sub.id).approve()
    runner = SyftJobRunner(SyftJobConfig(syftbox_folder=bridge.dir, current_user_email=bridge.email))
    runner.process_approved_jobs(stream_output=False, timeout=20)
    assert not marker.exists()
    job = _review_job(bridge, sub.id)
    assert job.status == "failed"
    assert (job.job_review_path / "returncode.txt").read_text() == "64"
    # the runner's "failed" is not a decision: nothing reached the marketplace
    assert bridge.sync().approved == [] and rw.consumer.job(sub.id)["status"] == "awaiting_approval"


# -- the CLI ---------------------------------------------------------------------------------------


def _som(url: str, key: str, *args: str) -> Any:
    from typer.testing import CliRunner

    from marketplace.cli import app

    return CliRunner().invoke(app, ["--json", *args], env={"SOM_URL": url, "SOM_API_KEY": key})


def test_som_agent_review_once(live: tuple[Any, str], tmp_path: Path) -> None:
    w, url = live
    st = offering(w, tmp_path, hosting="marketplace")
    sub = w.consumer.submit_job(st.offering_id, "custom", b"1,2\n", code=CODE)
    folder = tmp_path / "review"
    r = _som(url, w.keys["provider"], "agent", "review", "--syft-dir", str(folder), "--once")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["mirrored"] == [sub.id] and out["email"] == provider_email(w.orgs["provider"])
    bridge = SyftReviewBridge(w.provider, folder, email=out["email"])
    _review_job(bridge, sub.id).approve()
    r = _som(url, w.keys["provider"], "agent", "review", "--syft-dir", str(folder), "--once")
    assert r.exit_code == 0 and json.loads(r.output)["approved"] == [sub.id], r.output
    # a consumer key cannot run the review bridge
    r = _som(url, w.keys["consumer"], "agent", "review", "--syft-dir", str(tmp_path / "c"), "--once")
    assert r.exit_code != 0 and "provider key" in r.output
