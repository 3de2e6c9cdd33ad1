"""Encryption at rest: weights never sit in the clear under the data dir, in the DB or the logs;
KEK rotation re-wraps data keys without touching blobs; placeholder secrets are refused."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from marketplace.cli import app as cli_app
from tests.marketplace.models import npz_bytes
from tests.scan import find_bytes, float_patterns


def _recognisable_model() -> tuple[np.ndarray, np.ndarray, bytes]:
    rng = np.random.default_rng(20261123)
    w = rng.normal(0, 1, size=(1, 30)) + np.linspace(0.123456789, 0.987654321, 30)
    b = np.array([0.3141592653589793])
    return w, b, npz_bytes(w, b)


def test_no_plaintext_weights_anywhere(sqlite_world) -> None:
    w, b, data = _recognisable_model()
    world = sqlite_world
    patterns = float_patterns(w)
    assert find_bytes(patterns, extra_blobs=[data]), "the scan must be able to see the plaintext"
    off = world.provider.create_offering(name="secret-weights", task="binary-classification")
    v = world.provider.upload_version(off["id"], data, format="npz", input_shape=[30])
    world.provider.publish(off["id"])
    world.consumer.get_offering(off["id"])
    world.compliance.audit()
    assert v["size"] == len(data)
    world.rt.engine.dispose()  # flush the WAL into the DB file too
    hits = find_bytes(patterns, paths=[world.rt.data_dir])
    assert hits == [], hits
    # and the artifact does decrypt to the exact upload, inside this process only
    from sqlalchemy import select

    from marketplace.db.models import Artifact
    from marketplace.services.catalog import decrypt_artifact

    with world.rt.tx() as s:
        art = s.scalars(select(Artifact)).one()
    assert decrypt_artifact(world.rt, art) == data


def test_rotate_kek_rewraps_without_reencrypting(tmp_path, sqlite_url) -> None:
    from sqlalchemy import select

    from marketplace.api.app import create_app
    from marketplace.db.models import Artifact
    from marketplace.services.catalog import decrypt_artifact
    from tests.conftest import build_world, make_settings

    settings = make_settings(tmp_path, sqlite_url)
    app = create_app(settings)
    w = build_world(app)
    _, _, data = _recognisable_model()
    off = w.provider.create_offering(name="m", task="t")
    w.provider.upload_version(off["id"], data, format="npz")
    with w.rt.tx() as s:
        before = [(a.blob, a.kek_id, bytes(a.wrapped_key)) for a in s.scalars(select(Artifact))]
    blob_bytes = {addr: w.rt.blobs.get(addr) for addr, _, _ in before}
    app.state.runtime.close()

    env = {"SOM_DATA_DIR": str(settings.data_dir), "DATABASE_URL": sqlite_url}
    r = CliRunner().invoke(cli_app, ["--json", "admin", "rotate-kek"], env=env)
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output)
    assert out["rewrapped"] == len(before) == 1

    app2 = create_app(settings)
    rt = app2.state.runtime
    try:
        with rt.tx() as s:
            after = list(s.scalars(select(Artifact)))
            for art, (addr, kek, wrapped) in zip(after, before, strict=True):
                assert art.blob == addr
                assert art.kek_id == out["active_kek"] != kek
                assert bytes(art.wrapped_key) != wrapped
                assert rt.blobs.get(addr) == blob_bytes[addr]  # blobs untouched
                assert decrypt_artifact(rt, art) == data
    finally:
        rt.close()


def test_placeholder_secrets_are_refused(tmp_path) -> None:
    from marketplace.settings import Settings, SettingsError

    for bad in ("", "changeme", "placeholder"):
        s = Settings(data_dir=tmp_path, key_provider="env", kek=bad)
        with pytest.raises(SettingsError):
            s.check_secrets()
    r = CliRunner().invoke(
        cli_app, ["serve", "--data-dir", str(tmp_path)], env={"SOM_KEY_PROVIDER": "env", "SOM_KEK": "changeme"}
    )
    assert r.exit_code == 2
    assert "SOM_KEK" in r.output


def test_env_key_provider_runs_the_app(tmp_path, sqlite_url) -> None:
    import base64
    import os

    from marketplace.api.app import create_app
    from tests.conftest import build_world, make_settings

    kek = base64.b64encode(os.urandom(32)).decode()
    app = create_app(make_settings(tmp_path, sqlite_url, key_provider="env", kek=kek))
    try:
        w = build_world(app)
        _, _, data = _recognisable_model()
        off = w.provider.create_offering(name="m", task="t")
        v = w.provider.upload_version(off["id"], data, format="npz")
        assert v["number"] == 1
        assert not (w.rt.data_dir / "keys" / "kek.json").exists()
        assert not (w.rt.key_dir / "kek.json").exists()
    finally:
        app.state.runtime.close()
