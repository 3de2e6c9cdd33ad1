"""Attacks on the recovery paths of issue 17, against a real uvicorn server.

* another organisation replays a victim's Idempotency-Key (and frame) to fetch the victim's stored
  answer: refused, nothing of the victim's is returned;
* an unauthenticated health probe while the data keys do not unwrap learns no KEK id;
* the kept last-signed checkpoint is 0600 in the key directory, not in the data directory (a data
  directory backup cannot roll it back), and one forged or copied from another log makes the log
  refuse to sign instead of trusting it;
* a storm of compute requests with large bodies is shed before the bodies are read and charges
  nothing.
"""

from __future__ import annotations

import os
import stat
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import serve_in_thread
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract


def _frame(world: Any, url: str, off: str, tmp_path: Path) -> tuple[Any, str, bytes]:
    from marketplace.sdk import SomClient

    c = SomClient(url, world.keys["consumer"])
    kd = tmp_path / "he-keys"
    sk = c.he_keys(off, key_dir=kd, layout="batch")
    ks = c._keyset_for(off, sk, contract_id=None, key_dir=kd)
    return c, ks, sk.encrypt(lr_breast_cancer().x_test[:3])


def test_another_org_cannot_replay_a_stored_answer_by_its_key(live: Any, tmp_path: Path) -> None:
    world, url = live
    off = lr_offering(world)
    make_contract(world, off)
    make_contract(world, off, consumer="other_consumer")
    c, ks, frame = _frame(world, url, off, tmp_path)
    answer = c.infer_raw(off, frame, keyset_id=ks, idempotency_key="victim-key-1")
    for key in (world.keys["other_consumer"], world.keys["provider"]):
        r = httpx.post(
            f"{url}/v1/offerings/{off}/infer",
            content=frame,
            timeout=60,
            headers={
                "Authorization": f"Bearer {key}",
                "Content-Type": "application/octet-stream",
                "Idempotency-Key": "victim-key-1",
                "X-Som-Keyset": ks,
            },
        )
        assert 400 <= r.status_code < 500, r.status_code
        assert r.json()["error"]["code"] and answer not in r.content


def test_unauthenticated_health_names_no_kek_when_keys_do_not_unwrap(live: Any, tmp_path: Path) -> None:
    from crypto.keyproviders import LocalFileKeyProvider

    world, url = live
    world.provider.upload_version(
        world.provider.create_offering(name="m", task="binary-classification", hosting="marketplace")["id"],
        lr_breast_cancer().npz,
        format="npz",
    )
    path = world.rt.key_dir / "kek.json"
    ids = LocalFileKeyProvider(path, create_if_missing=False).kek_ids()
    saved = path.read_bytes()
    other = tmp_path / "o" / "kek.json"
    other.parent.mkdir(mode=0o700)
    LocalFileKeyProvider.create(other)
    os.replace(other, path)
    try:
        r = httpx.get(url + "/v1/health", timeout=30)
        assert r.status_code == 503 and r.json()["kek"] == "cannot_unwrap"
        for kid in ids:
            assert kid not in r.text and kid.split(":")[-1] not in r.text
    finally:
        path.write_bytes(saved)


def test_kept_checkpoint_is_private_outside_the_data_dir_and_a_forged_one_is_refused(live: Any) -> None:
    from crypto.checkpoint import Checkpoint, sign_checkpoint
    from crypto.note import NoteSigner
    from crypto.signing import SigningKey
    from marketplace.services import ledger
    from marketplace.services.logguard import kept_path

    world, url = live
    rt = world.rt
    httpx.post(
        url + "/v1/ledger/checkpoints", headers={"Authorization": f"Bearer {world.keys['compliance']}"}, timeout=30
    ).raise_for_status()
    kept = kept_path(rt.key_dir, rt.settings.log_origin)
    assert kept.exists() and rt.data_dir not in kept.parents
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    # A checkpoint signed by another key (another log, or a forger) in its place: refused.
    real = kept.read_bytes()
    forger = NoteSigner(rt.settings.log_origin, SigningKey.generate())
    kept.write_bytes(sign_checkpoint(Checkpoint(rt.settings.log_origin, 1, bytes(32)), forger))
    with world.rt.tx() as s:
        from marketplace.services import audit

        audit.emit(s, audit.Actor.system(), "test.event", target="x")
    try:
        with pytest.raises(ledger.LedgerIntegrityError, match="not a checkpoint of log"):
            ledger.sign_checkpoint(rt)
        r = httpx.post(
            url + "/v1/ledger/checkpoints", headers={"Authorization": f"Bearer {world.keys['compliance']}"}, timeout=30
        )
        assert (r.status_code, r.json()["error"]["code"]) == (503, "ledger_integrity")
    finally:
        kept.write_bytes(real)
    ledger.sign_checkpoint(rt)


def test_a_storm_of_large_compute_bodies_is_shed_unread_and_uncharged(tmp_path: Path, sqlite_url: str) -> None:
    from sqlalchemy import func, select

    from marketplace.api.app import create_app
    from marketplace.db.models_contracts import UsageRow
    from tests.conftest import build_world, make_settings

    app = create_app(make_settings(tmp_path, sqlite_url, admission_compute_concurrency=1, admission_queue=0))
    try:
        world = build_world(app)
        off = lr_offering(world)
        make_contract(world, off)
        with serve_in_thread(app) as url:
            _, ks, _ = _frame(world, url, off, tmp_path)
            junk = os.urandom(8 << 20)  # 8 MiB of garbage per request

            def one(_: int) -> int:
                r = httpx.post(
                    f"{url}/v1/offerings/{off}/infer",
                    content=junk,
                    timeout=120,
                    headers={
                        "Authorization": f"Bearer {world.keys['consumer']}",
                        "Content-Type": "application/octet-stream",
                        "Idempotency-Key": str(uuid.uuid4()),
                        "X-Som-Keyset": ks,
                    },
                )
                return r.status_code

            with ThreadPoolExecutor(20) as pool:
                codes = list(pool.map(one, range(20)))
        assert 503 in codes and set(codes) <= {503, 422}, codes
        with app.state.runtime.tx() as s:
            assert s.scalar(select(func.count()).select_from(UsageRow)) == 0
    finally:
        app.state.runtime.close()
