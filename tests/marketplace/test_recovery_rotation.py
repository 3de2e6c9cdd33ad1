"""Issue 17 item 7: key rotation during traffic loses nothing.

Two `som admin rotate-kek` processes run at once while a real uvicorn server takes uploads, HE
inference and marketplace-hosted jobs (compute-pool workers decrypting the model): both keys stay
in the keyring, every artifact still decrypts, no request or job fails, uploads after the rotation
are wrapped with the new active KEK (no restart), and /v1/health says when data keys do not unwrap.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_cli_server import SOM
from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering, make_contract
from tests.marketplace.test_jobs_support import features, model_arrays, model_npz, offering, to_csv


@pytest.fixture
def rw(tmp_path: Path, db_url: str):  # type: ignore[no-untyped-def]
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, workers=1))
    try:
        yield build_world(app), db_url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _rotate(tmp_path: Path, db_url: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(tmp_path / "data"), "DATABASE_URL": db_url})
    return subprocess.Popen(
        [*SOM, "--json", "admin", "rotate-kek"],
        env=env,
        stdout=subprocess.PIPE,  # noqa: S603
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_rotations_during_traffic_lose_nothing(rw: Any, tmp_path: Path) -> None:
    from crypto.envelope import WrappedKey, decrypt_artifact
    from crypto.keyproviders import LocalFileKeyProvider
    from marketplace.db.models import Artifact
    from marketplace.sdk import SomClient

    world, db_url = rw
    rt = world.rt
    he_off = lr_offering(world)
    make_contract(world, he_off)
    job = offering(world, tmp_path, hosting="marketplace")
    uploads = world.provider.create_offering(name="uploads", task="binary-classification", hosting="marketplace")
    x_he = lr_breast_cancer().x_test[:4]
    want_he = lr_breast_cancer().plain_proba[:4]
    w, b = model_arrays()
    x_job = features(5)
    kek_path = rt.key_dir / "kek.json"

    with serve_in_thread(world.app) as url:
        consumer = SomClient(url, world.keys["consumer"])
        provider = SomClient(url, world.keys["provider"])
        errors: list[str] = []
        done = {"he": 0, "jobs": 0, "uploads": 0}
        stop = threading.Event()

        def he_loop() -> None:
            while not stop.is_set():
                try:
                    out = consumer.infer_encrypted(he_off, x_he, key_dir=tmp_path / "he-keys")
                    np.testing.assert_allclose(out[:, 0], want_he, atol=1e-3)
                    done["he"] += 1
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    errors.append(f"he: {type(e).__name__}: {e}")

        def job_loop() -> None:
            while not stop.is_set():
                try:
                    sub = consumer.submit_job(job.offering_id, "predict", to_csv(x_job))
                    got = consumer.wait_job(sub.id, timeout=60)
                    if got["status"] != "succeeded":
                        errors.append(f"job {sub.id}: {got['status']} {got.get('error')}")
                    done["jobs"] += 1
                except Exception as e:  # noqa: BLE001
                    errors.append(f"job: {type(e).__name__}: {e}")

        def upload_loop() -> None:
            while not stop.is_set():
                try:
                    provider.upload_version(uploads["id"], model_npz(w, b + done["uploads"]), format="npz")
                    done["uploads"] += 1
                except Exception as e:  # noqa: BLE001
                    errors.append(f"upload: {type(e).__name__}: {e}")

        # warm up (compute pools started, the model cached by the HE worker) before rotating
        he_loop_once = consumer.infer_encrypted(he_off, x_he, key_dir=tmp_path / "he-keys")
        assert he_loop_once.shape == (4, 1)
        first = consumer.submit_job(job.offering_id, "predict", to_csv(x_job))
        assert consumer.wait_job(first.id, timeout=60)["status"] == "succeeded"
        threads = [threading.Thread(target=f, daemon=True) for f in (he_loop, job_loop, upload_loop)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        procs = [_rotate(tmp_path, db_url), _rotate(tmp_path, db_url)]  # at once
        outs = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err
        new_ids = {json.loads(out)["active_kek"] for out, _ in outs}
        assert len(new_ids) == 2
        time.sleep(1.0)  # traffic goes on after the rotations
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        assert done["he"] > 0 and done["jobs"] > 0 and done["uploads"] > 0

        ring = LocalFileKeyProvider(kek_path, create_if_missing=False)
        assert new_ids <= set(ring.kek_ids()) and ring.kek_id in new_ids  # no rotation lost a key
        # after the rotations, with the same running server: a job runs, an upload uses the new KEK
        after = consumer.submit_job(job.offering_id, "predict", to_csv(x_job))
        assert consumer.wait_job(after.id, timeout=60)["status"] == "succeeded"
        v = provider.upload_version(uploads["id"], model_npz(w, b), format="npz")
        with rt.tx() as s:
            art = s.scalars(select(Artifact).where(Artifact.version_id == v["id"])).one()
            assert art.kek_id == ring.kek_id
            arts = list(s.scalars(select(Artifact)))
        for a in arts:  # every artifact still decrypts with the keyring on disk
            decrypt_artifact(
                rt.blobs.get(a.blob), WrappedKey.from_json(a.wrapped_key.decode()), provider=ring, aad=a.aad.encode()
            )
        h = httpx.get(url + "/v1/health", timeout=30)
        assert h.status_code == 200 and h.json()["kek"] == "ok"

        # Health stays honest: a keyring that cannot unwrap the data keys answers 503.
        saved = tmp_path / "kek.saved"
        shutil.copy2(kek_path, saved)
        other = tmp_path / "other" / "kek.json"
        other.parent.mkdir(mode=0o700)
        LocalFileKeyProvider.create(other)
        os.replace(other, kek_path)
        h = httpx.get(url + "/v1/health", timeout=30)
        assert h.status_code == 503 and h.json()["kek"] == "cannot_unwrap", h.text
        assert h.json()["error"]["code"] == "kek_unavailable"
        os.replace(saved, kek_path)
        h = httpx.get(url + "/v1/health", timeout=30)
        assert h.status_code == 200 and h.json()["kek"] == "ok"
