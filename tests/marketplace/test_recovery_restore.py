"""Issue 17 item 8: a restored backup must not fork the log.

A real `som serve` is driven with traffic, its SQLite database is backed up online (the sqlite3
backup API) mid-way, more checkpoints are signed, the server is SIGKILLed and the backup is
restored into a new data directory: the server refuses to start (exit code != 0) with what to do,
and no size is ever signed with two roots. The same refusal at signing time on SQLite and
PostgreSQL (a rolled-back or forked database under a running runtime).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, update

from tests.conftest import make_settings
from tests.marketplace.test_cli_server import SOM, free_port, som


def _start(env: dict[str, str], port: int) -> tuple[subprocess.Popen[str], bool]:
    """Start `som serve`; (process, True) once healthy or (process, False) if it exited."""
    proc = subprocess.Popen(
        [*SOM, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,  # noqa: S603
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc, False
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc, True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("som serve neither started nor exited")


def _traffic(url: str, admin: str, n: int) -> None:
    h = {"Authorization": f"Bearer {admin}"}
    for i in range(n):
        r = httpx.post(f"{url}/v1/orgs", json={"name": f"org-{time.monotonic_ns()}-{i}"}, headers=h, timeout=30)
        assert r.status_code == 201, r.text


def _sign(url: str, admin: str) -> dict[str, object]:
    r = httpx.post(f"{url}/v1/ledger/checkpoints", headers={"Authorization": f"Bearer {admin}"}, timeout=30)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def _checkpoints(url: str, admin: str) -> dict[int, str]:
    h = {"Authorization": f"Bearer {admin}"}
    out: dict[int, str] = {}
    offset: int | None = 0
    while offset is not None:
        page = httpx.get(
            f"{url}/v1/ledger/checkpoints", params={"limit": 200, "offset": offset}, headers=h, timeout=30
        ).json()
        for cp in page["items"]:
            out[int(cp["size"])] = str(cp["root_hash"])
        offset = page.get("next_offset")
    return out


def test_restored_backup_refuses_to_start_and_never_signs_a_second_history(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOM_") and k != "DATABASE_URL"}
    env.update({"SOM_DATA_DIR": str(data), "SOM_CHECKPOINT_EVERY": "5", "SOM_CHECKPOINT_INTERVAL_SECONDS": "0.2"})
    url = f"http://127.0.0.1:{port}"
    admin = json.loads(som("--json", "admin", "bootstrap", env=env).stdout)["api_key"]
    signed: dict[int, str] = {}  # every (size -> root) this log ever signed, as seen from outside

    proc, up = _start(env, port)
    assert up, proc.stdout.read() if proc.stdout else ""
    try:
        _traffic(url, admin, 10)
        _sign(url, admin)
        backup = tmp_path / "backup.db"
        with sqlite3.connect(data / "som.db") as src, sqlite3.connect(backup) as dst:
            src.backup(dst)  # the online backup API, while the server runs
        with sqlite3.connect(backup) as b:
            backed_up = int(b.execute("SELECT size FROM ledger_state").fetchone()[0])
        _traffic(url, admin, 15)  # more checkpoints after the backup
        top = _sign(url, admin)
        signed.update(_checkpoints(url, admin))
        assert int(top["size"]) > backed_up
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash, not a clean stop
        proc.wait(timeout=20)

    # Restore the backup into a new data directory (same instance id: it finds its key directory).
    new = tmp_path / "restored"
    new.mkdir(mode=0o700)
    shutil.copy2(data / "instance-id", new / "instance-id")
    if (data / "blobs").exists():
        shutil.copytree(data / "blobs", new / "blobs")
    shutil.copy2(backup, new / "som.db")
    env2 = {**env, "SOM_DATA_DIR": str(new)}
    port2 = free_port()
    url2 = f"http://127.0.0.1:{port2}"
    proc2, up2 = _start(env2, port2)
    try:
        if up2:  # today's main: it starts, and new traffic makes it sign a second history
            _traffic(url2, admin, 30)
            _sign(url2, admin)
            again = _checkpoints(url2, admin)
            forks = {n: (signed[n], r) for n, r in again.items() if n in signed and signed[n] != r}
            raise AssertionError(f"the restored server started (forks at sizes {sorted(forks)})")
        out = proc2.stdout.read() if proc2.stdout else ""
    finally:
        if proc2.poll() is None:
            proc2.kill()
        proc2.wait(timeout=20)
    assert proc2.returncode != 0
    assert f"fewer than the {top['size']}" in out or "does not contain" in out, out
    assert "Restore a later backup" in out and "SOM_LOG_ORIGIN" in out, out

    # Knowingly starting a new log origin works, and the old origin is never signed again.
    env3 = {**env2, "SOM_LOG_ORIGIN": "som.example/ledger/2"}
    proc3, up3 = _start(env3, port2)
    try:
        assert up3, proc3.stdout.read() if proc3.stdout else ""
        _traffic(url2, admin, 3)
        note = str(_sign(url2, admin)["note"])
        assert note.startswith("som.example/ledger/2\n")
        notes = httpx.get(
            f"{url2}/v1/ledger/checkpoints",
            params={"limit": 200},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).json()["items"]
        for cp in notes:
            if cp["note"].startswith("som.example/ledger\n") and int(cp["size"]) in signed:
                assert signed[int(cp["size"])] == cp["root_hash"]  # only the backup's own history
    finally:
        proc3.terminate()
        proc3.wait(timeout=20)


def _rt_with_leaves(tmp_path: Path, db_url: str, n: int):  # type: ignore[no-untyped-def]
    from marketplace.runtime import Runtime
    from marketplace.services import audit, ledger  # noqa: F401 - ledger: the leaf sink is audit.emit itself

    rt = Runtime(make_settings(tmp_path, db_url))
    for i in range(n):
        with rt.tx() as s:
            audit.emit(s, audit.Actor.system(), "test.event", target=f"t{i}")
    return rt


def test_rolled_back_or_forked_database_is_refused_at_signing_and_at_start(tmp_path: Path, db_url: str) -> None:
    from marketplace.db.models_ledger import LedgerCheckpoint, LedgerLeaf, LedgerNode, LedgerState
    from marketplace.services import audit, ledger  # noqa: F401 - ledger: the leaf sink is audit.emit itself
    from marketplace.settings import SettingsError

    rt = _rt_with_leaves(tmp_path, db_url, 20)
    try:
        early = ledger.sign_checkpoint(rt)
        with rt.tx() as s:
            state = s.get(LedgerState, 1)
            assert state is not None
            saved = (state.size, state.frontier, state.signed_size)
        for i in range(20):
            with rt.tx() as s:
                audit.emit(s, audit.Actor.system(), "test.event", target=f"u{i}")
        late = ledger.sign_checkpoint(rt)
        assert late.size > early.size
        # Roll the database back to the early state (what restoring an early backup does).
        with rt.tx() as s:
            s.execute(delete(LedgerLeaf).where(LedgerLeaf.idx >= early.size))
            s.execute(
                delete(LedgerNode)
                .where(LedgerNode.id >= 0)
                .where(LedgerNode.id.not_in([n for n in _nodes_within(early.size)]))
            )
            s.execute(delete(LedgerCheckpoint).where(LedgerCheckpoint.size > early.size))
            s.execute(
                update(LedgerState)
                .where(LedgerState.id == 1)
                .values(size=saved[0], frontier=saved[1], signed_size=saved[2])
            )
        with pytest.raises(ledger.LedgerIntegrityError, match=f"fewer than the {late.size}"):
            ledger.sign_checkpoint(rt)
        from marketplace.api.app import create_app

        with pytest.raises(SettingsError, match="Restore a later backup"):
            create_app(runtime=rt)
        # A different history grown past the kept size is refused too (a fork, not a lag).
        for i in range(30):
            with rt.tx() as s:
                audit.emit(s, audit.Actor.system(), "test.other", target=f"v{i}")
        with pytest.raises(ledger.LedgerIntegrityError, match="does not contain"):
            ledger.sign_checkpoint(rt)
        with rt.tx() as s:
            sizes = [int(c.size) for c in s.query(LedgerCheckpoint)]
        assert max(sizes) == early.size  # nothing was signed over the other history
        kept = (rt.key_dir / "x").parent.glob("log-*.checkpoint")
        body = next(iter(kept)).read_text().split("\n")
        assert (int(body[1]), base64.b64decode(body[2])) == (late.size, late.root_hash)
    finally:
        rt.close()


def _nodes_within(size: int) -> list[int]:
    """Ids of the stored nodes (level >= 4) whose leaves all lie below ``size``."""
    from marketplace.db.models_ledger import NODE_LEVEL_SHIFT, NODE_MIN_LEVEL

    out = []
    level = NODE_MIN_LEVEL
    while (1 << level) <= size:
        for index in range(size >> level):
            out.append((level << NODE_LEVEL_SHIFT) | index)
        level += 1
    return out
