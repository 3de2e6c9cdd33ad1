"""Issue 10 §2: every parser of provider- or consumer-supplied bytes is safe by construction.

Attacks against a real server (uvicorn on loopback, real SQLite, the real job pipeline): ONNX
external data naming server files, zip-bomb and malformed ``.npz``/``.npy`` uploads and job
inputs, rows beyond the paid units, CSV bounds, JSON nested or sized to break the catalog.
Each test fails if the attack works again.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from crypto.errors import HEError
from crypto.he.onnx_import import EXTERNAL_DATA_REFUSED
from marketplace.sdk import SomClient
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_jobs_support import D_IN, features, model_npz, offering, to_csv

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def srv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, str]]:
    """A world served by uvicorn on loopback; the process works in ``tmp_path`` (beside data/),
    as an operator who ran ``som serve`` there would have, so relative paths can reach the keys."""
    from marketplace.api.app import create_app

    monkeypatch.chdir(tmp_path)
    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'som.db'}", workers=1))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


@pytest.fixture
def srv_db(tmp_path: Path, db_url: str) -> Iterator[tuple[Any, str]]:
    """The same, on SQLite and on PostgreSQL (for what is stored: JSON fields)."""
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, db_url, workers=1))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            yield w, url
        assert getattr(app.state, "internal_errors", 0) == 0, "the app answered 500; see data/logs/som.log"
    finally:
        app.state.runtime.close()


def _client(w: Any, url: str, who: str) -> SomClient:
    return SomClient(url, w.keys[who])


def _h(w: Any, who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {w.keys[who]}"}


def _secret_files(w: Any) -> dict[str, bytes]:
    """Server files an attacker would like to read: a probe key file in keys/, the KEK keyring, som.db."""
    rt = w.rt
    keys = rt.data_dir / "keys"
    keys.mkdir(exist_ok=True, mode=0o700)
    probe = keys / "probe.key"
    if not probe.exists():
        probe.write_bytes(os.urandom(64))
    rt.key_provider  # noqa: B018 - make sure the keyring exists
    files = {str(probe): probe.read_bytes()}
    kek = getattr(rt.key_provider, "path", None)
    if kek is not None and Path(kek).exists():
        files[str(kek)] = Path(kek).read_bytes()
    db = rt.data_dir.parent / "som.db"
    if db.exists():
        files[str(db)] = db.read_bytes()[:4096]
    return files


def _leaks(body: bytes, secret: bytes) -> bool:
    """Does ``body`` carry any 16-byte run of ``secret`` raw, base64'd or hex'd?"""
    for i in range(0, max(1, len(secret) - 16), 4):
        win = secret[i : i + 16]
        if len(set(win)) < 4:
            continue  # runs of zeros etc. prove nothing
        if win in body or base64.b64encode(win)[:20] in body or win.hex().encode() in body:
            return True
    return False


# ----------------------------------------------------------------------------- ONNX


def _external(t: TensorProto, location: str, length: int, *, flag: bool = True) -> TensorProto:
    t.ClearField("raw_data")
    t.ClearField("float_data")
    if flag:
        t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def onnx_external(location: str, *, where: str = "initializer", flag: bool = True) -> bytes:
    """A MatMul model (x @ W, D_IN -> 1) whose W, or a tensor elsewhere, names external data."""
    w = numpy_helper.from_array(np.ones((D_IN, 1), dtype=np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [w]
    sparse = []
    if where == "initializer":
        _external(w, location, 4 * D_IN, flag=flag)
    elif where == "constant":  # a tensor in a node attribute
        c = _external(numpy_helper.from_array(np.ones((1,), dtype=np.float32), "c"), location, 4, flag=flag)
        nodes.insert(0, helper.make_node("Constant", [], ["k"], value=c))
    elif where == "subgraph":  # an initializer inside an If branch
        inner = _external(numpy_helper.from_array(np.ones((1,), dtype=np.float32), "z"), location, 4, flag=flag)
        branch = helper.make_graph(
            [helper.make_node("Identity", ["z"], ["o"])],
            "b",
            [],
            [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
            [inner],
        )
        cond = numpy_helper.from_array(np.array(True), "cond")
        inits.append(cond)
        nodes.insert(0, helper.make_node("If", ["cond"], ["o2"], then_branch=branch, else_branch=branch))
    elif where == "sparse":
        vals = _external(numpy_helper.from_array(np.ones((1,), dtype=np.float32), "sv"), location, 4, flag=flag)
        idx = numpy_helper.from_array(np.array([0], dtype=np.int64), "si")
        sparse.append(helper.make_sparse_tensor(vals, idx, [D_IN]))
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        inits,
        sparse_initializer=sparse,
    )
    return bytes(helper.make_model(g).SerializeToString())


def _locations(w: Any, tmp_path: Path) -> list[str]:
    data = w.rt.data_dir
    out = []
    for f in _secret_files(w):
        p = Path(f)
        out += [
            str(p),
            os.path.relpath(p, tmp_path),
            os.path.relpath(p, data),
            "../" + p.parent.name + "/" + p.name,
            "../" * 12 + str(p).lstrip("/"),
        ]
    return out + ["data/keys/does-not-exist.key", "/nonexistent/x", "../../nope"]


def test_onnx_external_data_upload_is_refused_without_an_oracle(srv: Any, tmp_path: Path) -> None:
    w, url = srv
    secrets = _secret_files(w)
    off = w.provider.create_offering(name="evil", task="binary-classification")
    messages = set()
    for where in ("initializer", "constant", "subgraph", "sparse"):
        for flag in (True, False):
            for loc in _locations(w, tmp_path):
                r = httpx.post(
                    f"{url}/v1/offerings/{off['id']}/versions",
                    params={"format": "onnx"},
                    content=onnx_external(loc, where=where, flag=flag),
                    headers=_h(w, "provider"),
                    timeout=30,
                )
                assert r.status_code == 422, (where, loc, r.text)
                for s in secrets.values():
                    assert not _leaks(r.content, s), (where, loc)
                messages.add(r.json()["error"]["message"])
    # one message whatever the path, existing file or not: no file-existence oracle
    assert messages == {f"artifact refused: {EXTERNAL_DATA_REFUSED}"}
    assert httpx.get(f"{url}/v1/offerings/{off['id']}/versions", headers=_h(w, "provider")).json() == []


def test_onnx_loader_refuses_external_data_directly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ONNX entry point (upload validation, compiler, job-time loader) goes through load_onnx."""
    from crypto.he.compiler import compile_model, validate_artifact
    from crypto.he.onnx_import import load_onnx, parse_onnx
    from marketplace.compute.jobs import load_model

    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.bin").write_bytes(os.urandom(64))
    for loc in ("secret.bin", str(tmp_path / "secret.bin"), "missing.bin", "../" + tmp_path.name + "/secret.bin"):
        for where in ("initializer", "constant", "subgraph", "sparse"):
            data = onnx_external(loc, where=where)
            for fn in (
                load_onnx,
                parse_onnx,
                lambda d: validate_artifact(d, "onnx"),
                lambda d: load_model(d, "onnx"),
                lambda d: compile_model(d, "onnx", calibration=np.zeros((4, D_IN))),
            ):
                with pytest.raises(HEError) as e:
                    fn(data)
                assert str(e.value) == EXTERNAL_DATA_REFUSED


