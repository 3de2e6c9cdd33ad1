"""Provider agents through the real app: keys, confinement, presence, jobs on provider-hosted
offerings (the weights never reach the marketplace), run_on_agent, lost leases."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crypto.sealing import SealKeyPair
from marketplace.errors import Unavailable
from marketplace.sdk import SomAPIError
from marketplace.services import dispatch
from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import (
    agent_key,
    expected,
    features,
    offering,
    running_agent,
    to_csv,
    usage_rows,
    vouch,
    wait_usage,
)
from tests.scan import find_bytes, float_patterns


@pytest.fixture
def jw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, agent_lease_seconds=1.5, agent_offline_seconds=3.0, workers=1))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _hello(w: Any, key: str, **kw: Any) -> tuple[Any, str]:
    c = w.client(key)
    body = {
        "seal_public": SealKeyPair.generate().public_text(),
        "name": "raw",
        "capabilities": ["he_infer", "predict"],
        **kw,
    }
    return c, c.post_json("/v1/agent/hello", body)["id"]


def test_agent_keys_are_bound_and_confined(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    mk = offering(jw, tmp_path, hosting="marketplace")
    with pytest.raises(SomAPIError) as e:  # only provider-hosted offerings have agents
        jw.provider.create_agent_key([mk.offering_id])
    assert e.value.status == 409
    with pytest.raises(SomAPIError) as e:  # only the owner
        jw.other_provider.create_agent_key([st.offering_id])
    assert e.value.status == 404
    with pytest.raises(SomAPIError) as e:
        jw.consumer.create_agent_key([st.offering_id])
    assert e.value.status == 403
    created = jw.provider.create_agent_key([st.offering_id])
    assert created["kind"] == "agent" and created["offering_ids"] == [st.offering_id]
    agent = jw.client(created["key"])
    # the agent key cannot act as the provider, nor mint keys
    for method, path in (("GET", "/v1/offerings"), ("POST", "/v1/agents/keys"), ("GET", "/v1/jobs")):
        r = agent._http.request(method, path, json={"offering_ids": [st.offering_id]} if method == "POST" else None)
        assert r.status_code == 403, (path, r.text)
    # and user keys cannot speak the agent protocol
    with pytest.raises(SomAPIError) as e:
        jw.provider.post_json("/v1/agent/hello", {"seal_public": SealKeyPair.generate().public_text()})
    assert e.value.status == 403
    with pytest.raises(SomAPIError) as e:  # offerings outside the key
        agent.post_json(
            "/v1/agent/hello", {"seal_public": SealKeyPair.generate().public_text(), "offering_ids": [mk.offering_id]}
        )
    assert e.value.status == 403
    with pytest.raises(SomAPIError) as e:
        agent.post_json("/v1/agent/hello", {"seal_public": "x25519:nope"})
    assert e.value.status == 422


def test_presence_in_catalog(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    assert jw.consumer.get_offering(st.offering_id)["agent_online"] is False
    key = agent_key(jw, st.offering_id)
    c, aid = _hello(jw, key)
    assert jw.consumer.get_offering(st.offering_id)["agent_online"] is True
    assert [a["id"] for a in jw.provider.agents(offering_id=st.offering_id)] == [aid]
    r = c._http.post("/v1/agent/bye", headers={"X-Som-Agent": aid})
    assert r.status_code == 204
    assert jw.consumer.get_offering(st.offering_id)["agent_online"] is False
    with pytest.raises(SomAPIError) as e:  # another key's agent id
        jw.client(agent_key(jw, st.offering_id)).post_json("/v1/agent/heartbeat", {}, headers={"X-Som-Agent": aid})
    assert e.value.status == 404


def test_provider_hosted_predict_weights_never_reach_the_marketplace(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    with pytest.raises(SomAPIError) as e:  # no agent has ever registered: no key to seal to
        jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(3)))
    assert e.value.status == 503
    key = agent_key(jw, st.offering_id)
    x = features(12)
    with running_agent(jw, st, key, tmp_path) as agent:
        sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(x))
        job = jw.consumer.wait_job(sub.id, timeout=30)
        assert job["status"] == "succeeded" and job["charged"], job
        assert sub.job["seal_public"] == agent.seal.public_text()
        res = jw.consumer.job_result(sub.id, sub.reply_key)
        got = np.array([[float(v) for v in ln.split(",")] for ln in res.body.decode().splitlines()])
        np.testing.assert_allclose(got, expected(st.weight, st.bias, x), rtol=1e-9)
        # evaluate on the agent too
        y = (expected(st.weight, st.bias, x)[:, 0] > 0.5).astype(float)
        sub2 = jw.consumer.submit_job(st.offering_id, "evaluate", to_csv(np.column_stack([x, y])))
        assert jw.consumer.wait_job(sub2.id, timeout=30)["status"] == "succeeded"
        assert jw.consumer.job_result(sub2.id, sub2.reply_key).metrics["accuracy"] == 1.0
    assert usage_rows(jw, st.contract_id) == [("charged", 12), ("charged", 12)]
    rt = jw.rt
    paths: list[Any] = [rt.data_dir]
    if rt.engine.dialect.name == "sqlite":
        paths.append(Path(str(rt.engine.url.database)))
    weights = np.concatenate([st.weight.reshape(-1), st.bias])
    assert find_bytes(float_patterns(weights), paths=paths) == []
    assert find_bytes(float_patterns(x), paths=paths) == []
    if rt.engine.dialect.name == "postgresql":  # dump every table's text
        from sqlalchemy import MetaData, select

        md = MetaData()
        md.reflect(rt.engine)
        with rt.engine.connect() as conn:
            dump = "\n".join(repr(row) for t in md.sorted_tables for row in conn.execute(select(t))).encode()
        assert find_bytes(float_patterns(weights), extra_blobs=[dump]) == []


def test_run_on_agent_round_trip_and_unavailable(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    rt = jw.rt
    with pytest.raises(Unavailable):
        dispatch.run_on_agent(rt, offering_id=st.offering_id, payload=b"req", meta={}, timeout=1)
    c, aid = _hello(jw, agent_key(jw, st.offering_id))
    h = {"X-Som-Agent": aid}
    seen: list[Any] = []

    def fake_agent() -> None:  # the raw protocol: lease, fetch, answer
        for _ in range(2):
            r = c._http.post("/v1/agent/lease", json={"wait": 5}, headers=h)
            assert r.status_code == 200, r.text
            item = r.json()
            seen.append(item)
            payload = c._http.get(f"/v1/agent/work/{item['id']}/payload", headers=h).content
            if payload == b"please fail":
                c._http.post(
                    f"/v1/agent/work/{item['id']}/fail", json={"reason": "invalid", "message": "bad"}, headers=h
                )
                continue
            r = c._http.post(
                f"/v1/agent/work/{item['id']}/result",
                content=payload[::-1],
                headers={**h, "Content-Type": "application/octet-stream"},
            )
            assert r.status_code == 200
            # a duplicate post is harmless
            assert (
                c._http.post(
                    f"/v1/agent/work/{item['id']}/result",
                    content=b"other",
                    headers={**h, "Content-Type": "application/octet-stream"},
                ).status_code
                == 200
            )

    t = threading.Thread(target=fake_agent)
    t.start()
    out = dispatch.run_on_agent(
        rt, offering_id=st.offering_id, payload=b"ciphertexts", meta={"keyset_id": "ks_1"}, timeout=10
    )
    assert out == b"stxetrehpic"
    with pytest.raises(Unavailable, match="bad"):
        dispatch.run_on_agent(rt, offering_id=st.offering_id, payload=b"please fail", meta={}, timeout=10)
    t.join(10)
    assert seen[0]["type"] == "task" and seen[0]["kind"] == "he_infer" and seen[0]["meta"] == {"keyset_id": "ks_1"}
    # nobody answers: a timeout is Unavailable and the task is not left queued
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer"):
        dispatch.run_on_agent(rt, offering_id=st.offering_id, payload=b"slow", meta={}, timeout=0.5)
    assert time.monotonic() - t0 < 5
    r = c._http.post("/v1/agent/lease", json={"wait": 0}, headers=h)
    assert r.status_code == 204


def test_lost_lease_goes_back_to_the_queue_and_charges_once(jw: Any, tmp_path: Path) -> None:
    """An agent leases a job and dies; after the lease expires another agent gets it; the first
    agent's late result and the second's both arrive: one charge."""
    from marketplace.agent.runner import load_seal_key
    from marketplace.compute.jobs import load_model, run_job
    from marketplace.compute.payload import open_input, seal_result

    st = offering(jw, tmp_path, hosting="provider")
    key = agent_key(jw, st.offering_id)
    seal_path = tmp_path / "seal.key"
    kp = load_seal_key(seal_path)
    c1, a1 = _hello(jw, key, seal_public=kp.public_text(), capabilities=["predict"])
    vouch(c1, a1, st, kp.public_text())
    x = features(4)
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(x))
    item = c1._http.post("/v1/agent/lease", json={"wait": 5}, headers={"X-Som-Agent": a1}).json()
    assert item["id"] == sub.id and item["attempt"] == 1
    blob = c1._http.get(f"/v1/agent/work/{sub.id}/payload", headers={"X-Som-Agent": a1}).content
    # agent 1 goes silent; agent 2 (same sealing key file) waits for the lease to run out
    c2, a2 = _hello(jw, key, seal_public=kp.public_text(), capabilities=["predict"])
    vouch(c2, a2, st, kp.public_text())
    r = c2._http.post("/v1/agent/lease", json={"wait": 8}, headers={"X-Som-Agent": a2})
    assert r.status_code == 200 and r.json()["id"] == sub.id and r.json()["attempt"] == 2
    assert jw.consumer.job(sub.id)["attempts"] == 2
    assert st.model_path is not None
    inp = open_input(kp, sub.id, blob, max_size=1 << 20)
    out = seal_result(
        inp.reply_public,
        run_job(load_model(st.model_path.read_bytes(), "npz"), inp, expected_kind="predict", workdir=tmp_path),
    )
    hdr = {"Content-Type": "application/octet-stream"}
    for c, a in ((c2, a2), (c1, a1), (c2, a2)):
        r = c._http.post(f"/v1/agent/work/{sub.id}/result", content=out, headers={**hdr, "X-Som-Agent": a})
        assert r.status_code == 200, r.text
    job = jw.consumer.job(sub.id)
    assert job["status"] == "succeeded" and job["charged"]
    assert usage_rows(jw, st.contract_id) == [("charged", 4)]
    # a failure report after success changes nothing
    c1._http.post(f"/v1/agent/work/{sub.id}/fail", json={"message": "late"}, headers={"X-Som-Agent": a1})
    assert jw.consumer.job(sub.id)["status"] == "succeeded"


def test_job_fails_after_too_many_lost_leases(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    key = agent_key(jw, st.offering_id)
    kp = SealKeyPair.generate()
    c, a = _hello(jw, key, seal_public=kp.public_text(), capabilities=["predict"])
    vouch(c, a, st, kp.public_text())
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(2)))
    attempts = 0
    while True:
        r = c._http.post("/v1/agent/lease", json={"wait": 3}, headers={"X-Som-Agent": a})
        if r.status_code == 204:
            break
        attempts += 1
    job = jw.consumer.wait_job(sub.id, timeout=10, poll=0.1)  # the sweeper fails it after the last lease
    assert attempts == 3
    assert job["status"] == "failed" and job["error_reason"] == "lost" and not job["charged"]
    assert wait_usage(jw, st.contract_id, [("released", 2)]) == [("released", 2)]


def test_he_inference_through_a_real_agent(jw: Any, tmp_path: Path) -> None:
    """The agent compiles the plan beside the weights (publishing only the public plan), fetches
    the consumer's key set, and evaluates ciphertexts; the consumer decrypts the right answers."""
    st = offering(jw, tmp_path, hosting="provider")
    assert st.model_path is not None
    cal = st.model_path.parent / "cal.npy"
    np.save(cal, features(64, seed=11))
    key = agent_key(jw, st.offering_id)
    with running_agent(jw, st, key, tmp_path, calibration_path=cal) as agent:
        assert agent.compiled is not None
        plan = jw.consumer.he_plan(st.offering_id)
        assert plan["plan"]["input_dim"] == features(1).shape[1]
        x = features(5, seed=12)
        proba = jw.consumer.infer_encrypted(st.offering_id, x, contract_id=st.contract_id, key_dir=tmp_path / "ck")
        np.testing.assert_allclose(proba, expected(st.weight, st.bias, x), atol=0.02)
        # the key set was fetched once and cached
        assert len(agent._keysets) == 1
    weights = np.concatenate([st.weight.reshape(-1), st.bias])
    paths: list[Any] = [jw.rt.data_dir]
    if jw.rt.engine.dialect.name == "sqlite":
        paths.append(Path(str(jw.rt.engine.url.database)))
    assert find_bytes(float_patterns(weights), paths=paths) == []
