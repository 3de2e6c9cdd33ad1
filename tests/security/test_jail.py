"""Issue 10 §1: consumer code runs in a jail, never as the service.

Against a real server (uvicorn on loopback, SQLite, the real job worker) and a real ``som agent``
subprocess: an approved ``custom`` job tries to read the data directory and keys, the parent's
environment, reach the API over TCP, write outside its output folder, exceed the output cap,
fork past the PID limit, leave a daemon behind, and import the service to write into its DB.
Every attempt fails. Without the jail custom jobs are refused with 503, unless the operator's
unsafe switch is on.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from marketplace.compute.payload import code_digest
from marketplace.sdk import SomAPIError, SomClient
from tests.conftest import build_world, make_settings, serve_in_thread
from tests.marketplace.test_jobs_support import features, offering, to_csv

CANARY = "som-jail-canary-" + secrets.token_hex(8)

# What an approved job tries from inside. {paths}, {port}, {pid}, {marker}, {src} are filled in.
ATTACK = r"""
import json, os, socket, sys, time
report = {}

def attempt(name, fn):
    try:
        report[name] = ["SUCCEEDED", repr(fn())[:200]]
    except BaseException as e:
        report[name] = ["failed", type(e).__name__ + ": " + str(e)[:200]]

for i, p in enumerate(PATHS):
    attempt("read:" + p, lambda p=p: open(p, "rb").read(64))
    attempt("list:" + os.path.dirname(p), lambda p=p: os.listdir(os.path.dirname(p)))
attempt("environ:parent", lambda: open("/proc/%d/environ" % PARENT, "rb").read())
attempt("environ:canary", lambda: [k for k, v in os.environ.items() if CANARY in v] or (_ for _ in ()).throw(LookupError("absent")))
def scan_procs():
    seen = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if CANARY.encode() in open("/proc/%s/environ" % d, "rb").read():
                    seen.append(d)
            except OSError:
                pass
    if not seen:
        raise LookupError("no process environment holds the canary")
    return seen
attempt("environ:any-proc", scan_procs)
attempt("tcp:api", lambda: socket.create_connection(("127.0.0.1", PORT), timeout=2))
attempt("tcp:postgres", lambda: socket.create_connection(("127.0.0.1", 5432), timeout=2))
for p in ["/job/" + MARKER, "/job/inputs/" + MARKER, "/" + MARKER, "/usr/" + MARKER,
          sys.prefix + "/" + MARKER, os.path.dirname(os.__file__) + "/" + MARKER, DATA + "/" + MARKER]:
    attempt("write:" + p, lambda p=p: open(p, "w").write("x"))
def import_service():
    sys.path[:0] = [SRC, SRC + "/marketplace"]
    import marketplace
    return marketplace.__file__
attempt("import:marketplace", import_service)
def touch_db():
    import sqlite3
    c = sqlite3.connect("file:" + DATA + "/som.db?mode=rw", uri=True)
    return c.execute("UPDATE api_keys SET roles = 'admin'").rowcount
attempt("db:sqlite", touch_db)

children = []
def fork_bomb():
    for _ in range(400):
        pid = os.fork()
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        children.append(pid)
    return len(children)
attempt("fork:400", fork_bomb)
report["forked"] = len(children)
for c in children:
    os.kill(c, 9)
for c in children:
    os.waitpid(c, 0)

# a daemon that outlives the job: double fork, new session, a unique argv to find it by
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", SLEEP])
    os._exit(0)
time.sleep(0.3)
report["uid"] = [os.getuid(), os.getgid()]
open("outputs/report.json", "w").write(json.dumps(report))
print("attack done")
"""


def attack_code(*, paths: list[str], port: int, parent: int, data: str, sleep: str) -> str:
    head = (
        f"PATHS = {paths!r}\nPORT = {port}\nPARENT = {parent}\nCANARY = {CANARY!r}\n"
        f"MARKER = 'jail-escape-{secrets.token_hex(4)}'\nDATA = {data!r}\nSRC = {str(Path(__file__).parents[2])!r}\n"
        f"SLEEP = {sleep!r}\n"
    )
    return head + ATTACK


def secret_files(data_dir: Path, key_dir: Path) -> list[str]:
    """Every file of the data directory and the key directory: the KEK keyring, the ledger
    signing key, the workers' sealing key, the database, blobs."""
    every = [p for d in (key_dir, data_dir) for p in d.rglob("*") if p.is_file()]
    files = sorted(every, key=lambda p: ("blobs" in p.parts, str(p)))
    names = {p.name for p in files}
    assert {"som.db", "kek.json", "log.key", "job_seal.key"} <= names, names
    return [str(p) for p in files[:40]]