def test_predict_job_on_a_smuggled_external_data_model_leaks_nothing(srv: Any, tmp_path: Path) -> None:
    """Were the upload check bypassed (a row written before the fix), the job-time loader refuses too."""
    from crypto.envelope import encrypt_artifact
    from marketplace.services import audit, catalog
    from marketplace.services.catalog import PreparedVersion

    w, url = srv
    secrets = _secret_files(w)
    probe = next(p for p in secrets if p.endswith("probe.key"))
    setup = offering(w, tmp_path, hosting="marketplace")
    evil = onnx_external(os.path.relpath(probe, tmp_path))
    rt = w.rt
    vid = "ver_smuggled0000000000000"
    aad = f"som:{vid}:model"
    ct, wrapped = encrypt_artifact(evil, provider=rt.key_provider, aad=aad.encode())
    prep = PreparedVersion(
        vid,
        "onnx",
        "sha256:" + "0" * 64,
        len(evil),
        {"input_dim": D_IN},
        rt.blobs.put(ct),
        wrapped.to_json().encode(),
        wrapped.kek_id,
        aad,
    )
    with rt.tx() as s:
        v = catalog.commit_version(
            s, catalog.get_owned(s, _principal(w, "provider"), setup.offering_id), prep, who=audit.Actor.system()
        )
        # the bypass also points the live contract at it (contracts pin the version they compute with)
        from marketplace.db.models_contracts import ContractRow

        for c in s.query(ContractRow).filter(ContractRow.offering_id == setup.offering_id):
            c.version_number = v.number
    consumer = _client(w, url, "consumer")
    x = np.eye(D_IN)
    sub = consumer.submit_job(setup.offering_id, "predict", to_csv(x))
    job = consumer.wait_job(sub.id, timeout=60)
    assert job["status"] == "failed" and not job["result_available"], job
    assert job["error"] == "the model artifact was refused by the model loader"
    for who in ("consumer", "provider"):
        body = httpx.get(f"{url}/v1/jobs/{sub.id}", headers=_h(w, who)).content
        for s in secrets.values():
            assert not _leaks(body, s)


