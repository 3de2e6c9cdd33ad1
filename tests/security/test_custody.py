"""Key custody and file/HTTP hygiene (issue 10 §5), each attack against a real server.

* A thief with a copy of the data directory (DB, WAL, blobs, logs) after uploads, jobs and HE
  inference tries every key-shaped thing in that copy on every encrypted model and sealed job
  input: nothing opens (the KEK and the job sealing key live in the key directory, elsewhere).
* ``SOM_UNSAFE_KEYS_IN_DATA_DIR`` keeps the old layout and says so at every start.
* An old data directory with keys inside is refused with the move to make.
* The DB, its WAL and SHM files and the log are 0600 after a run of ``som serve``.
* ``/docs`` and ``/redoc`` send the UI's security headers and load nothing from another origin.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urljoin, urlparse

import httpx
import pytest

from tests.conftest import build_world, make_settings, serve_in_thread

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SOM = [sys.executable, "-m", "marketplace.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update(kw)
    return env


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"som serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("som serve did not come up")


# ------------------------------------------------------------------ the thief with a backup


@pytest.fixture
def busy_server(tmp_path: Path) -> Iterator[Any]:
    """A real server (uvicorn on loopback, SQLite in the data directory) that has stored an
    encrypted model, a compiled HE model, answered HE inference, run a predict job and holds a
    custom job's sealed input awaiting approval."""
    from marketplace.api.app import create_app
    from marketplace.sdk import SomClient
    from tests.marketplace.test_he_service_support import lr_breast_cancer, lr_offering
    from tests.marketplace.test_jobs_support import features, offering, terms, to_csv

    db = f"sqlite:///{tmp_path / 'data' / 'som.db'}"
    app = create_app(make_settings(tmp_path, db, workers=1))
    rt = app.state.runtime
    try:
        world = build_world(app)
        with serve_in_thread(app) as url:
            net = SimpleNamespace(
                provider=SomClient(url, world.keys["provider"]),
                consumer=SomClient(url, world.keys["consumer"]),
                orgs=world.orgs,
                rt=rt,
            )
            st = offering(net, tmp_path, hosting="marketplace")  # an .npz model, a remote-job contract
            sub = net.consumer.submit_job(st.offering_id, "predict", to_csv(features(5)), contract_id=st.contract_id)
            assert net.consumer.wait_job(sub.id, timeout=60)["status"] == "succeeded"
            code = "open('outputs/n.txt', 'w').write('1')\n"
            pending = net.consumer.submit_job(
                st.offering_id, "custom", to_csv(features(3, seed=11)), code=code, contract_id=st.contract_id
            )
            assert pending.job["status"] == "awaiting_approval"
            he_off = lr_offering(net)
            from crypto.signing import SigningKey

            offer = net.provider.publish_offer(he_off, terms(), signing_key=SigningKey.generate())
            he_cid = str(net.consumer.accept_offer(offer["id"], signing_key=SigningKey.generate())["id"])
            x = lr_breast_cancer().x_test[:4]
            out = net.consumer.infer_encrypted(he_off, x, contract_id=he_cid, key_dir=tmp_path / "consumer-keys")
            assert out.shape == (4, 1)
            yield SimpleNamespace(rt=rt, url=url, pending=pending, weights=(st.weight, st.bias))
    finally:
        rt.close()


def _candidate_texts(raw: bytes) -> list[bytes]:
    """Byte strings a thief would try as a key: the raw bytes, each line/token, their base64 and
    hex decodings, JSON string values (a keyring's "key" fields)."""
    out = {raw, raw.strip()}
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        doc = None
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            out.add(v.encode())
    for tok in re.split(rb"[\s,;:+\"'=]+", raw[: 1 << 20]):
        if 32 <= len(tok) <= 100:
            out.add(tok)
    decoded = set()
    for t in out:
        for dec in (lambda b: base64.b64decode(b + b"=" * (-len(b) % 4)), binascii.unhexlify):
            try:
                decoded.add(dec(t))
            except (binascii.Error, ValueError):
                pass
    return [c for c in out | decoded if c]


