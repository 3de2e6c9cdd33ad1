"""Scale-out deployment for real: two `som serve` replicas on one PostgreSQL database and one
shared data directory, one `som worker` (Celery over Redis), SOM_JOB_BACKEND=celery.

(a) A provider lists a marketplace-hosted model and compiles it; a consumer runs encrypted
inference and marketplace-hosted predict jobs, alternating between the replicas: results are
right, each use is charged exactly once, the ledger is one gapless order that verifies offline
(`som ledger verify`), and audit events come from both replicas.
(b) Concurrent metered requests split across both replicas against a small quota: exactly the
quota succeeds (no overspend across replicas).
Fast, without Celery: the worker's task bodies (a job runs from a message that names only blob
addresses and the wrapped key, and answers sealed bytes only the consumer opens; failures are
replies), and the API side's clean error when no worker listens.

Redis and PostgreSQL are started if they are down (the machine's documented commands); the
tests skip, with the reason, only if they truly cannot run.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from crypto.envelope import encrypt_artifact
from crypto.keyproviders import LocalFileKeyProvider
from crypto.sealing import SealKeyPair
from crypto.signing import SigningKey
from marketplace.compute import messages
from marketplace.compute import store as compute_store
from marketplace.compute.he import ComputeError, HETask
from marketplace.compute.payload import JobInput, open_result, seal_input
from marketplace.compute.store import StoreSpec
from marketplace.custody import SEAL_KEY_FILE
from marketplace.sdk import SomAPIError, SomClient
from marketplace.services.blobstore import BlobStore
from marketplace.worker import tasks
from tests.conftest import PG_ADMIN_URL, _pg_up
from tests.marketplace.test_cli_server import SOM, free_port, som
from tests.marketplace.test_he_service_support import lr_breast_cancer
from tests.marketplace.test_jobs_support import (
    expected,
    features,
    model_arrays,
    model_npz,
    terms,
    to_csv,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

REDIS_CMD = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def _redis_up() -> str | None:
    """None if Redis answers on 127.0.0.1:6379 (starting it if needed), else why not."""
    import redis

    def ping() -> bool:
        try:
            return bool(redis.Redis(host="127.0.0.1", port=6379, socket_timeout=2).ping())
        except redis.RedisError:
            return False

    if ping():
        return None
    if shutil.which("redis-server") is None:
        return "redis-server is not installed and nothing answers on 127.0.0.1:6379"
    for d in ("/var/lib/redis", "/var/log/redis"):
        os.makedirs(d, exist_ok=True)
    subprocess.run(REDIS_CMD, capture_output=True, timeout=30, check=False)  # noqa: S603 - fixed argv
    for _ in range(50):
        if ping():
            return None
        time.sleep(0.1)
    return "Redis did not start on 127.0.0.1:6379"


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"{what} did not start")
        time.sleep(0.1)


def _tagged(url: str, key: str, tag: str) -> SomClient:
    """An SDK client for one replica whose requests carry X-Request-Id ``<tag>-<random>``."""
    c = SomClient(url, key, timeout=120.0)

    def stamp(request: httpx.Request) -> None:
        request.headers["X-Request-Id"] = f"{tag}-{uuid.uuid4().hex[:12]}"

    c._http.event_hooks = {"request": [stamp], "response": []}
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Shared by the module's cluster tests (each makes its own organisations and contracts)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    reason = _redis_up()
    if reason:
        pytest.skip(reason)
    reason = _pg_up()
    if reason:
        pytest.skip(reason)
    import psycopg

    dbname = "som_scaleout_" + secrets.token_hex(6)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{dbname}"')
    db_url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + dbname
    # a DB of its own (1..14; 15 is reserved for the no-worker test below), flushed after
    redis_url = f"redis://127.0.0.1:6379/{secrets.randbelow(14) + 1}"
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update(
        {
            "SOM_DATA_DIR": str(tmp_path / "shared-data"),
            "DATABASE_URL": db_url,
            "SOM_JOB_BACKEND": "celery",
            "SOM_REDIS_URL": redis_url,
            "SOM_WORKERS": "2",
            "SOM_CHECKPOINT_INTERVAL_SECONDS": "0.5",
        }
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        admin_key = json.loads(som("--json", "admin", "bootstrap", env=env).stdout)["api_key"]
        urls = []
        for i, port in enumerate(ports):  # one after the other: each upgrades the schema on start
            p = subprocess.Popen(  # noqa: S603 - fixed argv
                [*SOM, "serve", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"replica{i}.log").open("wb"),
            )
            procs.append(p)
            urls.append(f"http://127.0.0.1:{port}")
            _wait_http(urls[-1], p, f"replica {i}")
        worker = subprocess.Popen(  # noqa: S603 - fixed argv; the worker gets no DATABASE_URL
            [*SOM, "worker", "--concurrency", "1"],
            env={k: v for k, v in env.items() if k != "DATABASE_URL"},
            stdout=subprocess.DEVNULL,
            stderr=(logs / "worker.log").open("wb"),
        )
        procs.append(worker)
        from marketplace.settings import Settings
        from marketplace.worker.celery_app import make_celery

        probe = make_celery(Settings(redis_url=redis_url))
        deadline = time.monotonic() + 60
        while not probe.control.ping(timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise AssertionError("the worker did not come up:\n" + (logs / "worker.log").read_text()[-3000:])
        probe.close()
        yield {"env": env, "urls": urls, "admin_key": admin_key, "db_url": db_url, "logs": logs}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        import redis

        redis.Redis.from_url(redis_url).flushdb()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


def _usage(db_url: str, contract_id: str) -> list[tuple[str, int]]:
    """The contract's usage rows, read straight from the shared PostgreSQL database."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from marketplace.db.models_contracts import UsageRow

    engine = create_engine(db_url)
    try:
        with Session(engine) as s:
            rows = s.scalars(select(UsageRow).where(UsageRow.contract_id == contract_id))
            return sorted((u.state, u.units) for u in rows)
    finally:
        engine.dispose()


