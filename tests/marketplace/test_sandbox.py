"""The job sandbox (jailed by default): outputs, each limit with its reason, cleanup, empty environment."""

from __future__ import annotations

import json
import os
import resource
import textwrap
from pathlib import Path

import pytest

from marketplace.compute.sandbox import run_isolated

LIMITS = {"cpu_seconds": 5, "memory_mb": 512, "wall_seconds": 20}


def run(code: str, workdir: Path, **kw):
    args = {**LIMITS, **kw}
    inputs = args.pop("inputs", {})
    return run_isolated(textwrap.dedent(code), inputs=inputs, workdir=workdir, **args)


def _live_members(pgid: int) -> list[int]:
    """Processes in process group ``pgid`` that are not zombies."""
    live = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat_line.rsplit(")", 1)[1].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            live.append(int(entry))
    return live


def test_success_reads_inputs_and_returns_outputs(tmp_path):
    r = run(
        """
        import pathlib
        data = pathlib.Path("inputs/table.csv").read_bytes()
        pathlib.Path("outputs/reversed.bin").write_bytes(data[::-1])
        pathlib.Path("outputs/count.txt").write_text(str(len(data)))
        print("rows", data.count(b"\\n"))
        """,
        tmp_path,
        inputs={"table.csv": b"a,b\n1,2\n3,4\n"},
    )
    assert r.ok and r.reason == "ok" and r.exit_code == 0, r
    assert r.outputs == {"reversed.bin": b"a,b\n1,2\n3,4\n"[::-1], "count.txt": b"12"}
    assert r.stdout == "rows 3\n"
    # the scratch folder and the logs are gone
    assert list(tmp_path.iterdir()) == []


def test_each_run_gets_a_fresh_scratch_folder(tmp_path):
    first = run("open('outputs/x', 'w').write('1'); open('/tmp/leftover', 'w').write('1')", tmp_path)
    assert first.ok
    second = run("import os; print(sorted(os.listdir('/tmp')), sorted(os.listdir('outputs')))", tmp_path)
    assert second.ok
    assert "leftover" not in second.stdout and "'x'" not in second.stdout
    # the job folder itself is read-only in the jail
    third = run("open('leftover', 'w').write('1')", tmp_path)
    assert not third.ok and "Read-only file system" in third.stderr


def test_cpu_burner_hits_cpu_limit(tmp_path):
    r = run("while True:\n    pass\n", tmp_path, cpu_seconds=1, wall_seconds=15)
    assert r.reason == "cpu_limit", r
    assert not r.ok
    assert "CPU time limit" in r.message
    assert r.cpu_seconds >= 0.8 and r.wall_seconds < 10  # the jail counts the cgroup's CPU time (not ticks)


def test_cpu_burner_that_ignores_sigxcpu_still_stopped(tmp_path):
    r = run(
        """
        import signal
        signal.signal(signal.SIGXCPU, signal.SIG_IGN)
        while True:
            pass
        """,
        tmp_path,
        cpu_seconds=1,
        wall_seconds=15,
    )
    assert r.reason == "cpu_limit", r


def test_memory_hog_hits_memory_limit(tmp_path):
    r = run(
        """
        chunks = []
        while True:
            chunks.append(bytearray(16 * 1024 * 1024))
        """,
        tmp_path,
        memory_mb=200,
    )
    assert r.reason == "memory_limit", r
    assert "memory limit of 200 MiB" in r.message
    assert "MemoryError" in r.stderr


def test_sleeper_hits_timeout_and_its_process_group_is_gone(tmp_path):
    r = run(
        """
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "60"])
        print(child.pid, flush=True)
        time.sleep(60)
        """,
        tmp_path,
        wall_seconds=1.5,
    )
    assert r.reason == "timeout", r
    assert "wall-clock limit" in r.message
    assert 1.4 <= r.wall_seconds < 10
    grandchild = int(r.stdout.split()[0])
    assert _live_members(r.pid) == []
    assert grandchild not in _live_members(r.pid)
    with pytest.raises(ProcessLookupError):
        os.kill(r.pid, 0)  # the sandboxed interpreter itself was reaped


def test_background_stragglers_are_killed_after_a_normal_exit(tmp_path):
    r = run(
        """
        import subprocess
        print(subprocess.Popen(["sleep", "60"]).pid)
        """,
        tmp_path,
    )
    assert r.ok, r
    assert _live_members(r.pid) == []


def test_parent_secrets_are_not_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOM_TEST_SECRET_TOKEN", "hunter2-parent-secret")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/injected")
    r = run(
        """
        import json, os, sys
        environ_file = open("/proc/self/environ", "rb").read().decode()
        print(json.dumps({"env": dict(os.environ), "raw": environ_file, "path": sys.path,
                          "isolated": sys.flags.isolated, "no_user_site": sys.flags.no_user_site,
                          "stdin": sys.stdin.read() if sys.stdin else None}))
        """,
        tmp_path,
    )
    assert r.ok, r
    assert "hunter2-parent-secret" not in r.stdout
    seen = json.loads(r.stdout)
    assert "SOM_TEST_SECRET_TOKEN" not in seen["env"]
    assert set(seen["env"]) <= {
        "PATH",
        "PYTHONNOUSERSITE",
        "HOME",
        "TMPDIR",
        "LANG",
        "LC_ALL",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "LC_CTYPE",
    }
    assert seen["env"]["PYTHONNOUSERSITE"] == "1"
    assert "/nonexistent/injected" not in seen["path"]
    assert seen["isolated"] == 1 and seen["no_user_site"] == 1
    assert seen["stdin"] in ("", None)