def _thief_keys(copy: Path) -> tuple[list[Any], list[Any]]:
    """Every KEK provider and sealing key a thief can build from the files of ``copy`` and the
    values of its database."""
    from crypto.errors import KeyMaterialError
    from crypto.keyproviders import EnvKeyProvider, LocalFileKeyProvider
    from crypto.sealing import SealKeyPair

    raws: list[bytes] = []
    providers: list[Any] = []
    for f in sorted(p for p in copy.rglob("*") if p.is_file() and not p.is_symlink()):
        if f.stat().st_size <= 1 << 20:
            raws.append(f.read_bytes())
        try:  # the file itself as a keyring (the old kek.json)
            probe = copy.parent / "probe-keyring.json"
            shutil.copyfile(f, probe)
            probe.chmod(0o600)
            providers.append(LocalFileKeyProvider(probe, create_if_missing=False))
        except KeyMaterialError:
            pass
    for db in copy.rglob("*.db"):
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for t in tables:
                for row in con.execute(f'SELECT * FROM "{t}"'):  # noqa: S608 - names from the DB itself
                    for v in row:
                        if isinstance(v, bytes):
                            raws.append(v)
                        elif isinstance(v, str):
                            raws.append(v.encode())
        finally:
            con.close()
    seals: dict[bytes, Any] = {}
    keks: dict[bytes, Any] = {}
    for raw in raws:
        for c in _candidate_texts(raw):
            if len(c) == 32 and c not in seals:
                seals[c] = SealKeyPair.from_private_bytes(c)
                keks[c] = EnvKeyProvider(environ={"SOM_KEK": base64.b64encode(c).decode()})
    providers.extend(keks.values())
    return providers, list(seals.values())


def _targets(copy: Path) -> tuple[list[tuple[str, bytes, str]], list[tuple[str, str]]]:
    """(blob, wrapped key JSON, aad) of every artifact and (job id, input blob) of every job."""
    con = sqlite3.connect(f"file:{copy / 'som.db'}?mode=ro", uri=True)
    try:
        arts = [(str(b), bytes(w), str(a)) for b, w, a in con.execute("SELECT blob, wrapped_key, aad FROM artifacts")]
        jobs = [(str(i), str(b)) for i, b in con.execute("SELECT id, input_blob FROM jobs WHERE input_blob != ''")]
    finally:
        con.close()
    return arts, jobs