def procs_with(marker: str) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{d}/cmdline").read_bytes():
                    found.append(int(d))
            except OSError:
                pass
    return [p for p in found if p != os.getpid()]


def job_cgroups() -> list[str]:
    from marketplace.compute.jail_cgroup import _own_cgroup

    out = []
    for c in ("memory", "pids", "freezer"):
        base = Path("/sys/fs/cgroup") / c / _own_cgroup(c).lstrip("/")
        out += [str(p) for p in base.glob(f"som-job-{os.getpid()}-*")]
    return out


def run_custom(
    cons: Any, prov: Any, offering_id: str, code: str, *, timeout: float = 120, **kw: Any
) -> tuple[dict[str, Any], Any]:
    from marketplace.sdk.jobs_api import SealKeyRefused

    end = time.monotonic() + 30
    while True:
        try:
            sub = cons.submit_job(offering_id, "custom", to_csv(features(5)), code=code, **kw)
            break
        except SealKeyRefused:  # an agent is online a moment before it has vouched for its key
            if time.monotonic() > end:
                raise
            time.sleep(0.3)
    assert sub.job["status"] == "awaiting_approval"
    prov.approve_job(sub.id, code_digest(code))
    job = cons.wait_job(sub.id, timeout=timeout)
    res = cons.job_result(sub.id, sub.reply_key) if job["status"] == "succeeded" else None
    return job, res


def report_of(res: Any) -> dict[str, Any]:
    with zipfile.ZipFile(io.BytesIO(res.body)) as z:
        out: dict[str, Any] = json.loads(z.read("report.json"))
    return out


# ---------------------------------------------------------------- the marketplace's own worker


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """A real server on loopback hosting an offering; one approved attack job already ran."""
    from marketplace.api.app import create_app

    tmp = tmp_path_factory.mktemp("jail")
    os.environ["SOM_JAIL_CANARY"] = CANARY  # the service's environment holds a secret
    app = create_app(make_settings(tmp, f"sqlite:///{tmp / 'data' / 'som.db'}", workers=1))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            live = SimpleNamespace(
                provider=SomClient(url, w.keys["provider"]), consumer=SomClient(url, w.keys["consumer"])
            )
            st = offering(live, tmp, hosting="marketplace")
            data_dir = Path(app.state.runtime.data_dir).resolve()
            # the worker's sealing key exists once a job was created; run a harmless job first
            job, res = run_custom(live.consumer, live.provider, st.offering_id, "print('warm-up')\n")
            assert job["status"] == "succeeded", job
            sleep = f"3600.{secrets.randbelow(10**9)}"
            code = attack_code(
                paths=secret_files(data_dir, Path(app.state.runtime.key_dir).resolve()),
                port=int(url.rsplit(":", 1)[1]),
                parent=os.getpid(),
                data=str(data_dir),
                sleep=sleep,
            )
            job, res = run_custom(live.consumer, live.provider, st.offering_id, code)
            assert job["status"] == "succeeded", job
            yield SimpleNamespace(
                app=app,
                url=url,
                live=live,
                offering=st.offering_id,
                data_dir=data_dir,
                report=report_of(res),
                result=res,
                sleep=sleep,
                tmp=tmp,
            )
    finally:
        os.environ.pop("SOM_JAIL_CANARY", None)
        app.state.runtime.close()


def _failed(report: dict[str, Any], prefix: str) -> None:
    hits = {k: v for k, v in report.items() if k.startswith(prefix)}
    assert hits, f"no attempt named {prefix}*"
    worked = {k: v for k, v in hits.items() if v[0] != "failed"}
    assert not worked, worked


def test_job_runs_as_nobody(hosted: SimpleNamespace) -> None:
    assert hosted.report["uid"] == [65534, 65534]
    assert "attack done" in hosted.result.stdout


def test_job_cannot_read_the_data_directory_or_keys(hosted: SimpleNamespace) -> None:
    names = [k for k in hosted.report if k.startswith("read:")]
    assert any(n.endswith("som.db") for n in names) and any("kek" in n for n in names)
    assert any(n.endswith("job_seal.key") for n in names) and any(n.endswith("log.key") for n in names), names
    _failed(hosted.report, "read:")
    _failed(hosted.report, "list:")


def test_job_cannot_read_the_parent_environment(hosted: SimpleNamespace) -> None:
    _failed(hosted.report, "environ:")


def test_job_cannot_open_a_tcp_connection_to_the_api(hosted: SimpleNamespace) -> None:
    _failed(hosted.report, "tcp:")
    httpx.get(hosted.url + "/v1/health", timeout=5).raise_for_status()  # the API was up all along