def _principal(w: Any, who: str) -> Any:
    from marketplace.services.identity import authenticate

    with w.rt.tx() as s:
        p = authenticate(s, w.keys[who])
        s.expunge_all()
    return p


# ----------------------------------------------------------------------------- npz / npy


def npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def zip_bomb(name: str, mib: int, *, extra: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """An honest-looking .npz whose member ``name`` is ``mib`` MiB of zeros deflated to ~1/1000."""
    buf = io.BytesIO()
    n = mib * 2**20 // 8
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(name, "w", force_zip64=True) as f:
            f.write(npy_header((n // D_IN, D_IN)))
            chunk = b"\0" * 2**20
            for _ in range(mib):
                f.write(chunk)
        for k, v in extra:
            z.writestr(k, v)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def npz_of(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names: that is the attack
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def _bounded(fn: Any, *, seconds: float = 5.0, mib: int = 64) -> Any:
    """Run ``fn`` (which talks to the in-process server); check its time and the process's peak
    traced allocations (the server thread included)."""
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < seconds
    assert peak < mib * 2**20, f"peak {peak / 2**20:.0f} MiB"
    return out


def test_zip_bomb_npz_upload_is_refused_quickly_in_bounded_memory(srv: Any) -> None:
    w, url = srv
    off = w.provider.create_offering(name="bomb", task="binary-classification")
    act = _npy(np.array("none"))
    extra = (("layer0.bias.npy", _npy(np.zeros(1))), ("layer0.activation.npy", act))
    bombs = [zip_bomb("layer0.weight.npy", 512, extra=extra), zip_bomb("layer0.weight.npy", 200, extra=extra)]
    assert 400 * 1024 < len(bombs[0]) < 600 * 1024
    for data in bombs:
        r = _bounded(
            lambda d=data: httpx.post(
                f"{url}/v1/offerings/{off['id']}/versions",
                params={"format": "npz"},
                content=d,
                headers=_h(w, "provider"),
                timeout=30,
            )
        )
        assert r.status_code == 422, r.text
        assert "uncompressed" in r.text or "compression ratio" in r.text


@pytest.mark.parametrize(
    "members, why",
    [
        ([("../layer0.weight.npy", _npy(np.ones((1, D_IN))))], "unexpected archive member"),
        ([("x/../layer0.weight.npy", _npy(np.ones((1, D_IN))))], "unexpected archive member"),
        ([("/layer0.weight.npy", _npy(np.ones((1, D_IN))))], "unexpected archive member"),
        (
            [("layer0.weight.npy", _npy(np.ones((1, D_IN)))), ("layer0.weight.npy", _npy(np.ones((1, D_IN))))],
            "duplicate",
        ),
        ([("layer0.weight.npy", _npy(np.array([{"a": 1}], dtype=object)))], "pickle"),
        ([("layer0.weight.npy", npy_header((10**12, D_IN)))], "does not match its header"),
    ],
)
def test_malformed_npz_uploads_are_422(srv: Any, members: list[tuple[str, bytes]], why: str) -> None:
    w, url = srv
    off = w.provider.create_offering(name="bad", task="binary-classification")
    r = httpx.post(
        f"{url}/v1/offerings/{off['id']}/versions",
        params={"format": "npz"},
        content=npz_of(members),
        headers=_h(w, "provider"),
        timeout=30,
    )
    assert r.status_code == 422 and why in r.json()["error"]["message"], r.text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pos=st.integers(min_value=0, max_value=10**6),
    byte=st.integers(min_value=0, max_value=255),
    n=st.integers(min_value=1, max_value=4),
)
def test_any_mutated_npz_is_4xx_never_500(
    tmp_path_factory: pytest.TempPathFactory, pos: int, byte: int, n: int
) -> None:
    """Mutate the zip metadata or .npy headers of a valid model: the validator answers 4xx (or accepts)."""
    from marketplace.errors import MarketplaceError
    from marketplace.services.catalog import _validate

    base = bytearray(model_npz(np.ones((1, D_IN)), np.zeros(1)))
    # the interesting bytes: local headers + .npy headers at the start of members, the central directory at the end
    hot = [i for i in range(len(base)) if i < 200 or i > len(base) - 400 or base[i - 4 : i] == b"NUMP"]
    for k in range(n):
        i = hot[(pos + 7919 * k) % len(hot)]
        base[i] = (base[i] + byte + k) % 256
    try:
        _validate(bytes(base), "npz", [], 64 << 20, max_decompressed=256 << 20)
    except MarketplaceError as e:
        assert 400 <= e.status < 500


def _onnx_ok() -> bytes:
    w = numpy_helper.from_array(np.ones((D_IN, 1), dtype=np.float32), "W")
    b = numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "B")
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "B"], ["z"]), helper.make_node("Sigmoid", ["z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])],
        [w, b],
    )
    return bytes(helper.make_model(g).SerializeToString())


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_mutated_onnx_is_4xx_never_500(data: st.DataObject) -> None:
    from marketplace.errors import MarketplaceError
    from marketplace.services.catalog import _validate

    b = bytearray(_onnx_ok())
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(b) - 1))
        b[i] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        _validate(bytes(b), "onnx", [], 64 << 20, max_decompressed=256 << 20)
    except MarketplaceError as e:
        assert 400 <= e.status < 500


