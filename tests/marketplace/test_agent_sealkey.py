"""The compute site's sealing key is vouched for by the provider (``som.seal-key/v1``).

The operator (here: whoever can write the DB) substitutes the sealing key the marketplace names
for a provider-hosted offering; the consumer's SDK must refuse to seal anything to it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from sqlalchemy import select, update

from crypto.errors import InvalidSignature
from crypto.sealing import SealKeyPair
from crypto.signing import SigningKey
from marketplace.agent.sealkey import SealKeyStatement, sign_seal_key, verify_seal_key
from marketplace.db.models_jobs import Agent, Job
from marketplace.sdk import SomAPIError
from marketplace.sdk.jobs_api import SealKeyRefused
from tests.conftest import build_world, make_settings
from tests.marketplace.test_jobs_support import (
    agent_key,
    features,
    offering,
    running_agent,
    to_csv,
    usage_rows,
    vouch,
)

OFF = "off_0123456789"


# -- the statement itself (pure) -------------------------------------------------------------


def _statement(key: SigningKey, seal_public: str, **kw: Any) -> dict[str, Any]:
    return sign_seal_key(key, offering_id=OFF, seal_public=seal_public, **kw).to_dict()


def test_statement_round_trip_and_every_mismatch_is_refused() -> None:
    pk, other = SigningKey.generate(), SigningKey.generate()
    sp, sp2 = SealKeyPair.generate().public_text(), SealKeyPair.generate().public_text()
    now = datetime(2030, 1, 1, tzinfo=UTC)
    good = _statement(pk, sp, not_after=now + timedelta(days=1))
    assert good["statement"] == {
        "schema": "som.seal-key/v1",
        "offering_id": OFF,
        "seal_public": sp,
        "not_after": "2030-01-02T00:00:00Z",
    }
    assert SealKeyStatement.from_dict(good).to_dict() == good
    pin = pk.verify_key.to_text()
    verify_seal_key(good, provider_key=pin, offering_id=OFF, seal_public=sp, now=now)
    bad_cases = [
        (good, {"provider_key": other.verify_key.to_text()}),  # another provider
        (good, {"offering_id": "off_other"}),  # replayed for another offering
        (good, {"seal_public": sp2}),  # the key the operator substituted
        (good, {"now": now + timedelta(days=2)}),  # expired
        (_statement(other, sp), {}),  # signed by someone else, carrying its own key
        ({**good, "provider_key": pin, "signature": _statement(other, sp)["signature"]}, {}),
        (
            {**good, "statement": {**good["statement"], "seal_public": sp2}},
            {"seal_public": sp2},
        ),  # edited after signing
        ({**good, "extra": 1}, {}),
        (None, {}),
        ({}, {}),
    ]
    for stmt, over in bad_cases:
        args: dict[str, Any] = {"provider_key": pin, "offering_id": OFF, "seal_public": sp, "now": now, **over}
        with pytest.raises(InvalidSignature):
            verify_seal_key(stmt, **args)


@settings(max_examples=40, deadline=None)
@given(byte=hs.integers(0, 63), bit=hs.integers(0, 7))
def test_any_bit_flip_in_the_signature_fails(byte: int, bit: int) -> None:
    pk = SigningKey.generate()
    sp = SealKeyPair.generate().public_text()
    st = _statement(pk, sp)
    raw = bytearray(base64.b64decode(st["signature"]))
    raw[byte] ^= 1 << bit
    st["signature"] = base64.b64encode(bytes(raw)).decode()
    with pytest.raises(InvalidSignature):
        verify_seal_key(st, provider_key=pk.verify_key.to_text(), offering_id=OFF, seal_public=sp)


# -- through the real app ----------------------------------------------------------------------


@pytest.fixture
def jw(tmp_path: Path, db_url: str) -> Iterator[Any]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, agent_lease_seconds=1.5, agent_offline_seconds=3.0, workers=1))
    try:
        yield build_world(app)
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _no_input_stored(jw: Any) -> None:
    with jw.rt.tx() as s:
        for job in s.scalars(select(Job)):
            assert job.input_blob == "" and job.status in ("created", "cancelled"), (job.id, job.status)


def test_honest_agent_is_vouched_for_and_the_job_runs(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    assert st.signing_key is not None
    with running_agent(jw, st, agent_key(jw, st.offering_id), tmp_path) as agent:
        sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(3)))
        assert jw.consumer.wait_job(sub.id, timeout=30)["status"] == "succeeded"
        # the statement came with the job and is the provider's, for this agent's key
        stmt = sub.job["seal_statement"]
        assert sub.job["seal_public"] == agent.seal.public_text() == stmt["statement"]["seal_public"]
        verify_seal_key(
            stmt,
            provider_key=st.signing_key.verify_key.to_text(),
            offering_id=st.offering_id,
            seal_public=agent.seal.public_text(),
        )
        # pinning the right key explicitly works too; pinning another key refuses
        sub2 = jw.consumer.submit_job(
            st.offering_id, "predict", to_csv(features(2)), provider_key=st.signing_key.verify_key.to_text()
        )
        assert jw.consumer.wait_job(sub2.id, timeout=30)["status"] == "succeeded"
        with pytest.raises(SealKeyRefused, match="not vouched for"):
            jw.consumer.submit_job(
                st.offering_id, "predict", to_csv(features(2)), provider_key=SigningKey.generate().verify_key.to_text()
            )
    assert usage_rows(jw, st.contract_id) == [("charged", 3), ("charged", 2)]


@pytest.mark.parametrize("attack", ["swap_key", "resign_with_operator_key", "drop_statement"])
def test_substituted_sealing_key_is_refused_before_sealing(jw: Any, tmp_path: Path, attack: str) -> None:
    """The operator rewrites what the marketplace serves: the SDK seals nothing and says why."""
    st = offering(jw, tmp_path, hosting="provider")
    c = jw.client(agent_key(jw, st.offering_id))
    honest = SealKeyPair.generate()
    aid = c.post_json("/v1/agent/hello", {"seal_public": honest.public_text(), "capabilities": ["predict"]})["id"]
    vouch(c, aid, st, honest.public_text())
    operator = SealKeyPair.generate()
    operator_key = SigningKey.generate()
    with jw.rt.tx() as s:
        agent = s.get(Agent, aid)
        statements = dict(agent.seal_statements or {})
        if attack == "swap_key":  # keep the provider's statement, name the operator's key
            values: dict[str, Any] = {"seal_public": operator.public_text()}
        elif attack == "resign_with_operator_key":  # a well-formed statement, by the wrong key
            statements[st.offering_id] = sign_seal_key(
                operator_key, offering_id=st.offering_id, seal_public=operator.public_text()
            ).to_dict()
            values = {"seal_public": operator.public_text(), "seal_statements": statements}
        else:
            values = {"seal_public": operator.public_text(), "seal_statements": None}
        s.execute(update(Agent).where(Agent.id == aid).values(**values))
    with pytest.raises(SealKeyRefused) as e:
        jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(3)))
    assert "refusing to seal" in str(e.value) and operator.public_text() in str(e.value)
    _no_input_stored(jw)
    assert [j["status"] for j in jw.consumer.jobs()] == ["cancelled"]
    assert usage_rows(jw, st.contract_id) == []


def test_tampered_job_row_is_refused(jw: Any, tmp_path: Path) -> None:
    """Tampering the job itself (its seal_public) after creation: verify_seal_key refuses it."""
    st = offering(jw, tmp_path, hosting="provider")
    c = jw.client(agent_key(jw, st.offering_id))
    kp = SealKeyPair.generate()
    aid = c.post_json("/v1/agent/hello", {"seal_public": kp.public_text(), "capabilities": ["predict"]})["id"]
    vouch(c, aid, st, kp.public_text())
    job = jw.consumer.create_job(st.offering_id, "predict", units=1)
    assert jw.consumer.verify_seal_key(job) == st.signing_key.verify_key.to_text()  # type: ignore[union-attr]
    with jw.rt.tx() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(seal_public=SealKeyPair.generate().public_text()))
    with pytest.raises(SealKeyRefused):
        jw.consumer.verify_seal_key(jw.consumer.job(job["id"]))


def test_agent_cannot_register_a_bad_statement(jw: Any, tmp_path: Path) -> None:
    st = offering(jw, tmp_path, hosting="provider")
    other = offering(jw, tmp_path, hosting="provider")
    c = jw.client(agent_key(jw, st.offering_id))
    kp = SealKeyPair.generate()
    aid = c.post_json("/v1/agent/hello", {"seal_public": kp.public_text(), "capabilities": ["predict"]})["id"]
    h = {"X-Som-Agent": aid}
    assert st.signing_key is not None
    cases = {
        "another agent's key": sign_seal_key(
            st.signing_key, offering_id=st.offering_id, seal_public=SealKeyPair.generate().public_text()
        ).to_dict(),
        "an offering it does not serve": sign_seal_key(
            st.signing_key, offering_id=other.offering_id, seal_public=kp.public_text()
        ).to_dict(),
        "a key that signed no offer": sign_seal_key(
            SigningKey.generate(), offering_id=st.offering_id, seal_public=kp.public_text()
        ).to_dict(),
        "expired": sign_seal_key(
            st.signing_key,
            offering_id=st.offering_id,
            seal_public=kp.public_text(),
            not_after=datetime.now(UTC) - timedelta(seconds=5),
        ).to_dict(),
        "malformed": {"statement": {}, "provider_key": "x", "signature": "y"},
    }
    for what, stmt in cases.items():
        with pytest.raises(SomAPIError) as e:
            c.post_json("/v1/agent/seal-key", {"statements": [stmt]}, headers=h)
        assert e.value.status == 422, what
    with pytest.raises(SomAPIError) as e:  # user keys cannot
        jw.provider.post_json("/v1/agent/seal-key", {"statements": [cases["expired"]]}, headers=h)
    assert e.value.status == 403
    assert vouch(c, aid, st, kp.public_text())["offering_ids"] == [st.offering_id]


def test_marketplace_hosted_jobs_need_no_statement(jw: Any, tmp_path: Path) -> None:
    """There the operator's worker is the compute site (it holds the weights in memory anyway)."""
    st = offering(jw, tmp_path, hosting="marketplace")
    sub = jw.consumer.submit_job(st.offering_id, "predict", to_csv(features(2)))
    assert sub.job["seal_statement"] is None
    assert jw.consumer.wait_job(sub.id, timeout=30)["status"] == "succeeded"