def test_job_cannot_write_outside_its_output_folder(hosted: SimpleNamespace) -> None:
    _failed(hosted.report, "write:")
    marker = [k for k in hosted.report if k.startswith("write:/job/")][0].rsplit("/", 1)[1]
    leaked = [p for root in (hosted.tmp, Path("/tmp")) for p in root.rglob(marker)]
    assert leaked == []


def test_job_cannot_import_the_service_or_touch_the_db(hosted: SimpleNamespace) -> None:
    _failed(hosted.report, "import:")
    _failed(hosted.report, "db:")


def test_job_cannot_fork_past_the_pid_limit(hosted: SimpleNamespace) -> None:
    assert hosted.report["fork:400"][0] == "failed"
    assert "BlockingIOError" in hosted.report["fork:400"][1] or "Resource temporarily" in hosted.report["fork:400"][1]
    assert 0 < hosted.report["forked"] < 64


def test_no_process_of_the_job_survives_it(hosted: SimpleNamespace) -> None:
    assert procs_with(hosted.sleep) == []  # the daemonized sleeper is gone
    assert job_cgroups() == []  # and so is the job's cgroup


def test_job_cannot_exceed_the_output_cap(hosted: SimpleNamespace) -> None:
    code = textwrap.dedent("""
        for i in range(20):
            with open(f"outputs/chunk{i}", "wb") as f:
                f.write(b"x" * (8 << 20))
    """)
    job, _ = run_custom(hosted.live.consumer, hosted.live.provider, hosted.offering, code)
    assert job["status"] == "failed", job
    assert "exceed" in job["error"] or "file size limit" in job["error"], job["error"]
    assert job_cgroups() == []


def test_health_reports_the_jail(hosted: SimpleNamespace) -> None:
    assert httpx.get(hosted.url + "/v1/health", timeout=30).json()["jail"] == "ok"


# ---------------------------------------------------------------- jail unavailable


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SimpleNamespace]:
    from marketplace.api.app import create_app

    app = create_app(make_settings(tmp_path, f"sqlite:///{tmp_path / 'som.db'}", workers=1, **request.param))
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            live = SimpleNamespace(
                provider=SomClient(url, w.keys["provider"]), consumer=SomClient(url, w.keys["consumer"])
            )
            st = offering(live, tmp_path, hosting="marketplace")
            yield SimpleNamespace(app=app, url=url, live=live, offering=st.offering_id)
    finally:
        app.state.runtime.close()


@pytest.mark.parametrize("server", [{"jail_bwrap": "/nonexistent/bwrap"}], indirect=True)
def test_without_the_jail_custom_jobs_are_refused_with_503(server: SimpleNamespace) -> None:
    with pytest.raises(SomAPIError) as e:
        server.live.consumer.submit_job(server.offering, "custom", to_csv(features(5)), code="print(1)\n")
    assert e.value.status == 503 and e.value.code == "unavailable"
    assert "jail" in e.value.message and "SOM_UNSAFE_UNJAILED_CUSTOM_JOBS" in e.value.message
    assert httpx.get(server.url + "/v1/health", timeout=10).json()["jail"] == "unavailable"
    # predict jobs are not affected
    sub = server.live.consumer.submit_job(server.offering, "predict", to_csv(features(5)))
    assert server.live.consumer.wait_job(sub.id, timeout=60)["status"] == "succeeded"


@pytest.mark.parametrize("server", [{}], indirect=True)
def test_approval_is_refused_with_503_once_the_jail_is_gone(server: SimpleNamespace) -> None:
    code = "print(1)\n"
    sub = server.live.consumer.submit_job(server.offering, "custom", to_csv(features(5)), code=code)
    server.app.state.runtime.settings.jail_bwrap = "/nonexistent/bwrap-after-submission"
    with pytest.raises(SomAPIError) as e:
        server.live.provider.approve_job(sub.id, code_digest(code))
    assert e.value.status == 503 and "jail" in e.value.message
    assert server.live.consumer.job(sub.id)["status"] == "awaiting_approval"


