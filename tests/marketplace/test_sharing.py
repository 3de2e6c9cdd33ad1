"""Teams, grants, visibility, private offers, validated versions and pinned contracts, through a
real server (uvicorn on loopback) on SQLite and PostgreSQL, with the SDK and the `som` CLI."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from crypto.signing import SigningKey
from tests.marketplace.sharing_support import (
    cli_json,
    err_of,
    lr_npz,
    lr_offering,
    mlp_npz,
    search_ids,
    served,
    status_of,
)
from tests.marketplace.test_contracts_support import make_terms, usage_leaves
from tests.marketplace.test_he_service_support import lr_breast_cancer


def test_offering_shared_with_one_team_is_invisible_to_everyone_else(world: Any) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, visibility="shared")
        cons_root = sv.key("consumer")
        team = cons_root.create_team("analysts")
        in_id, inside = sv.child("consumer", ["consumer"], "in-team")
        _out_id, outside = sv.child("consumer", ["consumer"], "not-in-team")
        cons_root.add_team_member(team["id"], in_id)
        assert cons_root.get_team("analysts")["members"] == [in_id]
        g = prov.grant(off, team_id=team["id"], permission="read")
        assert g["org_id"] == world.orgs["consumer"] and g["team_id"] == team["id"]

        assert inside.get_offering(off)["visibility"] == "shared"
        assert off in search_ids(inside)
        assert inside.validation_report(off, 1)["status"] == "passed"
        strangers = [outside, cons_root, sv.key("other_consumer"), sv.key("other_provider"), sv.key("compliance")]
        for c in strangers:
            assert status_of(c.get_offering, off) == 404
            assert off not in search_ids(c)
            assert status_of(c.list_offers, off) == 404
            assert status_of(c.validation_report, off, 1) == 404
        # the CLI says the same
        assert cli_json(sv.som(world.keys["provider"], "--json", "offering", "show", off))["id"] == off
        r = sv.som(world.keys["other_consumer"], "--json", "offering", "show", off, check=False)
        assert r.returncode != 0 and "not found" in r.stdout + r.stderr
        assert off not in {
            o["id"] for o in cli_json(sv.som(world.keys["other_consumer"], "--json", "offering", "list"))
        }

        # revoked: the next request is a 404
        prov.revoke_grant(off, g["id"])
        assert status_of(inside.get_offering, off) == 404
        assert off not in search_ids(inside)
        # an organisation-wide grant reaches every key of that organisation, and nobody else
        g2 = cli_json(
            sv.som(world.keys["provider"], "--json", "offering", "grant", off, "--org", world.orgs["consumer"])
        )
        assert g2["team_id"] is None
        assert {inside.get_offering(off)["id"], outside.get_offering(off)["id"]} == {off}
        assert status_of(sv.key("other_consumer").get_offering, off) == 404
        sv.som(world.keys["provider"], "offering", "revoke", off, g2["id"])
        assert status_of(outside.get_offering, off) == 404
        # visibility: organisation hides it from grantees too; public shows it to all
        prov.grant(off, org_id=world.orgs["consumer"])
        sv.som(world.keys["provider"], "offering", "visibility", off, "organisation")
        assert status_of(inside.get_offering, off) == 404
        prov.set_visibility(off, "public")
        assert off in search_ids(sv.key("other_consumer"))

        # every grant change is an audit event the owner reads about its own offering
        events = prov.offering_audit(off)
        actions = [e["action"] for e in events]
        assert actions.count("offering.grant") == 3 and actions.count("offering.revoke") == 2
        assert "offering.visibility" in actions and "offering.create" in actions
        denied = [e for e in events if e["action"] == "authz.denied"]
        assert {e["org_id"] for e in denied} >= {world.orgs["other_consumer"], world.orgs["other_provider"]}
        assert prov.offering_audit(off, action="offering.revoke")[0]["detail"]["grant_id"] == g["id"]
        cli_audit = cli_json(sv.som(world.keys["provider"], "--json", "offering", "audit", off))
        assert len(cli_audit) >= len(events)
        for c in (inside, sv.key("other_provider"), sv.key("compliance")):
            assert status_of(c.offering_audit, off) == 404  # readable to some, but not theirs


def test_teams_that_may_not_write_cannot_upload(world: Any) -> None:
    with served(world) as sv:
        root = sv.key("provider")
        off = lr_offering(root, publish=False)
        w_id, writer = sv.child("provider", ["provider"], "writer")
        _x_id, other = sv.child("provider", ["provider"], "other")
        # no team holds a grant yet: every provider key of the organisation may upload (as before)
        assert other.upload_version(off, lr_npz(), format="npz", input_shape=[30])["number"] == 2
        ml = cli_json(sv.som(world.keys["provider"], "--json", "team", "create", "ml"))
        sv.som(world.keys["provider"], "team", "add", "ml", w_id)
        assert [t["name"] for t in cli_json(sv.som(world.keys["provider"], "--json", "team", "list"))] == ["ml"]
        root.grant(off, team_id=ml["id"], permission="write")
        e = err_of(other.upload_version, off, lr_npz(), format="npz", input_shape=[30])
        assert e.status == 403 and "write" in e.message
        assert writer.upload_version(off, lr_npz(), format="npz", input_shape=[30])["number"] == 3
        assert status_of(other.update_offering, off, description="x") == 403
        # write is not admin: publishing and grants need admin
        assert status_of(writer.publish, off) == 403
        assert status_of(writer.grant, off, team_id=ml["id"], permission="admin") == 403
        # a key that is not the organisation's root cannot put itself in a team
        assert status_of(other.add_team_member, "ml", _x_id) == 403
        assert status_of(other.create_team, "mine") == 403
        root.grant(off, team_id=ml["id"], permission="admin")
        assert writer.publish(off)["status"] == "published"
        assert writer.withdraw(off)["status"] == "withdrawn"
        # another organisation's key is a 404 for every write
        for c in (sv.key("other_provider"),):
            assert status_of(c.upload_version, off, lr_npz(), format="npz", input_shape=[30]) == 404
            assert status_of(c.grant, off, org_id=world.orgs["other_provider"]) == 404
        # other organisations get read only; grants to unknown teams are 404
        assert status_of(root.grant, off, org_id=world.orgs["consumer"], permission="write") == 422
        # removing the writer from the team takes effect on its next request
        root.remove_team_member("ml", w_id)
        assert status_of(writer.upload_version, off, lr_npz(), format="npz", input_shape=[30]) == 403
        assert {e["action"] for e in root.offering_audit(off)} >= {"offering.grant", "offering.version.add"}


def test_private_offer_only_its_addressee_sees_and_accepts(world: Any, tmp_path: Path) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov)
        offer = prov.publish_private_offer(
            off, make_terms(), to=[world.orgs["consumer"]], signing_key=SigningKey.generate()
        )
        assert offer["addressed_to"] == [world.orgs["consumer"]]
        b = sv.key("other_consumer")
        assert status_of(b.get_offer, offer["id"]) == 404
        assert offer["id"] not in {o["id"] for o in b.list_offers(off)}
        assert status_of(b.accept_offer, offer["id"], signing_key=SigningKey.generate()) == 404
        a = sv.key("consumer")
        assert offer["id"] in {o["id"] for o in a.list_offers(off)}
        c = a.accept_offer(offer["id"], signing_key=SigningKey.generate())
        assert c["version_number"] == 1
        # the CLI: som contract offer --to ORG
        r = sv.som(
            world.keys["provider"],
            "--json",
            "contract",
            "offer",
            off,
            "--quota",
            "10",
            "--rate",
            "10",
            "--to",
            world.orgs["other_consumer"],
            "--key-file",
            str(tmp_path / "p.key"),
        )
        cli_offer = cli_json(r)
        assert cli_offer["addressed_to"] == [world.orgs["other_consumer"]]
        assert status_of(a.get_offer, cli_offer["id"]) == 404
        assert b.get_offer(cli_offer["id"])["id"] == cli_offer["id"]
        assert (
            status_of(prov.publish_private_offer, off, make_terms(), to=["org_nope"], signing_key=SigningKey.generate())
            == 422
        )


def _eval_at(accuracy_target: float) -> tuple[list[list[float]], list[float]]:
    """100 test rows labelled so that the LR is right on exactly ``accuracy_target`` of them."""
    d = lr_breast_cancer()
    x = d.x_test[:100]
    pred = (d.plain_proba[:100] > 0.5).astype(float)
    wrong = int(round(100 * (1 - accuracy_target)))
    y = pred.copy()
    y[:wrong] = 1 - y[:wrong]
    return x.tolist(), y.tolist()


def test_failed_validation_blocks_publish_and_says_why(world: Any, tmp_path: Path) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, publish=False)
        up = prov.validation_report(off, 1)
        assert up["status"] == "passed"
        assert [c["name"] for c in up["checks"]] == ["format", "operators", "shape", "finite", "smoke_inference"]
        x, y = _eval_at(0.9)
        v = prov.set_version_metadata(
            off,
            1,
            metrics={"accuracy": 0.99},
            measured_on="held-out 2025 Q3",
            notes="first cut",
            tolerance=0.01,
            evaluation={"x": x, "y": y},
        )
        rep = v["validation"]
        assert rep["status"] == "failed"
        assert rep["metrics"]["accuracy"] == {"declared": 0.99, "measured": 0.9, "tolerance": 0.01, "ok": False}
        assert "declared 0.99, measured 0.9" in rep["reason"]
        assert v["meta"]["measured_on"] == "held-out 2025 Q3" and v["meta"]["notes"] == "first cut"
        e = err_of(prov.publish, off)
        assert e.status == 409 and "failed validation" in e.message and "declared 0.99, measured 0.9" in e.message
        # the CLI shows the report and its reason
        r = sv.som(world.keys["provider"], "offering", "validation", off, "1")
        assert "failed" in r.stdout + r.stderr and "measured 0.9" in r.stdout + r.stderr
        # the same declaration from the CLI, with the evaluation set as a CSV (features, then the label)
        csv_path = tmp_path / "eval.csv"
        csv_path.write_text(
            "\n".join(",".join(map(str, [*row, label])) for row, label in zip(x, y, strict=True)) + "\n"
        )
        r = sv.som(
            world.keys["provider"],
            "--json",
            "offering",
            "validate",
            off,
            "1",
            "--metric",
            "accuracy=0.99",
            "--eval",
            str(csv_path),
            "--tolerance",
            "0.01",
        )
        assert "measured 0.9 on 100 evaluation rows" in r.stdout + r.stderr
        assert prov.validation_report(off, 1)["status"] == "failed"
        # declared metrics without an evaluation set cannot be checked: failed
        v = prov.set_version_metadata(off, 1, metrics={"accuracy": 0.9})
        assert v["validation"]["status"] == "failed" and "evaluation set" in v["validation"]["reason"]
        # bounds: the tolerance and the HE threshold are the provider's within limits; unknown metrics refused
        assert status_of(prov.set_version_metadata, off, 1, metrics={"accuracy": 0.9}, tolerance=0.5) == 422
        assert status_of(prov.set_version_metadata, off, 1, he_min_agreement=0.5) == 422
        assert status_of(prov.set_version_metadata, off, 1, metrics={"auc": 0.9}) == 422
        assert (
            status_of(
                prov.set_version_metadata, off, 1, metrics={"accuracy": 0.9}, evaluation={"x": [[1.0, 2.0]], "y": [1.0]}
            )
            == 422
        )
        # an honest declaration passes and the offering publishes
        v = prov.set_version_metadata(off, 1, metrics={"accuracy": 0.9}, evaluation={"x": x, "y": y})
        assert v["validation"]["status"] == "passed"
        assert prov.publish(off)["status"] == "published"
        # someone else's key cannot validate (404) nor read a report of an offering it cannot see
        assert status_of(sv.key("other_provider").set_version_metadata, off, 1, metrics={}) == 404
        assert {"offering.version.validate"} <= {e["action"] for e in prov.offering_audit(off)}


def test_he_agreement_below_threshold_blocks_publish(world: Any) -> None:
    with served(world) as sv:
        prov = sv.key("provider")
        npz, cal = mlp_npz()
        off = prov.create_offering(name="mlp", task="binary-classification", hosting="marketplace")["id"]
        prov.upload_version(off, npz, format="npz", input_shape=[4])
        prov.compile_version(off, 1, cal)
        rep = prov.validation_report(off, 1)
        assert prov.get_offering(off)["latest_version"]["validation"]["status"] == "failed"  # stored at compile
        he = next(c for c in rep["checks"] if c["name"] == "he_agreement")
        assert rep["status"] == "failed" and not he["ok"] and "threshold 0.99" in he["detail"]
        e = err_of(prov.publish, off)
        assert e.status == 409 and "he_agreement" in e.message
        # the provider may lower the threshold only to the floor (0.95): still refused here
        v = prov.set_version_metadata(off, 1, he_min_agreement=0.95)
        assert v["validation"]["status"] == "failed" and "threshold 0.95" in v["validation"]["reason"]
        assert status_of(prov.publish, off) == 409


def test_new_version_leaves_live_contracts_on_their_pinned_version(world: Any, tmp_path: Path) -> None:
    d = lr_breast_cancer()
    with served(world) as sv:
        prov = sv.key("provider")
        off = lr_offering(prov, publish=False)
        prov.compile_version(off, 1, d.x_train)
        prov.publish(off)
        offer = prov.publish_offer(
            off, make_terms(modes=("he_inference",), quota=10_000, max_batch=1000), signing_key=SigningKey.generate()
        )
        cons = sv.key("consumer")
        c = cons.accept_offer(offer["id"], signing_key=SigningKey.generate())
        assert c["version_number"] == 1
        # v2 computes the opposite answer; new contracts get it, the live one keeps v1
        prov.upload_version(off, lr_npz(-1.0), format="npz", input_shape=[30])
        prov.compile_version(off, 2, d.x_train)
        assert cons.he_plan(off)["version"] == 2
        assert cons.he_plan(off, c["id"])["version"] == 1
        x = d.x_test[:20]
        proba = cons.infer_encrypted(off, x, contract_id=c["id"], key_dir=tmp_path / "keys")
        assert np.abs(proba[:, 0] - d.plain_proba[:20]).max() < 0.01  # v1, not 1 - p
        assert cons.get_contract(c["id"])["version_number"] == 1
        # the receipt's leaf names the version that served
        receipt = cons.last_receipt
        assert receipt is not None
        assert json.loads(base64.b64decode(receipt["leaf"]))["version"] == 1
        leaves = usage_leaves(world, c["id"])
        assert leaves and all(r["version"] == 1 for r in leaves)
        # a contract accepted now pins v2
        c2 = sv.key("other_consumer").accept_offer(offer["id"], signing_key=SigningKey.generate())
        assert c2["version_number"] == 2
        # a stranger cannot ask for the plan under someone else's contract
        assert status_of(sv.key("other_consumer").he_plan, off, c["id"]) == 404