@settings(max_examples=150, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["npz", "npy", "csv"]), kind=st.sampled_from(["predict", "evaluate"]))
def test_any_mutated_job_input_fails_as_bad_input_or_runs(data: st.DataObject, fmt: str, kind: str) -> None:
    """The compute site's parsers raise JobFailed (bad_input / too_many_rows) or compute; nothing else."""
    import tempfile

    from crypto.sealing import SealKeyPair
    from marketplace.compute.jobs import JobFailed, load_model, run_job
    from marketplace.compute.payload import JobInput

    model = load_model(model_npz(np.ones((1, D_IN)), np.zeros(1)), "npz")
    x = features(4)
    xy = np.column_stack([x, np.ones(4)]) if kind == "evaluate" else x
    base = {"npz": npz_of([("x.npy", _npy(x)), ("y.npy", _npy(np.ones(4)))]), "npy": _npy(xy), "csv": to_csv(xy)}[fmt]
    b = bytearray(base)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(b) - 1))
        b[i] = data.draw(st.integers(min_value=0, max_value=255))
    inp = JobInput(job_id="j", kind=kind, reply_public=SealKeyPair.generate().public_text(), data=bytes(b), format=fmt)
    with tempfile.TemporaryDirectory() as d:
        try:
            run_job(model, inp, expected_kind=kind, max_rows=4, workdir=Path(d))
        except JobFailed as e:
            assert e.reason in ("bad_input", "too_many_rows")


def test_mutated_npz_uploads_over_http_are_never_500(srv: Any) -> None:
    w, url = srv
    off = w.provider.create_offering(name="fuzz", task="binary-classification")
    base = model_npz(np.ones((1, D_IN)), np.zeros(1))
    rng = np.random.default_rng(5)
    for _ in range(40):
        b = bytearray(base)
        for i in rng.integers(0, len(b), size=3):
            b[int(i)] = int(rng.integers(0, 256))
        r = httpx.post(
            f"{url}/v1/offerings/{off['id']}/versions",
            params={"format": "npz"},
            content=bytes(b),
            headers=_h(w, "provider"),
            timeout=30,
        )
        assert r.status_code in (201, 413, 415, 422), r.text