@pytest.mark.parametrize(
    "server", [{"jail_bwrap": "/nonexistent/bwrap", "unsafe_unjailed_custom_jobs": True}], indirect=True
)
def test_unsafe_setting_runs_custom_jobs_unjailed_with_a_warning(
    server: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    code = "import os\nopen('outputs/uid', 'w').write(str(os.getuid()))\n"
    with caplog.at_level("WARNING", logger="som.jail"):
        job, res = run_custom(server.live.consumer, server.live.provider, server.offering, code)
    assert job["status"] == "succeeded", job
    with zipfile.ZipFile(io.BytesIO(res.body)) as z:
        assert z.read("uid") == str(os.getuid()).encode()  # not the jail's 65534: really unjailed
    assert any("WITHOUT a jail" in r.getMessage() for r in caplog.records)
    assert httpx.get(server.url + "/v1/health", timeout=10).json()["jail"] == "unsafe_unjailed"


# ---------------------------------------------------------------- a real `som agent`


def test_som_agent_jails_custom_jobs_and_forgets_its_key(tmp_path: Path) -> None:
    from crypto.signing import SigningKey
    from marketplace.api.app import create_app
    from tests.marketplace.test_cli_server import SOM
    from tests.marketplace.test_jobs_support import model_arrays, model_npz, terms, write_signing_key

    app = create_app(
        make_settings(
            tmp_path, f"sqlite:///{tmp_path / 'som.db'}", workers=1, agent_lease_seconds=5.0, agent_offline_seconds=10.0
        )
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        w = build_world(app)
        with serve_in_thread(app) as url:
            prov, cons = SomClient(url, w.keys["provider"]), SomClient(url, w.keys["consumer"])
            off = prov.create_offering(name="risk-agent", task="binary-classification", hosting="provider")
            prov.publish(off["id"])
            p_key = SigningKey.generate()
            offer = prov.publish_offer(off["id"], terms(), signing_key=p_key)
            cons.accept_offer(offer["id"], signing_key=SigningKey.generate())
            machine = tmp_path / "provider-machine"
            machine.mkdir()
            key_file = write_signing_key(machine / "provider.key", p_key)
            wgt, bias = model_arrays()
            (machine / "model.npz").write_bytes(model_npz(wgt, bias))
            agent_key = prov.create_agent_key([off["id"]])["key"]
            env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_")}
            env.update(
                {
                    "SOM_URL": url,
                    "SOM_API_KEY": agent_key,
                    "SOM_JAIL_CANARY": CANARY,
                    "XDG_CONFIG_HOME": str(tmp_path / "config"),
                }
            )
            agent = subprocess.Popen(  # noqa: S603 - fixed argv
                [
                    *SOM,
                    "agent",
                    "--offering",
                    off["id"],
                    "--model",
                    str(machine / "model.npz"),
                    "--lease-wait",
                    "2",
                    "--workdir",
                    str(machine / "work"),
                    "--signing-key",
                    str(key_file),
                    "--seal-key",
                    str(machine / "seal.key"),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + 60
            while not cons.get_offering(off["id"])["agent_online"]:
                assert time.monotonic() < deadline and agent.poll() is None, "agent did not come online"
                time.sleep(0.2)
            # the agent dropped its API key from its environment (and from /proc/<pid>/environ)
            environ = Path(f"/proc/{agent.pid}/environ").read_bytes()
            assert agent_key.encode() not in environ and CANARY.encode() in environ
            sleep = f"3600.{secrets.randbelow(10**9)}"
            paths = [str(machine / "seal.key"), str(key_file), str(machine / "model.npz")]
            code = attack_code(
                paths=paths, port=int(url.rsplit(":", 1)[1]), parent=agent.pid, data=str(machine), sleep=sleep
            )
            job, res = run_custom(cons, prov, off["id"], code, timeout=180)
            assert job["status"] == "succeeded", job
            report = report_of(res)
            for prefix in ("read:", "list:", "environ:", "tcp:", "write:", "import:", "db:"):
                _failed(report, prefix)
            assert report["uid"] == [65534, 65534] and 0 < report["forked"] < 64
            assert procs_with(sleep) == []
            with zipfile.ZipFile(io.BytesIO(res.body)) as z:
                assert z.namelist() == ["report.json"]
    finally:
        if agent is not None and agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        app.state.runtime.close()


def test_som_agent_without_the_jail_does_not_take_custom_jobs(tmp_path: Path) -> None:
    from marketplace.agent.runner import AgentConfig, ProviderAgent
    from marketplace.compute.jail import JailConfig
    from tests.marketplace.test_jobs_support import model_arrays, model_npz

    wgt, bias = model_arrays()
    (tmp_path / "model.npz").write_bytes(model_npz(wgt, bias))
    cfg = AgentConfig(
        url="http://127.0.0.1:9",
        api_key="unused",
        model_path=tmp_path / "model.npz",
        seal_key_path=tmp_path / "seal.key",
        jail=JailConfig(bwrap="/nonexistent/bwrap"),
    )
    agent = ProviderAgent(cfg)
    assert agent.jail_problem is not None and "bubblewrap not found" in agent.jail_problem
