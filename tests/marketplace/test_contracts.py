"""Contracts API: signed offers, acceptances, events, visibility, audit, ledger leaves, statements."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest

from contracts import metering as cmetering
from contracts.offer import Contract, ContractEvent, make_offer, verify_chain
from crypto.signing import SigningKey
from marketplace.db.base import utcnow
from marketplace.errors import PolicyDenied
from marketplace.sdk import SomAPIError
from marketplace.sdk.contracts_api import load_signing_key
from marketplace.services import metering
from tests.marketplace.test_contracts_support import (
    ledger_records,
    make_deal,
    make_terms,
    usage_leaves,
)


def _err(fn, *a, **kw) -> SomAPIError:  # type: ignore[no-untyped-def]
    with pytest.raises(SomAPIError) as ei:
        fn(*a, **kw)
    return ei.value


def test_offer_accept_contract_visible_to_parties_only(world) -> None:
    d = make_deal(world)
    c = d.contract
    assert c["id"].startswith("ct_") and c["status"] == "active" and c["effective_status"] == "active"
    assert c["provider_org_id"] == world.orgs["provider"] and c["consumer_org_id"] == world.orgs["consumer"]
    assert c["usage"] == {
        "quota_units": 100,
        "used_units": 0,
        "reserved_units": 0,
        "remaining_units": 100,
        "window_start": None,
        "window_units": 0,
    }
    # The stored record is the signed contract, verifiable offline with the parties' keys.
    Contract.from_dict(c["contract"])
    verify_chain(Contract.from_dict(c["contract"]), [])
    assert world.provider.get_contract(c["id"])["id"] == c["id"]
    assert [x["id"] for x in world.consumer.list_contracts()] == [c["id"]]
    assert [x["id"] for x in world.provider.list_contracts(role="provider")] == [c["id"]]
    assert world.provider.list_contracts(role="consumer") == []
    for outsider in (world.other_consumer, world.other_provider, world.compliance):
        assert _err(outsider.get_contract, c["id"]).status == 404
        assert outsider.list_contracts() == []
        assert _err(outsider.statement, c["id"]).status == 404
    denied = world.admin.audit(action="authz.denied", target=c["id"])
    assert len(denied) >= 3
    actions = {e["action"] for e in world.admin.audit()}
    assert {"offer.publish", "contract.accept"} <= actions


def test_contract_and_offer_are_ledger_leaves(world) -> None:
    d = make_deal(world)
    leaves = [r for _, r in ledger_records(world) if r["schema"] == "som.contract/v1"]
    assert [r["contract_id"] for r in leaves] == [d.contract_id]
    assert leaves[0]["contract"] == d.contract["contract"]
    idx = d.contract["ledger_index"]
    assert dict(ledger_records(world))[idx]["schema"] == "som.contract/v1"


def test_offer_validation(world) -> None:
    off = world.provider.create_offering(name="m", task="t", hosting="provider")
    key = SigningKey.generate()
    # Consumers cannot publish offers.
    assert _err(world.consumer.publish_offer, off["id"], make_terms(), signing_key=key).status in (403, 404)
    # Another provider's offering is invisible.
    assert _err(world.other_provider.publish_offer, off["id"], make_terms(), signing_key=key).status == 404
    # A tampered signature is refused.
    offer = make_offer(
        offer_id="ofr_tampered01",
        offering_id=off["id"],
        provider_org=world.orgs["provider"],
        terms=make_terms(),
        signing_key=key,
    )
    bad = offer.to_dict()
    bad["terms"]["quota_units"] = 10**6
    r = world.provider._http.post(f"/v1/offerings/{off['id']}/offers", json=bad)
    assert r.status_code == 422 and "signature" in r.json()["error"]["message"]
    # The offer must name the caller's organisation and this offering.
    other = make_offer(
        offer_id="ofr_wrongorg01",
        offering_id=off["id"],
        provider_org=world.orgs["other_provider"],
        terms=make_terms(),
        signing_key=key,
    )
    r = world.provider._http.post(f"/v1/offerings/{off['id']}/offers", json=other.to_dict())
    assert r.status_code == 422
    # Garbage is a 422, never a 500.
    r = world.provider._http.post(f"/v1/offerings/{off['id']}/offers", json={"schema": "x"})
    assert r.status_code == 422
    ok = world.provider.publish_offer(off["id"], make_terms(), signing_key=key, offer_id="ofr_first00001")
    assert ok["status"] == "open"
    assert (
        _err(world.provider.publish_offer, off["id"], make_terms(), signing_key=key, offer_id="ofr_first00001").status
        == 409
    )


def test_acceptance_validation(world) -> None:
    off = world.provider.create_offering(name="m", task="t", hosting="provider")
    world.provider.publish(off["id"])
    offer = world.provider.publish_offer(off["id"], make_terms(), signing_key=SigningKey.generate())
    ck = SigningKey.generate()
    # A provider cannot accept (role), another org's acceptance is refused, a tampered one too.
    assert _err(world.provider.accept_offer, offer["id"], signing_key=ck).status == 403
    from contracts.offer import Offer, accept_offer

    o = Offer.from_dict(offer["offer"])
    forged = accept_offer(o, consumer_org=world.orgs["other_consumer"], signing_key=ck).acceptance.to_dict()
    r = world.consumer._http.post(f"/v1/offers/{offer['id']}/accept", json=forged)
    assert r.status_code == 422
    good = accept_offer(o, consumer_org=world.orgs["consumer"], signing_key=ck).acceptance.to_dict()
    tampered = dict(good, accepted_at=good["accepted_at"].replace(".", ".9", 1)[:27] + "Z")
    r = world.consumer._http.post(f"/v1/offers/{offer['id']}/accept", json=tampered)
    assert r.status_code == 422
    # Pinning the wrong provider key stops the SDK before it signs.
    with pytest.raises(ValueError):
        world.consumer.accept_offer(
            offer["id"], signing_key=ck, provider_key=SigningKey.generate().verify_key.to_text()
        )
    r = world.consumer._http.post(f"/v1/offers/{offer['id']}/accept", json=good)
    assert r.status_code == 201
    r = world.consumer._http.post(f"/v1/offers/{offer['id']}/accept", json=good)
    assert r.status_code == 409
    # A withdrawn offer cannot be accepted any more (but the existing contract stays).
    world.provider.withdraw_offer(offer["id"])
    assert _err(world.other_consumer.accept_offer, offer["id"], signing_key=SigningKey.generate()).status == 404
    assert world.consumer.get_contract(r.json()["error"]["message"].split()[1])["status"] == "active"


def test_suspend_resume_terminate(world) -> None:
    d = make_deal(world)
    cid = d.contract_id
    # Only the provider suspends; a consumer's attempt is refused, with its own key or not.
    assert _err(world.consumer.suspend_contract, cid, signing_key=d.consumer_key).status == 403
    # A signature by a key other than the contract's is refused.
    assert _err(world.provider.suspend_contract, cid, signing_key=SigningKey.generate()).status == 422
    c = world.provider.suspend_contract(cid, signing_key=d.provider_key, reason="unpaid invoice")
    assert c["status"] == "suspended" and c["seq"] == 1
    with pytest.raises(PolicyDenied) as ei:
        metering.begin(
            world.rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            job_kind="predict",
            units=1,
            idempotency_key="s-1",
            request_digest=metering.request_digest("a"),
        )
    assert ei.value.reason == "suspended" and ei.value.status == 403
    assert _err(world.provider.suspend_contract, cid, signing_key=d.provider_key).status == 409
    c = world.provider.resume_contract(cid, signing_key=d.provider_key)
    assert c["status"] == "active"
    r = metering.begin(
        world.rt,
        d.consumer,
        offering_id=d.offering_id,
        mode="remote_job",
        job_kind="predict",
        units=1,
        idempotency_key="s-1",
        request_digest=metering.request_digest("a"),
    )
    metering.commit(world.rt, r, result=b"ok", media_type="text/plain")
    c = world.consumer.terminate_contract(cid, signing_key=d.consumer_key, reason="done")
    assert c["status"] == "terminated" and c["effective_status"] == "terminated"
    assert _err(world.provider.resume_contract, cid, signing_key=d.provider_key).status == 409
    events = [ContractEvent.from_dict(e) for e in c["events"]]
    assert [e.kind.value for e in events] == ["suspension", "resumption", "termination"]
    assert verify_chain(Contract.from_dict(c["contract"]), events).status.value == "terminated"
    leaves = [r for _, r in ledger_records(world) if r["schema"] == "som.contract-event/v1"]
    assert [r["event"] for r in leaves] == c["events"]
    actions = [e["action"] for e in world.admin.audit(target=cid)]
    for a in ("contract.accept", "contract.suspend", "contract.resume", "contract.terminate"):
        assert a in actions
    # A terminated contract is not resolved for new uses.
    with pytest.raises(Exception) as ei2:
        metering.begin(
            world.rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            job_kind="predict",
            units=1,
            idempotency_key="s-2",
            request_digest=metering.request_digest("b"),
        )
    assert getattr(ei2.value, "status", None) == 404


def test_stale_event_is_a_conflict(world) -> None:
    d = make_deal(world)
    from contracts.offer import draft_event, initial_state, sign_event

    contract = Contract.from_dict(d.contract["contract"])
    ev = sign_event(
        draft_event(contract, initial_state(contract), "suspension", by="provider"), "provider", d.provider_key
    )
    r1 = world.provider._http.post(f"/v1/contracts/{d.contract_id}/events", json=ev.to_dict())
    assert r1.status_code == 201
    r2 = world.provider._http.post(f"/v1/contracts/{d.contract_id}/events", json=ev.to_dict())
    assert r2.status_code == 409


def test_statement_reconciles_with_ledger(world) -> None:
    d = make_deal(world, price=7, quota=50)
    rt = world.rt
    for i in range(4):
        r = metering.begin(
            rt,
            d.consumer,
            offering_id=d.offering_id,
            mode="remote_job",
            job_kind="predict",
            units=i + 1,
            idempotency_key=f"st-{i}",
            request_digest=metering.request_digest(str(i)),
        )
        if i == 2:
            metering.release(rt, r, reason="model crashed")
        else:
            metering.commit(rt, r, result=b"r", media_type="application/octet-stream")
    end_s = (utcnow() + timedelta(minutes=5)).isoformat()
    cons = world.consumer.statement(d.contract_id, end=end_s)
    prov = world.provider.statement(d.contract_id, end=end_s)
    assert cons == prov
    assert cons["total_units"] == 1 + 2 + 4 and cons["total_amount_minor"] == 7 * 7
    assert cons["total_amount"] == "0.49" and cons["released_count"] == 1
    assert len(cons["lines"]) == 4
    # The same statement computed offline from the ledger's own leaves.
    contract = Contract.from_dict(d.contract["contract"])
    from contracts._validate import parse_time

    start, end = parse_time(cons["period_start"], "s"), parse_time(cons["period_end"], "e")
    offline = cmetering.statement(contract, usage_leaves(world, d.contract_id), start, end)
    assert offline.to_dict() == cons
    cmetering.reconcile(offline, offline)
    # CSV: same lines, amounts add up to the cent.
    text = world.consumer.statement(d.contract_id, end=end_s, format="csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4
    assert sum(int(r["amount_minor"]) for r in rows) == cons["total_amount_minor"]
    # A period filter.
    later = (utcnow() + timedelta(hours=1)).isoformat()
    empty = world.consumer.statement(d.contract_id, start=later, end=(utcnow() + timedelta(hours=2)).isoformat())
    assert empty["lines"] == [] and empty["total_amount_minor"] == 0
    assert _err(world.consumer.statement, d.contract_id, start=later, end=utcnow().isoformat()).status == 422


def test_signing_key_file(tmp_path) -> None:
    path = tmp_path / "cfg" / "org.key"
    k1 = load_signing_key(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_signing_key(path).verify_key == k1.verify_key
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_signing_key(path)
    with pytest.raises(FileNotFoundError):
        load_signing_key(tmp_path / "missing.key", create=False)


def test_statement_period_with_a_utc_offset_is_converted(world) -> None:  # found by the API fuzzer
    from tests.marketplace.test_contracts_support import make_deal

    d = make_deal(world)
    r = world.http.get(
        f"/v1/contracts/{d.contract_id}/statement",
        params={"from": "2020-01-01T07:47:00+07:47", "to": "2100-01-01T00:00:00-05:00"},
        headers={"Authorization": f"Bearer {world.keys['consumer']}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["period_start"].startswith("2020-01-01T00:00:00")
