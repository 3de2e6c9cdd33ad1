"""Foundation over HTTP on SQLite and PostgreSQL: authn, roles, object-level authz, catalog, audit."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from marketplace.sdk import SomAPIError
from tests.marketplace.models import breast_cancer_lr, npz_bytes, onnx_bytes


def _status(fn, *a, **kw) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(SomAPIError) as ei:
        fn(*a, **kw)
    return ei.value.status, ei.value.code


def _offering(client, **kw):  # type: ignore[no-untyped-def]
    body = {
        "name": "cancer-lr",
        "task": "binary-classification",
        "description": "Breast cancer LR",
        "tags": ["medical", "tabular"],
        "hosting": "marketplace",
    }
    body.update(kw)
    return client.create_offering(**body)


def test_authentication_errors_are_401_json(world) -> None:
    http = world.http
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer som_abc_def"}):
        r = http.get("/v1/whoami", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthenticated"
        assert r.headers["x-request-id"]


def test_denials_of_unprintable_or_long_ids_are_audited_not_500(world) -> None:
    """Found by the API fuzzer: a denied id or a key prefix with control characters (or NUL, which
    PostgreSQL refuses) or over the column's length made the audit event, and so the request, fail."""
    weird = "%00%C2%97%1b" + "x" * 300
    consumer = {"Authorization": f"Bearer {world.keys['consumer']}"}
    r = world.http.post(f"/v1/orgs/{weird}/keys", json={"roles": ["consumer"]}, headers=consumer)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = world.http.get("/v1/whoami", headers={"Authorization": b"Bearer som_\x97\x1bab_x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
    from marketplace.services import auth_failures

    auth_failures.flush(world.rt, everything=True)  # failed authentications are summarised per window
    events = world.compliance.audit(action="authz.denied") + world.compliance.audit(action="auth.failures")
    targets = [e["target"] for e in events]
    assert any(t.startswith("\\x00\\x97\\x1bxxx") and t.endswith("…") and len(t) == 200 for t in targets), targets
    prefixes = [p for e in events if e["action"] == "auth.failures" for p in e["detail"]["key_prefixes"]]
    assert any(p.endswith("\\x97\\x1bab") for p in prefixes), prefixes
    assert all(p.isprintable() for p in prefixes)
    assert all(e["target"].isprintable() and e["actor"].isprintable() for e in events)


def test_unparsable_json_body_is_422_invalid(world) -> None:
    """Found by the API fuzzer: a JSON body that is not UTF-8 was a 400 ``http_error``."""
    auth = {"Authorization": f"Bearer {world.keys['provider']}", "Content-Type": "application/json"}
    for body in (b"\xff\xfe}", b'{"name": '):
        r = world.http.post("/v1/offerings", content=body, headers=auth)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid"), r.text


def test_openapi_documents_the_error_responses(world) -> None:
    """Every 4xx the API answers is in its OpenAPI document, with the one error schema (the
    fuzzer in test_api_fuzz checks the answers against it)."""
    doc = world.http.get("/openapi.json").json()
    err = doc["components"]["schemas"]["Error"]
    assert err["required"] == ["error"] and err["properties"]["error"]["required"] == ["code", "message"]
    assert "HTTPValidationError" not in doc["components"]["schemas"]

    def statuses(path: str, method: str) -> set[str]:
        responses = doc["paths"][path][method]["responses"]
        for code, r in responses.items():
            if code.startswith("4") or code.startswith("5"):
                assert r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
        return {c for c in responses if not c.startswith("2")}

    assert statuses("/v1/health", "get") == {"503"}  # the data keys do not unwrap (kek: cannot_unwrap)
    # 429: failed authentications are throttled on every authenticated route (docs/authentication.md)
    assert statuses("/v1/whoami", "get") == {"401", "403", "429"}
    assert statuses("/v1/orgs/{org_id}", "get") == {"401", "403", "404", "409", "422", "429"}
    assert statuses("/v1/offerings", "post") == {"401", "403", "404", "409", "413", "422", "429"}
    assert statuses("/v1/offerings/{offering_id}/versions", "post") >= {"413", "415", "422"}
    assert statuses("/v1/offerings/{offering_id}/infer", "post") >= {"403", "429", "503"}


def test_revoked_and_expired_keys_are_refused(world) -> None:
    org = world.orgs["consumer"]
    k = world.admin.create_key(org, ["consumer"], name="temp")
    c = world.client(k["key"])
    assert c.whoami()["org_id"] == org
    world.admin.revoke_key(k["id"])
    assert _status(c.whoami) == (401, "unauthenticated")
    assert _status(world.admin.revoke_key, k["id"]) == (409, "conflict")
    # expired: move the expiry into the past
    from datetime import timedelta

    from marketplace.db.base import utcnow
    from marketplace.db.models import ApiKey

    k2 = world.admin.create_key(org, ["consumer"])
    with world.rt.tx() as s:
        s.get(ApiKey, k2["id"]).expires_at = utcnow() - timedelta(seconds=1)
    assert _status(world.client(k2["key"]).whoami) == (401, "unauthenticated")


def test_keys_are_stored_hashed_with_prefix(world) -> None:
    k = world.admin.create_key(world.orgs["provider"], ["provider"])
    assert k["key"].startswith(f"som_{k['prefix']}_")
    from marketplace.db.models import ApiKey

    with world.rt.tx() as s:
        row = s.get(ApiKey, k["id"])
        assert row.hash.startswith("$argon2id$")
        assert k["key"] not in row.hash
    listed = world.provider.list_keys()
    assert all("key" not in item for item in listed)


def test_roles_are_enforced_with_403(world) -> None:
    assert _status(world.consumer.create_offering, name="x", task="t") == (403, "forbidden")
    assert _status(world.provider.create_org, "x") == (403, "forbidden")
    assert _status(world.consumer.audit) == (403, "forbidden")
    assert _status(world.provider.audit) == (403, "forbidden")
    # a member cannot grant a role it does not hold
    assert _status(world.consumer.create_key, world.orgs["consumer"], ["admin"]) == (403, "forbidden")
    assert world.compliance.audit()  # compliance may read


def test_foreign_objects_are_404_on_every_route(world) -> None:
    off = _offering(world.provider)
    oid = off["id"]
    other = world.other_provider
    assert _status(other.get_offering, oid) == (404, "not_found")
    assert _status(other.update_offering, oid, description="pwned") == (404, "not_found")
    assert _status(other.publish, oid) == (404, "not_found")
    assert _status(other.withdraw, oid) == (404, "not_found")
    assert _status(other.list_versions, oid) == (404, "not_found")
    assert _status(other.upload_version, oid, b"x", format="npz") == (404, "not_found")
    assert _status(world.consumer.get_offering, oid) == (404, "not_found")  # draft: invisible
    assert _status(other.create_key, world.orgs["provider"], ["provider"]) == (404, "not_found")
    assert _status(world.consumer.revoke_key, world.provider.whoami()["key_id"]) == (404, "not_found")
    r = world.http.get(
        f"/v1/orgs/{world.orgs['provider']}", headers={"Authorization": f"Bearer {world.keys['consumer']}"}
    )
    assert r.status_code == 404
    assert all(o["id"] != oid for o in other.search_offerings())
    denied = world.compliance.audit(action="authz.denied")
    assert {d["target"] for d in denied} >= {oid}


def test_upload_publish_search_and_digest(world) -> None:
    _, _, _, w, b, _ = breast_cancer_lr()
    data = npz_bytes(w, b)
    off = _offering(world.provider)
    with pytest.raises(SomAPIError) as ei:
        world.provider.publish(off["id"])
    assert ei.value.status == 409  # nothing to publish yet
    v = world.provider.upload_version(off["id"], data, format="npz", input_shape=[30])
    assert v["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert v["number"] == 1 and v["input_shape"] == [30]
    world.provider.publish(off["id"])
    found = world.consumer.search_offerings(q="CANCER", task="binary-classification", tag="medical")
    assert [o["id"] for o in found] == [off["id"]]
    assert found[0]["latest_version"]["digest"] == v["digest"]
    assert world.consumer.search_offerings(tag="nope") == []
    world.provider.withdraw(off["id"])
    assert _status(world.consumer.get_offering, off["id"]) == (404, "not_found")


def test_pagination(world) -> None:
    for i in range(7):
        _offering(world.provider, name=f"m{i}")
    r = world.provider.get_json("/v1/offerings", limit=3, offset=0)
    assert (len(r["items"]), r["total"], r["next_offset"]) == (3, 7, 3)
    r = world.provider.get_json("/v1/offerings", limit=3, offset=6)
    assert (len(r["items"]), r["next_offset"]) == (1, None)
    assert len(world.provider.search_offerings()) == 7
    assert (
        world.http.get(
            "/v1/offerings?limit=0", headers={"Authorization": f"Bearer {world.keys['provider']}"}
        ).status_code
        == 422
    )


@pytest.mark.parametrize(
    "payload,fmt,status",
    [
        (pickle.dumps({"w": [1.0, 2.0]}), "npz", 415),
        (b"PK\x03\x04truncated", "npz", 422),
        (b"\x08\x01garbage-onnx", "onnx", 422),
        (b"", "npz", 422),
    ],
)
def test_bad_artifacts_are_refused_and_leave_nothing(world, payload: bytes, fmt: str, status: int) -> None:
    off = _offering(world.provider)
    before = sorted(world.rt.blobs.iter_addresses())
    with pytest.raises(SomAPIError) as ei:
        world.provider.upload_version(off["id"], payload, format=fmt)
    assert ei.value.status == status, ei.value.message
    assert sorted(world.rt.blobs.iter_addresses()) == before
    assert world.provider.list_versions(off["id"]) == []


def test_pickled_npz_truncated_npz_and_wrong_shape(world) -> None:
    import io

    off = _offering(world.provider)
    buf = io.BytesIO()
    np.savez(buf, **{"layer0.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(SomAPIError) as ei:
        world.provider.upload_version(off["id"], buf.getvalue(), format="npz")
    assert ei.value.status in (415, 422)
    _, _, _, w, b, _ = breast_cancer_lr()
    good = npz_bytes(w, b)
    with pytest.raises(SomAPIError) as ei:
        world.provider.upload_version(off["id"], good[: len(good) // 2], format="npz")
    assert ei.value.status == 422
    with pytest.raises(SomAPIError) as ei:
        world.provider.upload_version(off["id"], good, format="npz", input_shape=[31])
    assert ei.value.status == 422 and "input_shape" in ei.value.message


def test_oversized_bodies_are_413(tmp_path, sqlite_url) -> None:
    from marketplace.api.app import create_app
    from tests.conftest import build_world, make_settings

    app = create_app(make_settings(tmp_path, sqlite_url, max_upload_bytes=1000, max_request_bytes=2000))
    try:
        w = build_world(app)
        off = _offering(w.provider)
        with pytest.raises(SomAPIError) as ei:
            w.provider.upload_version(off["id"], b"\0" * 5000, format="npz")
        assert ei.value.status == 413
        r = w.http.post(
            "/v1/offerings",
            content=b"{" + b" " * 5000 + b"}",
            headers={"Authorization": f"Bearer {w.keys['provider']}", "Content-Type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    finally:
        app.state.runtime.close()


def test_malformed_json_and_unknown_fields_are_422(world) -> None:
    h = {"Authorization": f"Bearer {world.keys['provider']}", "Content-Type": "application/json"}
    r = world.http.post("/v1/offerings", content=b"{not json", headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
    r = world.http.post("/v1/offerings", json={"name": "x", "task": "t", "evil": 1}, headers=h)
    assert r.status_code == 422
    r = world.http.post("/v1/offerings", json={"name": "x", "task": "t", "hosting": "moon"}, headers=h)
    assert r.status_code == 422
    r = world.http.get("/v1/nope", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_audit_trail_records_permission_changes_and_filters(world) -> None:
    off = _offering(world.provider)
    k = world.admin.create_key(world.orgs["consumer"], ["consumer"])
    world.admin.revoke_key(k["id"])
    world.http.get("/v1/whoami", headers={"Authorization": "Bearer som_zzz_wrong"})
    from marketplace.services import auth_failures

    auth_failures.flush(world.rt, everything=True)  # failed authentications are summarised per window
    events = world.compliance.audit()
    actions = {e["action"] for e in events}
    assert {"org.create", "key.create", "role.grant", "key.revoke", "offering.create", "auth.failures"} <= actions
    for e in events:
        assert e["time"] and e["actor"] and e["outcome"] in {"success", "denied", "failure"}
    revokes = world.compliance.audit(action="key.revoke")
    assert [e["target"] for e in revokes] == [k["id"]]
    assert all(e["outcome"] == "denied" for e in world.compliance.audit(outcome="denied"))
    assert world.compliance.audit(target=off["id"])[0]["action"] == "offering.create"
    assert world.compliance.audit(since="2999-01-01T00:00:00") == []


def test_openapi_document_is_complete(world) -> None:
    doc = world.http.get("/openapi.json").json()
    assert doc["info"]["title"] == "Share-of-Model"
    for path, ops in doc["paths"].items():
        assert path.startswith("/v1/"), path
        for method, op in ops.items():
            assert op.get("summary"), f"{method.upper()} {path} has no summary"
            assert op.get("responses"), f"{method.upper()} {path} has no responses"


def test_onnx_upload_and_unsupported_operator(world) -> None:
    _, _, _, w, b, _ = breast_cancer_lr()
    off = _offering(world.provider)
    data = onnx_bytes(w, b)
    v = world.provider.upload_version(off["id"], data, format="onnx", input_shape=[30])
    assert v["format"] == "onnx" and v["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert v["input_shape"] == [30]
    with pytest.raises(SomAPIError) as ei:
        world.provider.upload_version(off["id"], onnx_bytes(w, b, op="Softplus"), format="onnx")
    assert ei.value.status == 422 and "Softplus" in ei.value.message
    assert len(world.provider.list_versions(off["id"])) == 1


def test_tag_filter_matches_whole_tags_only(world) -> None:
    names = {}
    for name, tags in [("a", ["medical"]), ("b", ["med"]), ("c", ["a_b", "50%"]), ("d", ["axb", 'q"t\\'])]:
        names[_offering(world.provider, name=name, tags=tags)["id"]] = name

    def found(tag: str) -> list[str]:
        return sorted(names[o["id"]] for o in world.provider.search_offerings(tag=tag))

    assert found("med") == ["b"]
    assert found("medical") == ["a"]
    assert found("a_b") == ["c"]  # '_' is not a wildcard
    assert found("50%") == ["c"]  # nor is '%'
    assert found('q"t\\') == ["d"]
    assert found("ed") == []
    page = world.provider.get_json("/v1/offerings", tag="med", limit=1, offset=0)
    assert (page["total"], len(page["items"]), page["next_offset"]) == (1, 1, None)
