"""An agent that lost its lease abandons the work: it neither computes nor posts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import (
    agent_key,
    features,
    offering,
    running_agent,
    to_csv,
    usage_rows,
    write_signing_key,
)


@pytest.fixture
def jw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, agent_lease_seconds=1.5, agent_offline_seconds=3.0, workers=1))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def test_agent_abandons_work_whose_lease_it_lost(jw: Any, tmp_path: Path) -> None:
    """Agent 1 leases a job, stalls past its lease; agent 2 takes the job over. Agent 1 neither
    computes nor posts (the check before both), and the job is charged once, for agent 2's result."""
    from fastapi.testclient import TestClient

    from marketplace.agent.runner import AgentConfig, LeaseLost, ProviderAgent

    st = offering(jw, tmp_path, hosting="provider")
    assert st.model_path is not None and st.signing_key is not None
    key = agent_key(jw, st.offering_id)
    cfg = AgentConfig(
        url="http://testserver",
        api_key=key,
        model_path=st.model_path,
        seal_key_path=st.model_path.parent / "seal.key",
        signing_key_path=write_signing_key(tmp_path / "provider.key", st.signing_key),
        workdir=tmp_path / "w",
        lease_wait=1.0,
        capabilities=("predict",),
    )
    a1 = ProviderAgent(cfg, http=TestClient(jw.app, raise_server_exceptions=False))  # type: ignore[arg-type]
    a1._hello()
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(4)))
    item = a1.api.lease(5, agent_id=a1.agent_id)
    assert item is not None and item["id"] == sub.id
    payload = a1.api.payload(sub.id, agent_id=a1.agent_id)
    a1.check_lease(sub.id)  # still ours
    with running_agent(jw, st, key, tmp_path) as a2:  # a1 stalls; a2 gets the job after the lease runs out
        job = jw.consumer.wait_job(sub.id, timeout=30)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        with pytest.raises(LeaseLost):
            a1._job(sub.id, item, payload)  # before computing
        with pytest.raises(LeaseLost):
            a1._post_result(sub.id, b"not even looked at")  # before posting
        a1.lost.add("tsk_gone")  # a heartbeat said so: no need to ask
        with pytest.raises(LeaseLost):
            a1.check_lease("tsk_gone")
        assert a2.done >= 1
    assert usage_rows(jw, st.contract_id) == [("charged", 4)]
