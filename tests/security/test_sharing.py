"""Attacks on sharing (teams, grants, visibility, private offers, validation), over a real server
(uvicorn on loopback, SQLite and PostgreSQL), speaking raw HTTP with httpx as an attacker would."""

from __future__ import annotations

from typing import Any

import httpx

from crypto.signing import SigningKey
from tests.marketplace.sharing_support import lr_offering, served, status_of
from tests.marketplace.test_contracts_support import make_terms


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _paths(off: str) -> list[tuple[str, str, Any]]:
    return [
        ("GET", f"/v1/offerings/{off}", None),
        ("GET", f"/v1/offerings/{off}/versions", None),
        ("GET", f"/v1/offerings/{off}/versions/1/validation", None),
        ("GET", f"/v1/offerings/{off}/grants", None),
        ("POST", f"/v1/offerings/{off}/grants", {"org_id": "org_x", "permission": "read"}),
        ("PUT", f"/v1/offerings/{off}/visibility", {"visibility": "public"}),
        ("GET", f"/v1/offerings/{off}/audit", None),
        ("PUT", f"/v1/offerings/{off}/versions/1/metadata", {"metrics": {}}),
        ("GET", f"/v1/offerings/{off}/offers", None),
        ("GET", f"/v1/offerings/{off}/he", None),
        ("POST", f"/v1/offerings/{off}/publish", None),
    ]


def test_a_shared_offering_is_a_404_everywhere_for_another_org(world: Any) -> None:
    """BOLA: another organisation's keys get the same 404 for a hidden offering as for none."""
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, visibility="shared")
        prov.grant(off, org_id=world.orgs["consumer"])
        for attacker in ("other_consumer", "other_provider", "compliance"):
            for method, path, body in _paths(off):
                r = httpx.request(method, sv.url + path, json=body, headers=_h(world.keys[attacker]))
                ghost = httpx.request(
                    method, sv.url + path.replace(off, "off_doesnotexist"), json=body, headers=_h(world.keys[attacker])
                )
                # the same answer as for no offering at all: 404, or 403 when the key lacks the role
                assert r.status_code == ghost.status_code, (attacker, method, path, r.text)
                assert r.json()["error"]["code"] == ghost.json()["error"]["code"]
                assert r.status_code == 404 or "needs one of the roles" in r.json()["error"]["message"]
        # the grantee may read, but not administer: those are 404 as well (it is not the owner)
        for method, path, body in _paths(off)[3:8] + _paths(off)[10:]:
            r = httpx.request(method, sv.url + path, json=body, headers=_h(world.keys["consumer"]))
            assert r.status_code == 404 or "needs one of the roles" in r.json()["error"]["message"], (
                method,
                path,
                r.text,
            )
        assert httpx.get(f"{sv.url}/v1/offerings/{off}", headers=_h(world.keys["consumer"])).status_code == 200


def test_keys_cannot_escalate_through_teams(world: Any) -> None:
    with served(world) as sv:
        root = sv.key("provider")
        off = lr_offering(root, publish=False)
        team = root.create_team("ml")
        root.grant(off, team_id=team["id"], permission="write")
        mallory_id, mallory = sv.child("provider", ["provider"], "mallory")
        # a derived key cannot create teams, join one, or grant itself anything
        assert status_of(mallory.add_team_member, team["id"], mallory_id) == 403
        assert status_of(mallory.create_team, "mallory") == 403
        assert status_of(mallory.grant, off, team_id=team["id"], permission="admin") == 403
        assert status_of(mallory.upload_version, off, b"x", format="npz") == 403
        assert status_of(mallory.compile_version, off, 1, b"x") == 403
        # another organisation's root cannot add its keys to our team, nor read it
        other = sv.key("other_provider")
        other_key = world.other_provider.whoami()["key_id"]
        assert status_of(other.add_team_member, team["id"], other_key) == 404
        assert status_of(other.get_team, team["id"]) == 404
        assert status_of(root.add_team_member, team["id"], other_key) == 404  # not a key of ours
        # grants beyond read to other organisations, own-org grants without a team, nonsense: 422
        assert status_of(root.grant, off, org_id=world.orgs["consumer"], permission="admin") == 422
        assert status_of(root.grant, off, org_id=world.orgs["provider"]) == 422
        assert status_of(root.grant, off, org_id=world.orgs["consumer"], permission="owner") == 422
        assert status_of(root.grant, off, team_id="team_nope") == 404
        assert status_of(root.set_visibility, off, "everyone") == 422
        assert status_of(root.create_team, "ml") == 409
        assert status_of(root.create_team, "bad\nname") == 422
        assert mallory_id not in root.get_team("ml")["members"]