def _lr_arrays() -> tuple[np.ndarray, np.ndarray]:
    z = np.load(io.BytesIO(lr_breast_cancer().npz))
    return z["layer0.weight"], z["layer0.bias"]


def _setup(cluster: dict[str, Any], *, quota: int = 10_000) -> dict[str, Any]:
    """Orgs and keys, a compiled marketplace-hosted LR offering and a contract, via both replicas."""
    a_url, b_url = cluster["urls"]
    admin = _tagged(a_url, cluster["admin_key"], "a")
    keys = {}
    for name, role in (("provider", "provider"), ("consumer", "consumer")):
        org = admin.create_org(f"{name}-org-{secrets.token_hex(3)}")
        keys[name] = admin.create_key(org["id"], [role], name=name)["key"]
    prov_a, prov_b = _tagged(a_url, keys["provider"], "a"), _tagged(b_url, keys["provider"], "b")
    cons_a, cons_b = _tagged(a_url, keys["consumer"], "a"), _tagged(b_url, keys["consumer"], "b")
    d = lr_breast_cancer()
    off = prov_b.create_offering(name="breast-cancer-lr", task="binary-classification", hosting="marketplace")
    prov_a.upload_version(off["id"], d.npz, format="npz", input_shape=[30])
    prov_b.compile_version(off["id"], 1, d.x_train)
    prov_a.publish(off["id"])
    offer = prov_b.publish_offer(off["id"], terms(quota=quota), signing_key=SigningKey.generate())
    contract = cons_a.accept_offer(offer["id"], signing_key=SigningKey.generate())
    return {
        "offering": off["id"],
        "contract": str(contract["id"]),
        "cons": (cons_a, cons_b),
        "admin": (admin, _tagged(b_url, cluster["admin_key"], "b")),
        "keys": keys,
    }


