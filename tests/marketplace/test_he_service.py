"""HE inference as a service, through the real app: compile, key sets, metered encrypted inference.

A provider uploads a real scikit-learn logistic regression (breast cancer), compiles it with
calibration data and publishes it; a consumer with a signed contract registers a public key set
and runs encrypted inference on the test split. Protocol checks: the server never holds a
secret key or the consumer's inputs; idempotent replays; no charge on failure; object-level
authorization on key sets; size limits; malformed ciphertexts are 422, never 500.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import build_world, make_settings
from tests.marketplace.test_he_service_support import (
    lr_breast_cancer,
    lr_offering,
    make_contract,
    npy,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def hw(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    """SQLite world with one compute worker (the machine has 2 cores)."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, workers=1))
    try:
        yield build_world(app)
    finally:
        app.state.runtime.close()


def _usage_states(rt: Any) -> list[str]:
    from marketplace.db.models_contracts import UsageRow

    with rt.tx() as s:
        return sorted(u.state for u in s.scalars(select(UsageRow)))


def _raw_infer(
    w: Any, client: Any, off: str, body: bytes, *, keyset: str, key: str | None, contract: str | None = None
) -> Any:
    headers = {"Content-Type": "application/octet-stream", "X-Som-Keyset": keyset}
    if key is not None:
        headers["Idempotency-Key"] = key
    if contract:
        headers["X-Som-Contract"] = contract
    return client._http.post(f"/v1/offerings/{off}/infer", content=body, headers=headers)


def _setup(w: Any, tmp_path: Path) -> tuple[str, str, Any, dict[str, Any]]:
    """Offering, contract, the consumer's secret context (local) and its registered key set."""
    off = lr_offering(w)
    cid = make_contract(w, off)
    sk = w.consumer.he_keys(off, key_dir=tmp_path / "consumer-keys")
    ks = w.consumer.upload_keyset(sk.public_keyset_bytes(), contract_id=cid)
    return off, cid, sk, ks


# ---------------------------------------------------------------------------- end to end


def test_encrypted_inference_matches_plaintext(world: Any, tmp_path: Path) -> None:
    d = lr_breast_cancer()
    off = lr_offering(world)
    card = world.consumer.get_offering(off)["latest_version"]["he_report"]
    assert card["plan_digest"].startswith("sha256:")
    assert card["argmax_agreement"] >= 0.99 and card["security_bits"] == 128
    assert card["max_abs_error_vs_exact"] < card["promised_precision"] * 4
    cid = make_contract(world, off)
    key_dir = tmp_path / "consumer-keys"
    proba = world.consumer.infer_encrypted(off, d.x_test, contract_id=cid, key_dir=key_dir)
    assert proba.shape == (len(d.x_test), 1)
    agreement = np.mean((proba[:, 0] > 0.5) == (d.plain_proba > 0.5))
    assert agreement >= 0.99
    assert np.abs(proba[:, 0] - d.plain_proba).max() < 0.01
    receipt = world.consumer.last_receipt
    assert receipt is not None and {"index", "leaf", "inclusion_proof", "checkpoint"} <= set(receipt)
    assert world.consumer.last_usage_id
    # the secret key is cached locally, owner-only
    files = list(key_dir.glob("*.sk"))
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert [k["layouts"] for k in world.consumer.list_keysets()] == [["batch"]]
    # a few samples: layout "auto" sends one ciphertext per sample (its own key set, registered once)
    few = world.consumer.infer_encrypted(off, d.x_test[:3], contract_id=cid, key_dir=key_dir)
    assert np.abs(few[:, 0] - d.plain_proba[:3]).max() < 0.01
    world.consumer.infer_encrypted(off, d.x_test[3:5], contract_id=cid, key_dir=key_dir)
    assert sorted(k["layouts"] for k in world.consumer.list_keysets()) == [["batch"], ["batch", "single"]]
    # an explicit layout still works and reuses its key set (one upload per contract, plan, layout)
    again = world.consumer.infer_encrypted(off, d.x_test[:3], contract_id=cid, key_dir=key_dir, layout="batch")
    assert np.abs(again - few).max() < 0.01
    assert len(world.consumer.list_keysets()) == 2
    # one artifact.decrypt audit event per computation, from the API process
    decrypts = [e for e in world.admin.audit(action="artifact.decrypt") if e["detail"].get("purpose") == "he_infer"]
    assert len(decrypts) == 4 and all(e["outcome"] == "success" for e in decrypts)
    assert _usage_states(world.rt) == ["charged"] * 4


# ---------------------------------------------------------------------------- protocol