def test_private_offer_cannot_be_seen_or_accepted_by_another_org(world: Any) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov)
        offer = prov.publish_private_offer(
            off, make_terms(), to=[world.orgs["consumer"]], signing_key=SigningKey.generate()
        )
        # org B forges an acceptance of A's private offer straight at the API
        signed = sv.key("consumer").get_offer(offer["id"])
        from contracts.offer import Offer, accept_offer

        contract = accept_offer(
            Offer.from_dict(signed["offer"]),
            consumer_org=world.orgs["other_consumer"],
            signing_key=SigningKey.generate(),
        )
        r = httpx.post(
            f"{sv.url}/v1/offers/{offer['id']}/accept",
            json=contract.acceptance.to_dict(),
            headers=_h(world.keys["other_consumer"]),
        )
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = httpx.get(f"{sv.url}/v1/offers/{offer['id']}", headers=_h(world.keys["other_consumer"]))
        assert r.status_code == 404
        listed = httpx.get(f"{sv.url}/v1/offerings/{off}/offers", headers=_h(world.keys["other_consumer"])).json()
        assert offer["id"] not in {o["id"] for o in listed}
        # a malformed addressee list is a 422, never a 500
        r = httpx.post(
            f"{sv.url}/v1/offerings/{off}/offers",
            params={"to": "org_nope"},
            json={"x": 1},
            headers=_h(world.keys["provider"]),
        )
        assert r.status_code == 422


def test_revoked_grant_stops_compute_paths_on_the_next_request(world: Any) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, visibility="shared")
        g = prov.grant(off, org_id=world.orgs["consumer"])
        offer = prov.publish_offer(off, make_terms(), signing_key=SigningKey.generate())
        cons = sv.key("consumer")
        c = cons.accept_offer(offer["id"], signing_key=SigningKey.generate())
        assert status_of(cons.he_plan, off) == 409  # visible (not compiled), so not a 404
        prov.revoke_grant(off, g["id"])
        assert status_of(cons.he_plan, off) == 404
        assert status_of(cons.he_plan, off, c["id"]) == 404
        r = httpx.post(
            f"{sv.url}/v1/offerings/{off}/infer",
            content=b"x",
            headers={
                **_h(world.keys["consumer"]),
                "Content-Type": "application/octet-stream",
                "X-Som-Keyset": "ks_x",
                "Idempotency-Key": "k1",
            },
        )
        assert r.status_code == 404
        assert status_of(cons.get_offer, offer["id"]) == 404


def test_validation_input_attacks_are_4xx(world: Any) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, publish=False)
        url = f"{sv.url}/v1/offerings/{off}/versions/1/metadata"
        h = {**_h(world.keys["provider"]), "Content-Type": "application/json"}
        bad = [
            '{"metrics": {"accuracy": NaN}, "evaluation": {"x": [[0]], "y": [1]}}',
            '{"metrics": {"accuracy": 0.9}, "evaluation": {"x": [[NaN]], "y": [1]}}',
            '{"metrics": {"accuracy": 1e999}}',
            '{"metrics": {"accuracy": "high"}}',
            '{"metrics": {"accuracy": 0.9}, "evaluation": {"x": [[1,2,3]], "y": [1, 2]}}',
            '{"metrics": {"accuracy": 0.9}, "evaluation": {"x": [], "y": []}}',
            '{"metrics": {"accuracy": 0.9}, "evaluation": {"x": [[[1]]], "y": [1]}}',
            '{"notes": "' + "n" * 5000 + '"}',
            '{"parent": -3}',
            '{"tolerance": -1}',
            '{"he_min_agreement": 2}',
            '{"unknown": 1}',
            "[1, 2",
        ]
        for body in bad:
            r = httpx.put(url, content=body, headers=h)
            assert 400 <= r.status_code < 500, (body[:60], r.status_code, r.text)
            assert set(r.json()) == {"error"}
        many = {"metrics": {"accuracy": 0.9}, "evaluation": {"x": [[0.0] * 30] * 20000, "y": [0.0] * 20000}}
        r = httpx.put(url, json=many, headers=_h(world.keys["provider"]))
        assert r.status_code in (413, 422)
        assert prov.validation_report(off, 1)["status"] == "passed"  # nothing of that was stored