@pytest.mark.slow
def test_two_replicas_one_worker_charge_once_one_ledger(cluster: dict[str, Any], tmp_path: Path) -> None:
    st = _setup(cluster)
    off, cid = st["offering"], st["contract"]
    cons_a, cons_b = st["cons"]
    d = lr_breast_cancer()
    w, b = _lr_arrays()
    key_dir = tmp_path / "consumer-keys"
    # encrypted inference, alternating replicas; the Celery worker evaluates
    for i, c in enumerate((cons_a, cons_b)):
        x = d.x_test[i * 8 : (i + 1) * 8]
        proba = c.infer_encrypted(off, x, contract_id=cid, key_dir=key_dir)
        np.testing.assert_allclose(proba[:, 0], d.plain_proba[i * 8 : (i + 1) * 8], atol=0.01)
        assert c.last_receipt is not None and c.last_usage_id
    # marketplace-hosted predict jobs: submitted on one replica, watched and fetched on the other
    for i, (c, other) in enumerate(((cons_a, cons_b), (cons_b, cons_a))):
        x = d.x_test[40 + i * 10 : 50 + i * 10]
        sub = c.submit_job(off, "predict", to_csv(x))
        job = other.wait_job(sub.id, timeout=90)
        assert job["status"] == "succeeded" and job["charged"], job
        res = other.job_result(sub.id, sub.reply_key)
        got = np.array([[float(v) for v in ln.split(",")] for ln in res.body.decode().splitlines() if ln])
        np.testing.assert_allclose(got, 1.0 / (1.0 + np.exp(-(x @ w.T + b))), rtol=1e-9)
    # a job the worker refuses (more rows than units) fails there and is released, not charged
    sub = cons_a.submit_job(off, "predict", to_csv(d.x_test[:10]), units=3)
    job = cons_b.wait_job(sub.id, timeout=90)
    assert job["status"] == "failed" and job["error_reason"] == "too_many_rows" and not job["charged"], job
    # each use charged exactly once, whatever replica took it
    want = [("charged", 8), ("charged", 8), ("charged", 10), ("charged", 10), ("released", 3)]
    deadline = time.monotonic() + 10
    while _usage(cluster["db_url"], cid) != want and time.monotonic() < deadline:
        time.sleep(0.1)  # the release follows the failure
    assert _usage(cluster["db_url"], cid) == want
    # audit events from both replicas, in the one shared log
    admin_a, admin_b = st["admin"]
    events = admin_b.paginate("/v1/audit", limit=200)
    tags = {e["request_id"].split("-", 1)[0] for e in events if e["request_id"][:2] in ("a-", "b-")}
    assert tags == {"a", "b"}
    created = {e["request_id"][:2] for e in events if e["action"] == "job.create"}
    assert created == {"a-", "b-"}
    assert sum(1 for e in events if e["action"] == "artifact.decrypt") >= 4
    # the ledger: one gapless order, verified offline from an export
    env = {**cluster["env"], "SOM_URL": cluster["urls"][1], "SOM_API_KEY": cluster["admin_key"]}
    som("--json", "ledger", "checkpoint", "--sign", env=env)
    export = tmp_path / "export"
    som("--json", "ledger", "export", str(export), env={**env, "SOM_URL": cluster["urls"][0]})
    indexes = [json.loads(ln)["index"] for ln in (export / "leaves.jsonl").read_text().splitlines() if ln.strip()]
    assert indexes == list(range(len(indexes))) and len(indexes) > 4
    vkey = json.loads(som("--json", "ledger", "key", env=env).stdout)["vkey"]  # pinned at setup
    summary = json.loads(som("--json", "ledger", "verify", str(export), "--vkey", vkey, env=env).stdout)
    totals = summary["compliance"]["contracts"][cid]
    assert totals["charged_units"] == 36 and totals["usage_records"] == 5 and totals["released_records"] == 1


@pytest.mark.slow
def test_concurrent_requests_across_replicas_never_overspend(cluster: dict[str, Any], tmp_path: Path) -> None:
    quota, n = 4, 10
    st = _setup(cluster, quota=quota)
    off, cid = st["offering"], st["contract"]
    key = st["keys"]["consumer"]
    d = lr_breast_cancer()
    prepared = []
    for i, url in enumerate(cluster["urls"]):
        c = SomClient(url, key, timeout=120.0)
        sk = c.he_keys(off, key_dir=tmp_path / "keys")
        ks = c.upload_keyset(sk.public_keyset_bytes(), contract_id=cid)
        for j in range(n // 2):
            prepared.append((url, ks["id"], sk, sk.encrypt(d.x_test[i * n + j : i * n + j + 1])))
    outcomes: list[Any] = [None] * len(prepared)
    go = threading.Barrier(len(prepared))

    def run(k: int) -> None:
        url, ks_id, sk, req = prepared[k]
        c = SomClient(url, key, timeout=120.0)
        go.wait()
        try:
            outcomes[k] = sk.decrypt(c.infer_raw(off, req, keyset_id=ks_id, contract_id=cid))
        except SomAPIError as e:
            outcomes[k] = e

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(prepared))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    ok = [o for o in outcomes if isinstance(o, np.ndarray)]
    denied = [o for o in outcomes if isinstance(o, SomAPIError)]
    assert len(ok) == quota, outcomes
    assert len(denied) == n - quota and all(e.status == 403 for e in denied), [
        (e.status, e.code, e.message) for e in denied
    ]
    assert _usage(cluster["db_url"], cid) == [("charged", 1)] * quota