def test_server_never_holds_a_secret_key_or_the_inputs(hw: Any, tmp_path: Path) -> None:
    import tenseal as ts

    from marketplace.db.models_he import Keyset
    from tests.scan import find_bytes, float_patterns

    d = lr_breast_cancer()
    off, cid, sk, ks = _setup(hw, tmp_path)
    # a key set carrying the secret key is refused
    private = sk._ctx.serialize(save_secret_key=True)
    with pytest.raises(Exception) as e:
        hw.consumer.upload_keyset(private, contract_id=cid)
    assert e.value.status == 422 and "secret key" in e.value.message
    x = d.x_test[:40]
    out = hw.consumer.infer_encrypted(off, x, contract_id=cid, key_dir=tmp_path / "consumer-keys")
    assert out.shape == (40, 1)
    rt = hw.rt
    with rt.tx() as s:
        rows = list(s.scalars(select(Keyset)))
    assert ks["id"] in {r.id for r in rows}
    for r in rows:  # every stored key set deserializes, without a secret key
        assert not ts.context_from(rt.blobs.get(r.blob)).is_private()
    # every stored key set, and every blob that parses as a TenSEAL context, is public-only
    loaded = 0
    for addr in rt.blobs.iter_addresses():
        try:
            ctx = ts.context_from(rt.blobs.get(addr))
        except Exception:  # noqa: BLE001, S112 - not a context (artifact, ciphertexts, results)
            continue
        loaded += 1
        assert not ctx.is_private(), f"blob {addr} holds a secret key"
    assert loaded >= 1
    # the consumer's inputs are nowhere on the server side: data dir (DB, blobs, logs)
    pats = [pt for row in (0, 13, 27, 39) for pt in float_patterns(x[row])] + float_patterns(x)
    assert find_bytes(pats, paths=[rt.data_dir]) == []
    # ... and the patterns would be found if they were there (the scan can fail)
    (rt.data_dir / "logs" / "canary.log").write_text(", ".join(repr(float(v)) for v in x[13]))
    assert find_bytes(pats, paths=[rt.data_dir]) != []


# ---------------------------------------------------------------------------- metering


def test_idempotent_replay_and_no_charge_on_failure(hw: Any, tmp_path: Path) -> None:
    from crypto.he import wire

    d = lr_breast_cancer()
    off, cid, sk, ks = _setup(hw, tmp_path)
    req = sk.encrypt(d.x_test[:5])
    key = str(uuid.uuid4())
    r1 = _raw_infer(hw, hw.consumer, off, req, keyset=ks["id"], key=key)
    assert r1.status_code == 200, r1.text
    assert r1.headers["content-type"] == "application/octet-stream"
    assert r1.headers["x-som-units"] == "5"
    r2 = _raw_infer(hw, hw.consumer, off, req, keyset=ks["id"], key=key)
    assert r2.status_code == 200
    assert r2.content == r1.content and r2.headers["x-som-usage-id"] == r1.headers["x-som-usage-id"]
    assert r2.headers["x-som-receipt"] == r1.headers["x-som-receipt"]
    assert _usage_states(hw.rt) == ["charged"]
    # same key, another request: 422
    other = sk.encrypt(d.x_test[5:7])
    r3 = _raw_infer(hw, hw.consumer, off, other, keyset=ks["id"], key=key)
    assert r3.status_code == 422
    # no idempotency key: 422
    assert _raw_infer(hw, hw.consumer, off, other, keyset=ks["id"], key=None).status_code == 422
    # not a frame at all: 422 before metering
    r4 = _raw_infer(hw, hw.consumer, off, b"\x00garbage" * 10, keyset=ks["id"], key=str(uuid.uuid4()))
    assert r4.status_code == 422 and r4.json()["error"]["code"] == "invalid"
    # a well-framed request whose ciphertexts are garbage: 422, reservation released, uncharged
    frame = wire.decode(other, sk.plan, kind=wire.KIND_REQUEST)
    bad = wire.make_frame(
        sk.plan,
        kind=wire.KIND_REQUEST,
        layout="batch",
        n_samples=2,
        blobs=[b"\x5e\xa1" + os.urandom(64) for _ in frame.blobs],
    )
    r5 = _raw_infer(hw, hw.consumer, off, bad, keyset=ks["id"], key=str(uuid.uuid4()))
    assert r5.status_code == 422, r5.text
    assert _usage_states(hw.rt) == ["charged", "released"]
    failed = [e for e in hw.admin.audit(action="artifact.decrypt") if e["outcome"] == "failure"]
    assert len(failed) == 1
    # the decryption still works after all that
    r6 = _raw_infer(hw, hw.consumer, off, other, keyset=ks["id"], key=str(uuid.uuid4()))
    assert r6.status_code == 200
    np.testing.assert_allclose(sk.decrypt(r6.content)[:, 0], d.plain_proba[5:7], atol=0.01)


def test_oversized_requests_are_413(tmp_path: Path, sqlite_url: str) -> None:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, sqlite_url, workers=1, max_ciphertext_bytes=64 * 1024))
    try:
        w = build_world(app)
        off = lr_offering(w)
        cid = make_contract(w, off)
        sk = w.consumer.he_keys(off, key_dir=tmp_path / "k")
        with pytest.raises(Exception) as e:
            w.consumer.upload_keyset(sk.public_keyset_bytes(), contract_id=cid)
        assert e.value.status == 413
        r = _raw_infer(w, w.consumer, off, b"\x00" * (65 * 1024), keyset="ks_x", key="k1")
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    finally:
        app.state.runtime.close()


# ---------------------------------------------------------------------------- authorization