def test_upload_validation_blocks_neither_the_event_loop_nor_the_database(srv: Any) -> None:
    """While a ~46 MiB model is validated and encrypted, other callers' reads and writes are served
    (before: the async route validated on the event loop inside a write transaction, and
    /v1/health stalled for seconds)."""
    import threading

    w, url = srv
    off = w.provider.create_offering(name="big", task="binary-classification")
    big = model_npz(np.random.default_rng(1).normal(size=(1, 6_000_000)), np.zeros(1))
    lat: list[float] = []
    codes: list[int] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not done.is_set():
                t = time.monotonic()
                codes.append(c.get(f"{url}/v1/health").status_code)
                codes.append(
                    c.post(
                        f"{url}/v1/offerings", json={"name": "w", "task": "t"}, headers=_h(w, "other_provider")
                    ).status_code
                )
                lat.append(time.monotonic() - t)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        r = httpx.post(
            f"{url}/v1/offerings/{off['id']}/versions",
            params={"format": "npz"},
            content=big,
            headers=_h(w, "provider"),
            timeout=120,
        )
    finally:
        done.set()
        th.join(timeout=60)
    assert r.status_code == 201, r.text[:200]
    assert len(lat) >= 3 and max(lat) < 2.0, lat
    assert set(codes) <= {200, 201}, codes


# ----------------------------------------------------------------------------- job inputs


def _job(w: Any, url: str, setup: Any, kind: str, data: bytes, fmt: str, units: int) -> dict[str, Any]:
    consumer = _client(w, url, "consumer")
    sub = consumer.submit_job(setup.offering_id, kind, data, format=fmt, units=units)
    return dict(consumer.wait_job(sub.id, timeout=60))


def test_hostile_job_inputs_fail_cleanly_before_reading(srv: Any, tmp_path: Path) -> None:
    w, url = srv
    setup = offering(w, tmp_path, hosting="marketplace")
    x = features(8)
    cases: list[tuple[str, bytes, str, int, str]] = [
        ("predict", zip_bomb("x.npy", 512), "npz", 5, "bad_input"),  # zip bomb
        ("predict", zip_bomb("x.npy", 60), "npz", 5, "bad_input"),  # under the cap: the ratio
        ("predict", _npy(np.array([{"a": 1}] * 6, dtype=object)), "npy", 5, "bad_input"),  # pickle
        ("predict", npz_of([("x.npy", _npy(x)), ("x.npy", _npy(x))]), "npz", 8, "bad_input"),  # duplicate
        ("predict", npz_of([("../x.npy", _npy(x))]), "npz", 8, "bad_input"),  # a path
        ("predict", npz_of([("x.npy", _npy(x)), ("evil.npy", _npy(x))]), "npz", 8, "bad_input"),  # unexpected
        ("predict", _npy(features(50)), "npy", 5, "too_many_rows"),
        ("predict", npz_of([("x.npy", _npy(features(50)))]), "npz", 5, "too_many_rows"),
        ("predict", to_csv(features(50)), "csv", 5, "too_many_rows"),
        ("predict", b"1" * 1000 + b"," + b",".join([b"1"] * (D_IN - 1)) + b"\n", "csv", 1, "bad_input"),  # long cell
        ("predict", (",".join(["1"] * 100_000) + "\n").encode(), "csv", 1, "bad_input"),  # too many columns
        ("evaluate", npz_of([("x.npy", _npy(x))]), "npz", 8, "bad_input"),  # no labels
    ]
    for kind, data, fmt, units, reason in cases:
        job = _bounded(lambda: _job(w, url, setup, kind, data, fmt, units), seconds=30)  # noqa: B023
        assert job["status"] == "failed" and job["error_reason"] == reason, (fmt, reason, job)
        assert "1111111111" not in (job["error"] or "")  # errors name rows/columns, not values
    ok = _job(w, url, setup, "predict", npz_of([("x.npy", _npy(x))]), "npz", 8)
    assert ok["status"] == "succeeded", ok