# ------------------------------------------------------------------ the worker side, fast


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A data directory as the API replicas leave it: KEK, job sealing key, an encrypted model."""
    root = tmp_path / "data"
    keys = tmp_path / "keys"  # the key directory, outside the data directory
    keys.mkdir(mode=0o700)
    root.mkdir()
    provider = LocalFileKeyProvider.create(keys / "kek.json")
    seal = SealKeyPair.generate()
    (keys / SEAL_KEY_FILE).write_bytes(seal.unsafe_private_bytes())
    w, b = model_arrays()
    aad = "som:ver_test:model"
    ct, wrapped = encrypt_artifact(model_npz(w, b), provider=provider, aad=aad.encode())
    blobs = BlobStore(root / "blobs")
    return {
        "root": root,
        "keys": keys,
        "seal": seal,
        "blobs": blobs,
        "w": w,
        "b": b,
        "aad": aad,
        "model_blob": blobs.put(ct),
        "wrapped": wrapped.to_json().encode(),
    }


def _msg(site: dict[str, Any], job_id: str, sealed: bytes, **kw: Any) -> dict[str, Any]:
    msg = {
        "job_id": job_id,
        "input_blob": site["blobs"].put(sealed),
        "model_blob": site["model_blob"],
        "wrapped_key": messages.b64e(site["wrapped"]),
        "aad": site["aad"],
        "format": "npz",
        "kind": "predict",
        "limits": {"cpu_seconds": 10, "memory_mb": 512, "wall_seconds": 10.0},
        "approved_digest": None,
        "max_rows": 20,
        "max_sealed_bytes": 1 << 20,
    }
    msg.update(kw)
    return msg


def _signed(site: dict[str, Any], task: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Signed as an API replica sharing the data directory signs it."""
    return messages.sign_message(messages.task_key(site["keys"], create=True), task, msg)