def test_keyset_authorization_and_revocation(hw: Any, tmp_path: Path) -> None:
    from marketplace.db.models_contracts import ContractRow

    d = lr_breast_cancer()
    off, cid, sk, ks = _setup(hw, tmp_path)
    req = sk.encrypt(d.x_test[:2])
    # another consumer, with its own contract, cannot use, see or delete this key set
    make_contract(hw, off, consumer="other_consumer")
    r = _raw_infer(hw, hw.other_consumer, off, req, keyset=ks["id"], key=str(uuid.uuid4()))
    assert r.status_code == 404
    assert hw.other_consumer._http.get(f"/v1/keysets/{ks['id']}").status_code == 404
    assert hw.other_consumer._http.delete(f"/v1/keysets/{ks['id']}").status_code == 404
    assert hw.other_consumer._http.get(f"/v1/keysets/{ks['id']}/content").status_code == 404
    assert hw.other_consumer.list_keysets() == []
    denied = [e for e in hw.admin.audit(action="authz.denied") if e["target"] == ks["id"]]
    assert len(denied) >= 3
    # nor register a key set on someone else's contract
    with pytest.raises(Exception) as e:
        hw.other_consumer.upload_keyset(sk.public_keyset_bytes(), contract_id=cid)
    assert e.value.status == 404
    # the owner fetches its own key set back, byte for byte
    import hashlib

    content = hw.consumer._http.get(f"/v1/keysets/{ks['id']}/content").content
    assert "sha256:" + hashlib.sha256(content).hexdigest() == ks["digest"] and len(content) == ks["size"]
    # a key set bound to contract A cannot be used under contract B
    cid_b = make_contract(hw, off)
    r = _raw_infer(hw, hw.consumer, off, req, keyset=ks["id"], key=str(uuid.uuid4()), contract=cid_b)
    assert r.status_code == 403 and "bound to contract" in r.json()["error"]["message"]
    assert _usage_states(hw.rt) == []
    # the contract ends: its key sets are revoked
    with hw.rt.tx() as s:
        s.get(ContractRow, cid).status = "terminated"
    r = _raw_infer(hw, hw.consumer, off, req, keyset=ks["id"], key=str(uuid.uuid4()))
    assert r.status_code == 403 and "keyset revoked" in r.json()["error"]["message"]
    listed = {k["id"]: k for k in hw.consumer.list_keysets()}
    assert listed[ks["id"]]["status"] == "revoked" and listed[ks["id"]]["revoked_reason"] == "contract_ended"
    # an explicitly deleted key set is revoked too
    ks_b = hw.consumer.upload_keyset(sk.public_keyset_bytes(), contract_id=cid_b)
    assert hw.consumer.delete_keyset(ks_b["id"])["status"] == "revoked"
    r = _raw_infer(hw, hw.consumer, off, req, keyset=ks_b["id"], key=str(uuid.uuid4()))
    assert r.status_code == 403
    assert _usage_states(hw.rt) == []


def test_compile_refusals(hw: Any) -> None:
    d = lr_breast_cancer()
    off = lr_offering(hw, compile_=False, publish=False)
    # only the owner, only the provider role
    with pytest.raises(Exception) as e:
        hw.other_provider.compile_version(off, 1, d.x_train)
    assert e.value.status == 404
    with pytest.raises(Exception) as e:
        hw.consumer.compile_version(off, 1, d.x_train)
    assert e.value.status == 403
    # wrong shape, not .npy, pickled object array, unknown version
    for bad in (npy(d.x_train[:, :5]), b"a,b\n1,2\n", npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)):
        with pytest.raises(Exception) as e:
            hw.provider.compile_version(off, 1, bad)
        assert e.value.status == 422, bad[:20]
    with pytest.raises(Exception) as e:
        hw.provider.compile_version(off, 7, d.x_train)
    assert e.value.status == 404
    for number in (0, 2**31, 2**64):  # found by the API fuzzer: past the DB's integer, a 500
        with pytest.raises(Exception) as e:
            hw.provider.compile_version(off, number, d.x_train)
        assert (e.value.status, e.value.code) == (422, "invalid")
    # not compiled yet: key sets cannot be registered (409), then compile works
    hw.provider.publish(off)
    cid = make_contract(hw, off)
    with pytest.raises(Exception) as e:
        hw.consumer.upload_keyset(b"\x01" * 100, contract_id=cid)
    assert e.value.status == 409
    v = hw.provider.compile_version(off, 1, d.x_train)
    assert v["he_plan"]["input_dim"] == 30 and v["he_report"]["argmax_agreement"] >= 0.99
    # garbage key set: 422
    with pytest.raises(Exception) as e:
        hw.consumer.upload_keyset(b"\x01" * 100, contract_id=cid)
    assert e.value.status == 422
    # provider-hosted offerings are compiled by their agent, not here
    prov = hw.provider.create_offering(name="agent-hosted", task="binary-classification", hosting="provider")
    with pytest.raises(Exception) as e:
        hw.provider.compile_version(prov["id"], 1, d.x_train)
    assert e.value.status in (404, 409)