def test_rows_beyond_the_paid_units_are_refused_from_the_header(tmp_path: Path) -> None:
    """The header says 1000 rows, the data behind it is garbage: too_many_rows, so nothing was read."""
    from crypto.sealing import SealKeyPair
    from marketplace.compute.jobs import JobFailed, load_model, run_job
    from marketplace.compute.payload import JobInput

    model = load_model(model_npz(np.ones((1, D_IN)), np.zeros(1)), "npz")
    head = npy_header((1000, D_IN))
    junk = npz_of([("x.npy", head + os.urandom(1000 * D_IN * 8))])
    npy = head + os.urandom(1000 * D_IN * 8)
    for fmt, data in (("npz", junk), ("npy", npy)):
        inp = JobInput(
            job_id="j", kind="predict", reply_public=SealKeyPair.generate().public_text(), data=data, format=fmt
        )
        with pytest.raises(JobFailed) as e:
            run_job(model, inp, expected_kind="predict", max_rows=5, workdir=tmp_path)
        assert e.value.reason == "too_many_rows"


# ----------------------------------------------------------------------------- JSON fields


def _deep(n: int) -> dict[str, Any]:
    d: dict[str, Any] = {}
    cur = d
    for _ in range(n):
        cur["a"] = {}
        cur = cur["a"]
    return d


def test_deep_or_oversize_json_fields_are_422_and_the_catalog_stays_up(srv_db: Any) -> None:
    w, url = srv_db
    prov = _client(w, url, "provider")
    off = prov.create_offering(name="ok", task="t", hosting="provider")
    prov.publish(off["id"])
    bad: list[dict[str, Any]] = [
        {"input_schema": _deep(900)},
        {"output_schema": _deep(33)},
        {"input_schema": {"a": "x" * (70 * 1024)}},
        {"output_schema": {"a": [[[[1]]]] * 20_000}},
        {"tags": ["t" * 1000]},
        {"name": "n" * 201},
        {"model_card": "m" * 200_001},
    ]
    for fields in bad:
        r = httpx.post(
            f"{url}/v1/offerings",
            json={"name": "deep", "task": "t", "hosting": "provider", **fields},
            headers=_h(w, "provider"),
            timeout=30,
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", r.text[:300]
        r = httpx.patch(f"{url}/v1/offerings/{off['id']}", json=fields, headers=_h(w, "provider"), timeout=30)
        assert r.status_code == 422, r.text[:300]
    # signed records and the agent's HE report are bounded the same way
    r = httpx.post(f"{url}/v1/offerings/{off['id']}/offers", json=_deep(900), headers=_h(w, "provider"), timeout=30)
    assert r.status_code == 422, r.text[:300]
    r = httpx.post(
        f"{url}/v1/agent/offerings/{off['id']}/plan",
        json={"plan": {}, "report": _deep(900)},
        headers=_h(w, "provider"),
        timeout=30,
    )
    assert r.status_code == 422, r.text[:300]
    # the limits are at the edges, not below what real schemas need
    ok = httpx.patch(
        f"{url}/v1/offerings/{off['id']}",
        json={"input_schema": _deep(31), "tags": ["fraud"]},
        headers=_h(w, "provider"),
        timeout=30,
    )
    assert ok.status_code == 200, ok.text[:300]
    for who in ("consumer", "other_consumer", "provider", "admin"):
        r = httpx.get(f"{url}/v1/offerings", headers=_h(w, who), timeout=30)
        assert r.status_code == 200, (who, r.text[:300])
    assert any(
        i["id"] == off["id"] for i in httpx.get(f"{url}/v1/offerings", headers=_h(w, "consumer")).json()["items"]
    )


# ----------------------------------------------------------------------------- working directory


def test_som_serve_runs_in_an_empty_private_working_directory(tmp_path: Path) -> None:
    from tests.marketplace.test_cli_server import SOM, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env["SOM_DATA_DIR"] = "data"  # relative to where it was started
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)],
        env=env,
        cwd=tmp_path,  # noqa: S603
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.1)
        cwd = Path(os.readlink(f"/proc/{proc.pid}/cwd"))
        assert cwd != tmp_path and tmp_path not in cwd.parents and (tmp_path / "data") not in cwd.parents
        assert list(cwd.iterdir()) == [] and (cwd.stat().st_mode & 0o077) == 0
        assert (tmp_path / "data" / "som.db").exists()  # the relative data dir was resolved first
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert sys.platform.startswith("linux")