def test_job_task_predicts_sealed_to_the_reply_key(site: dict[str, Any]) -> None:
    reply = SealKeyPair.generate()
    x = features(12)
    sealed = seal_input(site["seal"].public_text(), JobInput("job_1", "predict", reply.public_text(), to_csv(x)))
    msg = _signed(site, "som.run_job", _msg(site, "job_1", sealed))
    # the message names the encrypted model and the sealed input; it carries neither the weights nor the rows
    wire = json.dumps(msg)
    assert messages.b64e(model_npz(site["w"], site["b"]))[:64] not in wire and to_csv(x)[:32].decode() not in wire
    out = tasks.run_marketplace_job(StoreSpec(str(site["root"]), "local", key_dir=str(site["keys"])), msg)
    assert out["ok"] is True
    res = open_result(reply, "job_1", messages.b64d(out["out"]))
    got = np.array([[float(v) for v in ln.split(",")] for ln in res.body.decode().splitlines() if ln])
    np.testing.assert_allclose(got, expected(site["w"], site["b"], x), rtol=1e-9)
    with pytest.raises(Exception):  # noqa: B017 - opaque DecryptionError: only the reply key opens it
        open_result(site["seal"], "job_1", messages.b64d(out["out"]))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("other_key", "bad_input"),  # sealed to someone else: does not open
        ("other_job", "bad_input"),  # sealed for another job id
        ("rows", "too_many_rows"),
        ("aad", "error"),  # the wrapped key does not unwrap under another AAD
        ("no_seal_key", "error"),
        ("malformed", "error"),
        # only an API replica holding the data directory's task key can ask for a computation
        ("unsigned", "error"),
        ("tampered", "error"),  # signed, then changed on the way (here: allow more rows)
        ("foreign_mac", "error"),  # signed with another deployment's key
        ("other_task", "error"),  # an HE task's signature does not authorize a job
    ],
)
def test_job_task_failures_are_replies(site: dict[str, Any], change: str, reason: str) -> None:
    reply = SealKeyPair.generate()
    to = SealKeyPair.generate().public_text() if change == "other_key" else site["seal"].public_text()
    sealed = seal_input(
        to,
        JobInput(
            "job_other" if change == "other_job" else "job_2", "predict", reply.public_text(), to_csv(features(5))
        ),
    )
    msg = _msg(site, "job_2", sealed, **({"max_rows": 3} if change == "rows" else {}))
    if change == "aad":
        msg["aad"] = "som:ver_other:model"
    if change == "no_seal_key":
        (site["keys"] / SEAL_KEY_FILE).unlink()
        compute_store._seal_keys.clear()
    if change == "malformed":
        del msg["input_blob"]
    if change == "foreign_mac":
        msg = messages.sign_message(b"k" * 32, "som.run_job", msg)
    elif change != "unsigned":
        msg = _signed(site, "som.he_evaluate" if change == "other_task" else "som.run_job", msg)
    if change == "tampered":
        msg["max_rows"] = 10_000
    out = tasks.run_marketplace_job(StoreSpec(str(site["root"]), "local", key_dir=str(site["keys"])), msg)
    compute_store._seal_keys.clear()
    assert out["ok"] is False and out["reason"] == reason, out
    assert "out" not in out
    refused = change in ("unsigned", "tampered", "foreign_mac", "other_task")
    assert ("refused" in out["message"]) == refused, out


def test_he_task_malformed_message_is_an_internal_reply(site: dict[str, Any]) -> None:
    store = StoreSpec(str(site["root"]), "local", key_dir=str(site["keys"]))
    unsigned = tasks.he_evaluate(store, {})
    assert unsigned["kind"] == "internal" and "refused" in unsigned["message"]
    bad = {
        "version_id": "v",
        "model_blob": site["model_blob"],
        "wrapped_key": "!!not base64!!",
        "aad": "a",
        "keyset_id": "k",
        "keyset_blob": "sha256:" + "0" * 64,
        "plan_json": "{}",
        "request": "",
    }
    out = tasks.he_evaluate(store, _signed(site, "som.he_evaluate", bad))
    assert out["ok"] is False and out["kind"] == "internal" and "malformed" in out["message"]


def test_worker_store_never_puts_a_kek_in_a_message(tmp_path: Path) -> None:
    from marketplace.settings import Settings

    spec = tasks.worker_store(
        Settings(data_dir=tmp_path / "data", key_dir=tmp_path / "keys", key_provider="env", kek="a" * 44)
    )
    assert spec.kek == "a" * 44 and "a" * 44 not in repr(spec)  # the worker's own env, not Redis


def test_celery_pool_without_a_worker_is_internal(tmp_path: Path) -> None:
    """No worker listening on the queue: a clean ComputeError (the HE route's 503), fast."""
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("Redis is not running on 127.0.0.1:6379 (tests/marketplace/test_scaleout.py starts it)")
    from marketplace.compute.remote import CeleryExecutor
    from marketplace.settings import Settings

    # DB 15: no cluster fixture uses it, so no worker listens there (the cluster keeps its worker alive
    # for the whole module)
    pool = CeleryExecutor(
        Settings(data_dir=tmp_path / "data", key_dir=tmp_path / "keys", redis_url="redis://127.0.0.1:6379/15"),
        key_dir=tmp_path / "keys",
    )
    task = HETask(
        store=StoreSpec(str(tmp_path), "local"),
        version_id="v",
        model_blob="m",
        wrapped_key=b"{}",
        aad="a",
        keyset_id="k",
        keyset_blob="b",
        plan_json="{}",
        request=b"x",
    )
    try:
        with pytest.raises(ComputeError) as e:
            pool.run_he(task, timeout=5)
        assert e.value.kind == "internal" and "som worker" in e.value.message
    finally:
        pool.shutdown()
