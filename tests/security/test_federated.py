"""Attacks on federated training, each against a real server (uvicorn on loopback, SQLite):

* an organisation without a ``federated`` contract (or outside ``allowed_orgs``) cannot join,
  and a non-participant cannot read the federation, its rounds or its messages (404);
* a participant cannot see another's update: it sees only itself in the status, only its own
  node's messages, cannot answer a message sent to another node, and gets only its own receipts;
* a round that would exceed the privacy budget is refused (the federation stops);
* a malformed, unsolicited, replayed or wrongly typed reply is refused with 4xx and the JSON error.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from crypto.signing import SigningKey
from marketplace.federated.privacy import epsilon_after
from marketplace.sdk import SomClient
from marketplace.sdk.errors import SomAPIError
from tests.marketplace.federated_support import (
    breast_cancer_split,
    open_federation,
    open_offering,
    participant_orgs,
    run_participants,
    wait_finished,
    wait_joined,
)

pytestmark = pytest.mark.timeout(300)
RECIPE = {"rounds": 2, "local_epochs": 1, "min_participants": 2, "secure_aggregation": True}


def _status(e: pytest.ExceptionInfo[SomAPIError]) -> int:
    return int(e.value.status)


def test_a_non_participant_cannot_join_or_read(live: Any) -> None:
    world, url = live
    fed = open_federation(world, RECIPE, n=2)
    # a consumer with a contract on the offering but not in mode 'federated'
    off, sk = fed.offering_id, SigningKey.generate()
    [(org_x, key_x)] = participant_orgs(world, off, sk, 1, modes=("he_inference",))
    outsider = SomClient(url, key_x)
    with pytest.raises(SomAPIError) as e:
        outsider.join_federation(fed.id, samples=10)
    assert _status(e) == 403 and e.value.code == "forbidden"
    for call in (
        lambda: outsider.federation(fed.id),
        lambda: outsider.federation_rounds(fed.id),
        lambda: outsider.federation_next(fed.id, wait=0),
        lambda: outsider.federation_receipts(fed.id),
        lambda: outsider.federation_reply(fed.id, b"\x00"),
    ):
        with pytest.raises(SomAPIError) as e:
            call()
        assert _status(e) == 404
    # another provider cannot start it; a participant cannot start it either
    with pytest.raises(SomAPIError) as e:
        SomClient(url, world.keys["other_provider"]).start_federation(fed.id)
    assert _status(e) == 404
    # unauthenticated
    r = httpx.get(f"{url}/v1/federations/{fed.id}")
    assert r.status_code == 401 and "error" in r.json()


def test_a_terminated_contract_ends_the_participation(live: Any) -> None:
    world, url = live
    fed = open_federation(world, RECIPE, n=2)
    a = SomClient(url, fed.orgs[0][1])
    a.join_federation(fed.id, samples=10)
    assert a.federation_next(fed.id, wait=0)[0] is None  # polling works while the contract is active
    with world.rt.tx() as s:
        from marketplace.services import federations

        [pt] = [x for x in federations.participants(s, fed.id) if x.org_id == fed.orgs[0][0]]
        cid = pt.contract_id
    assert fed.signing_key is not None
    world.provider.terminate_contract(cid, signing_key=fed.signing_key, reason="left the consortium")
    with pytest.raises(SomAPIError) as e:
        a.federation_next(fed.id, wait=0)
    assert _status(e) == 403
    with pytest.raises(SomAPIError) as e:
        a.federation_reply(fed.id, b"\x00")
    assert _status(e) == 403


def test_allowed_orgs_restricts_who_joins(live: Any) -> None:
    world, url = live
    off, sk = open_offering(world)
    orgs = participant_orgs(world, off, sk, 2)
    split = breast_cancer_split(2)
    fed = world.provider.create_federation(
        off,
        {"dim": 30, "mean": split.mean.tolist(), "scale": split.scale.tolist(), **RECIPE},
        terms={"allowed_orgs": [orgs[0][0]]},
    )
    SomClient(url, orgs[0][1]).join_federation(fed["id"], samples=5)
    with pytest.raises(SomAPIError) as e:
        SomClient(url, orgs[1][1]).join_federation(fed["id"], samples=5)
    assert _status(e) == 403


def test_a_participant_cannot_see_another_participants_update(live: Any) -> None:
    world, url = live
    fed = open_federation(world, RECIPE, n=2)
    a, b = (SomClient(url, k) for _, k in fed.orgs)
    a.join_federation(fed.id, samples=10)
    b.join_federation(fed.id, samples=10)
    assert [p["org_id"] for p in a.federation(fed.id)["participants"]] == [fed.orgs[0][0]]
    world.provider.start_federation(fed.id)
    # the coordinator sends each node its own setup message (both poll, as their agents would)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        fa, fb = pool.submit(a.federation_next, fed.id, 15), pool.submit(b.federation_next, fed.id, 15)
        msg_a, msg_b = fa.result()[0], fb.result()[0]
    assert msg_a is not None and msg_b is not None and msg_b != msg_a
    # A answers B's message with A's key: refused (the reply must answer a message sent to A)
    from flwr.app import Message, RecordDict
    from flwr.common.serde import message_from_proto, message_to_proto
    from flwr.proto.message_pb2 import Message as PM

    forged = Message(RecordDict(), reply_to=message_from_proto(PM.FromString(msg_b)))
    with pytest.raises(SomAPIError) as e:
        a.federation_reply(fed.id, message_to_proto(forged).SerializeToString())
    assert _status(e) == 422 and "reply refused" in e.value.message
    # a replay of a genuine reply is refused too
    mine = Message(RecordDict(), reply_to=message_from_proto(PM.FromString(msg_a)))
    data = message_to_proto(mine).SerializeToString()
    a.federation_reply(fed.id, data)
    with pytest.raises(SomAPIError) as e:
        a.federation_reply(fed.id, data)
    assert _status(e) == 422


def test_malformed_updates_are_refused_with_4xx(live: Any) -> None:
    world, url = live
    fed = open_federation(world, RECIPE, n=2)
    a = SomClient(url, fed.orgs[0][1])
    a.join_federation(fed.id, samples=10)
    for body in (b"", b"\xff" * 64, b"not a protobuf at all" * 10):
        r = httpx.post(
            f"{url}/v1/federations/{fed.id}/replies",
            content=body,
            headers={"Authorization": f"Bearer {fed.orgs[0][1]}", "Content-Type": "application/octet-stream"},
        )
        assert 400 <= r.status_code < 500 and set(r.json()["error"]) >= {"code", "message"}
    r = httpx.post(
        f"{url}/v1/federations/{fed.id}/replies",
        json={"w": [1, 2]},
        headers={"Authorization": f"Bearer {fed.orgs[0][1]}"},
    )
    assert r.status_code == 415 and "error" in r.json()
    r = httpx.post(
        f"{url}/v1/federations/{fed.id}/replies",
        content=b"\x00" * (40 * 1024 * 1024),
        headers={"Authorization": f"Bearer {fed.orgs[0][1]}", "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 413
    # a bad recipe or terms at creation: 4xx, not 500
    for recipe, terms in (
        ({"dim": 0}, {}),
        ({"dim": 30, "lr": "fast"}, {}),
        ({"dim": 30}, {"epsilon": 1.0}),
        ({"dim": 30, "strategy": "krum"}, {}),
        ({"dim": 30}, {"counting": "vibes"}),
    ):
        with pytest.raises(SomAPIError) as e:
            world.provider.create_federation(fed.offering_id, recipe, terms=terms)
        assert 400 <= _status(e) < 500


def test_budget_exhaustion_refuses_the_round(live: Any) -> None:
    world, url = live
    split = breast_cancer_split(3)
    z, delta = 2.0, 1e-5
    budget = (epsilon_after(z, 2, delta) + epsilon_after(z, 3, delta)) / 2  # enough for 2 rounds, not 3
    fed = open_federation(
        world,
        {**RECIPE, "rounds": 5, "noise_multiplier": z, "clipping": 1.0},
        terms={"epsilon": budget, "delta": delta},
        split=split,
    )
    threads = run_participants(url, fed, split)
    for t in threads:
        t.start()
    wait_joined(world, fed, 3)
    world.provider.start_federation(fed.id)
    st = wait_finished(world, fed)
    for t in threads:
        t.join(30)
    assert st["status"] == "budget_exhausted" and st["rounds_done"] == 2
    assert st["epsilon_spent"] <= budget and "refused" in st["error"]
    assert [r["number"] for r in world.provider.federation_rounds(fed.id)] == [1, 2]
    assert st["result_version_id"] is None  # no model from a run refused mid-way