def test_limits_are_set_inside(tmp_path):
    r = run(
        """
        import resource
        names = ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE"]
        print([resource.getrlimit(getattr(resource, n))[0] for n in names])
        """,
        tmp_path,
        cpu_seconds=3,
        memory_mb=300,
        max_files=32,
        max_output_bytes=1_000_000,
    )
    assert r.ok, r
    assert r.stdout.strip() == str([3, 300 * 1024 * 1024, 32, 1_000_000, 0])
    # and the parent's own limits were not touched
    assert resource.getrlimit(resource.RLIMIT_CPU)[0] != 3


def test_crash_returns_error_with_stderr(tmp_path):
    r = run("def f():\n    raise RuntimeError('boom from consumer code')\nf()\n", tmp_path)
    assert r.reason == "error" and not r.ok
    assert r.exit_code == 1
    assert "RuntimeError: boom from consumer code" in r.stderr
    assert "exited with code 1" in r.message


def test_signal_death_is_an_error(tmp_path):
    r = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n", tmp_path)
    assert r.reason == "error" and r.exit_code == -11
    assert "SIGSEGV" in r.message


def test_oversized_file_hits_file_size_limit(tmp_path):
    r = run("open('outputs/big', 'wb').write(b'x' * 2_000_000)\n", tmp_path, max_output_bytes=1_000_000)
    assert r.reason == "error" and "file size limit" in r.message, r


def test_logs_are_truncated(tmp_path):
    r = run(
        "import sys\nprint('A' * 200_000)\nsys.stderr.write('B' * 200_000 + 'END')\n",
        tmp_path,
        max_log_bytes=1000,
    )
    assert r.ok
    assert r.stdout.startswith("A" * 1000) and "bytes cut" in r.stdout and len(r.stdout) < 1100
    assert r.stderr.endswith("END") and "bytes cut" in r.stderr and len(r.stderr) < 1100


def test_symlinked_outputs_are_not_followed(tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("host file the job must not exfiltrate")
    r = run(
        f"""
        import os
        os.symlink({str(secret)!r}, "outputs/stolen.txt")
        open("outputs/fine.txt", "w").write("ok")
        os.mkdir("outputs/subdir")
        """,
        tmp_path / "work",
    )
    assert r.ok, r
    assert r.outputs == {"fine.txt": b"ok"}
    assert set(r.ignored_outputs) == {"stolen.txt", "subdir"}

    r2 = run(
        f"""
        import os, shutil
        shutil.rmtree("outputs")
        os.symlink({str(tmp_path)!r}, "outputs")
        """,
        tmp_path / "work",
    )
    assert r2.outputs == {}


def test_bad_arguments(tmp_path):
    for name in ("../escape", ".hidden", "a/b", ""):
        with pytest.raises(ValueError, match="input names"):
            run("pass", tmp_path, inputs={name: b"x"})
    with pytest.raises(TypeError):
        run("pass", tmp_path, inputs={"a": "text"})
    with pytest.raises(ValueError, match="cpu_seconds"):
        run("pass", tmp_path, cpu_seconds=0)
    with pytest.raises(ValueError, match="wall_seconds"):
        run("pass", tmp_path, wall_seconds=-1)
    assert list(tmp_path.iterdir()) == []


def test_outputs_over_the_cap_fill_the_jails_output_folder(tmp_path):
    r = run(
        "for i in range(4):\n    open(f'outputs/part{i}', 'wb').write(b'x' * 400_000)\n",
        tmp_path,
        max_output_bytes=1_000_000,
    )
    assert r.reason == "error" and "outputs exceed the limit of 1000000 bytes" in r.message, r
    assert "No space left on device" in r.stderr


def test_unjailed_run_only_when_asked(tmp_path):
    """``jail=None`` is the old plain child (for SOM_UNSAFE_UNJAILED_CUSTOM_JOBS only): it runs as
    this process's user and sees the host, which is why it is not the default."""
    r = run(
        "import os\nopen('outputs/uid', 'w').write(str(os.getuid()))\nprint(os.path.exists('/work'))\n",
        tmp_path,
        jail=None,
    )
    assert r.ok, r
    assert r.outputs == {"uid": str(os.getuid()).encode()}
    jailed = run("import os\nopen('outputs/uid', 'w').write(str(os.getuid()))\n", tmp_path)
    assert jailed.outputs == {"uid": b"65534"}


def test_require_refuses_a_missing_jail_unless_unsafe(caplog):
    from marketplace.compute.jail import JailConfig, JailUnavailable, require

    with pytest.raises(JailUnavailable, match="SOM_UNSAFE_UNJAILED_CUSTOM_JOBS"):
        require(JailConfig(bwrap="/nonexistent/bwrap"))
    with caplog.at_level("WARNING", logger="som.jail"):
        assert require(JailConfig(bwrap="/nonexistent/bwrap", unsafe_unjailed=True)) is None
    assert "WITHOUT a jail" in caplog.text
    assert require(JailConfig()) == JailConfig()


def test_processes_together_over_the_memory_limit_hit_the_cgroup(tmp_path):
    """Each child stays under RLIMIT_AS; together they exceed the job's cgroup, whose OOM killer
    stops them (the job's memory is bounded as a whole, not per process)."""
    r = run(
        """
        import os, sys
        kids = []
        for _ in range(8):
            pid = os.fork()
            if pid == 0:
                block = bytearray(60 * 1024 * 1024)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                import time; time.sleep(5)
                os._exit(0)
            kids.append(pid)
        killed = [os.waitpid(k, 0)[1] & 0x7F for k in kids]
        sys.exit(3 if 9 in killed else 0)
        """,
        tmp_path,
        memory_mb=100,
    )
    assert r.reason == "memory_limit" and "cgroup" in r.message, r