def test_thief_with_a_copy_of_the_data_dir_decrypts_nothing(busy_server: Any, tmp_path: Path) -> None:
    from crypto.envelope import WrappedKey, decrypt_artifact
    from crypto.errors import DecryptionError, KeyMaterialError
    from crypto.keyproviders import LocalFileKeyProvider
    from crypto.sealing import SealKeyPair
    from marketplace.compute.payload import open_input
    from marketplace.services.blobstore import BlobStore

    rt = busy_server.rt
    rt.engine.dispose()  # the WAL is checkpointed into the DB file (the WAL file is copied too)
    assert rt.data_dir not in rt.key_dir.parents and rt.key_dir != rt.data_dir
    copy = tmp_path / "stolen" / "data"
    shutil.copytree(rt.data_dir, copy, symlinks=True)

    arts, jobs = _targets(copy)
    assert len(arts) >= 3, arts  # the npz model, the HE model and its compiled form
    assert any(j == busy_server.pending.id for j, _ in jobs)
    blobs = BlobStore(copy / "blobs", fsync=False)
    sealed = [(j, blobs.get(b)) for j, b in jobs if blobs.exists(b)]
    assert any(j == busy_server.pending.id for j, _ in sealed), "the pending job's sealed input is in the copy"

    # the owner, with the key directory, opens all of it (so the targets are real)
    owner = LocalFileKeyProvider(rt.key_dir / "kek.json", create_if_missing=False)
    for blob, wrapped, aad in arts:
        decrypt_artifact(blobs.get(blob), WrappedKey.from_json(wrapped.decode()), provider=owner, aad=aad.encode())
    seal = SealKeyPair.from_private_bytes((rt.key_dir / "job_seal.key").read_bytes())
    pending_blob = dict(sealed)[busy_server.pending.id]
    assert open_input(seal, busy_server.pending.id, pending_blob, max_size=1 << 26).job_id == busy_server.pending.id

    # the thief has the copy only
    names = {p.name for p in copy.rglob("*")}
    assert not names & {"kek.json", "job_seal.key", "task_mac.key", "log.key"}, names
    providers, seal_keys = _thief_keys(copy)
    assert seal_keys and providers  # the thief did find key-shaped material to try
    for blob, wrapped, aad in arts:
        ct, wk = blobs.get(blob), WrappedKey.from_json(wrapped.decode())
        for prov in providers:
            with pytest.raises((DecryptionError, KeyMaterialError)):
                decrypt_artifact(ct, wk, provider=prov, aad=aad.encode())
    for job_id, data in sealed:
        for kp in seal_keys:
            with pytest.raises((DecryptionError, ValueError)):
                open_input(kp, job_id, data, max_size=1 << 26)

    # and starting the service on the copy (the thief's own host) is refused, not given fresh keys
    r = subprocess.run(
        [*SOM, "serve", "--data-dir", str(copy), "--port", str(_free_port())],
        env=_env(XDG_CONFIG_HOME=str(tmp_path / "thief-config")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "key directory" in r.stderr and "does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "thief-config" / "som").exists() or not any((tmp_path / "thief-config").rglob("kek.json"))


# ------------------------------------------------------------------ settings and migration


def test_unsafe_keys_in_data_dir_is_warned_at_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    env = _env(SOM_DATA_DIR=str(data), SOM_UNSAFE_KEYS_IN_DATA_DIR="1")
    boot = subprocess.run([*SOM, "--json", "admin", "bootstrap"], env=env, capture_output=True, text=True, timeout=120)
    assert boot.returncode == 0, boot.stderr
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_up(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "WARNING" in err.decode() and "SOM_UNSAFE_KEYS_IN_DATA_DIR" in err.decode()
    log = (data / "logs" / "som.log").read_text()
    assert re.search(r"WARNING som\.custody SOM_UNSAFE_KEYS_IN_DATA_DIR is set", log), log
    assert (data / "keys").is_dir()  # the development layout, as asked


def test_default_key_dir_is_outside_and_printed(tmp_path: Path, _key_root: Path) -> None:
    data = tmp_path / "data"
    port = _free_port()
    env = _env(SOM_DATA_DIR=str(data))
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        _wait_up(f"http://127.0.0.1:{port}", proc)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    iid = (data / "instance-id").read_text().strip()
    key_dir = _key_root / iid
    assert f"keys in {key_dir}" in err.decode(), err.decode()
    assert stat.S_IMODE(key_dir.stat().st_mode) == 0o700
    assert not (data / "keys").exists()
    assert "SOM_UNSAFE" not in (data / "logs" / "som.log").read_text()


def test_old_data_dir_with_keys_inside_is_refused_with_the_move(tmp_path: Path) -> None:
    from crypto.keyproviders import LocalFileKeyProvider

    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True, mode=0o700)
    LocalFileKeyProvider.create(data / "keys" / "kek.json")
    r = subprocess.run(
        [*SOM, "serve", "--data-dir", str(data), "--port", str(_free_port())],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    msg = " ".join(r.stderr.split())
    assert "still holds secret keys" in msg and "mv " in msg and "kek.json" in msg, msg
    inside = subprocess.run(
        [*SOM, "serve", "--data-dir", str(tmp_path / "d2"), "--port", str(_free_port())],
        env=_env(SOM_KEY_DIR=str(tmp_path / "d2" / "k")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert inside.returncode == 2 and "inside the data directory" in " ".join(inside.stderr.split())


# ------------------------------------------------------------------ file modes


def test_db_wal_shm_and_log_files_are_0600(tmp_path: Path) -> None:
    from marketplace.sdk import SomClient

    data = tmp_path / "data"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = _env(SOM_DATA_DIR=str(data), SOM_KEY_DIR=str(tmp_path / "keys"))
    boot = subprocess.run([*SOM, "--json", "admin", "bootstrap"], env=env, capture_output=True, text=True, timeout=120)
    assert boot.returncode == 0, boot.stderr
    admin_key = json.loads(boot.stdout)["api_key"]
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_up(url, proc)
        admin = SomClient(url, admin_key)
        org = admin.create_org("modes-org")
        admin.create_key(org["id"], ["provider"], name="p")
        files = {
            p.name: p for p in [data / "som.db", data / "som.db-wal", data / "som.db-shm", data / "logs" / "som.log"]
        }
        for name, p in files.items():  # while the server runs (WAL and SHM exist now)
            assert p.exists(), name
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, (name, oct(p.stat().st_mode))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for p in [q for q in data.rglob("*") if q.is_file()]:  # and everything else it left
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))
    for p in [q for q in (tmp_path / "keys").rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, (p, oct(p.stat().st_mode))


# ------------------------------------------------------------------ /docs and /redoc


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k in ("src", "href", "spec-url") and v:
                self.refs.append(v)


def test_docs_pages_have_security_headers_and_only_local_assets(live: Any) -> None:
    from marketplace.api.routes_web import SECURITY_HEADERS

    _, url = live
    origin = urlparse(url)
    for page in ("/docs", "/redoc"):
        r = httpx.get(url + page, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        for h in ("X-Content-Type-Options", "X-Frame-Options", "Referrer-Policy", "Cross-Origin-Opener-Policy"):
            assert r.headers[h] == SECURITY_HEADERS[h], (page, h)
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["Content-Security-Policy"].split("; ")}
        assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
        assert all(s == "'self'" or s.startswith("'sha256-") for s in csp["script-src"]), csp["script-src"]
        assert csp["connect-src"] == ["'self'"]
        parser = _Refs()
        parser.feed(r.text)
        assert parser.refs, page
        scripts = 0
        for ref in parser.refs:
            full = urlparse(urljoin(url + page, ref))
            assert (full.scheme, full.netloc) == (origin.scheme, origin.netloc), (page, ref)
            got = httpx.get(full.geturl(), timeout=30)
            assert got.status_code == 200, (page, ref, got.status_code)
            scripts += ref.endswith(".js")
        assert scripts >= 1
        assert "cdn.jsdelivr.net" not in r.text and "fonts.googleapis" not in r.text
    asset = httpx.get(url + "/docs/assets/swagger-ui-bundle.js", timeout=30)
    assert asset.headers["X-Content-Type-Options"] == "nosniff"
    missing = httpx.get(url + "/docs/assets/nope.js", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_docs_pages_render_in_a_browser_under_their_csp(live: Any, tmp_path: Path) -> None:
    """Headless Chromium renders both pages from the local assets, and the CSP blocks no script
    or style they need (only ReDoc's 'powered by' logo from its CDN is blocked, as it should be)."""
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.skip(f"{chromium} is missing: run `make browser` (apt-get install chromium) as root")
    _, url = live
    for page, rendered in (("/docs", "opblock-tag"), ("/redoc", "api-info")):
        r = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}",
                "--virtual-time-budget=10000",
                "--enable-logging=stderr",
                "--v=0",
                "--dump-dom",
                url + page,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rendered in r.stdout, (page, r.stderr[-2000:])
        violations = [line for line in r.stderr.splitlines() if "Content Security Policy" in line]
        assert all("cdn.redoc.ly" in v for v in violations), (page, violations)
