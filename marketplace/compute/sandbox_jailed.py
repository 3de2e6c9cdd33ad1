"""The jailed run of a ``custom`` job: bubblewrap in per-job cgroups, outputs read through a handle.

For: :func:`run_jailed`, called by :func:`marketplace.compute.sandbox.run_isolated` after it
checked its arguments: stage the job folder, make the job's cgroup (:mod:`marketplace.compute.jail_cgroup`),
start bubblewrap with the child set-up of :mod:`marketplace.compute.jail_build`, hold the jail's
``/job/outputs`` tmpfs open, wait for the wall clock, freeze and kill the cgroup, collect.
Not for: deciding whether to jail (:mod:`marketplace.compute.jail`).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from marketplace.compute.jail_build import JailConfig, bwrap_argv, layout, preexec
from marketplace.compute.jail_cgroup import Cgroup, job_name
from marketplace.compute.sandbox_child import (
    MIB,
    POLL_SECONDS,
    SandboxResult,
    child_env,
    classify,
    collect_outputs,
    read_log,
    result_of,
    rmtree,
)

__all__ = ["run_jailed"]


def _jail_env() -> dict[str, str]:
    env = child_env(Path("/tmp"))  # noqa: S108 - the jail's private /tmp
    env["TMPDIR"] = "/tmp"  # noqa: S108
    env["PATH"] = "/usr/bin:/bin"
    return env


def _read_info(fd: int, deadline: float) -> dict[str, object] | None:
    """bubblewrap's ``--info-fd`` JSON (written once the namespaces exist), or None on EOF."""
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
        with contextlib.suppress(ValueError):
            info = json.loads(buf)
            if isinstance(info, dict):
                return info
    return None


def _open_outputs(child_pid: int, output_bytes: int, deadline: float) -> int:
    """A handle on the jail's ``/job/outputs`` tmpfs (it stays readable after the jail's mount
    namespace is gone). Waits until the tmpfs is mounted there: its own device, and its size."""
    root = f"/proc/{child_pid}/root"
    while True:
        with contextlib.suppress(OSError):
            fd = os.open(f"{root}/job/outputs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            st, vfs = os.fstat(fd), os.fstatvfs(fd)
            parent = os.stat(f"{root}/job")
            if st.st_dev != parent.st_dev and abs(vfs.f_blocks * vfs.f_frsize - output_bytes) < 2 * 65536:
                return fd
            os.close(fd)
        if time.monotonic() >= deadline:
            raise OSError("the jail's output folder did not appear")
        time.sleep(0.001)


def run_jailed(
    code: str,
    *,
    inputs: Mapping[str, bytes],
    workdir: Path,
    cpu_seconds: int,
    memory_mb: int,
    wall_seconds: float,
    python: str,
    max_files: int,
    max_output_bytes: int,
    max_log_bytes: int,
    cfg: JailConfig,
) -> SandboxResult:
    lay = layout(python, cfg.packages)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))  # 0700: no host user reaches in
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=workdir))
    cg: Cgroup | None = None
    out_fd = -1
    fds: list[int] = []
    try:
        (scratch / "inputs").mkdir(mode=0o755)
        os.chmod(scratch / "inputs", 0o755)  # noqa: S103 - readable by the jail's uid (through the bind only)
        for name, data in inputs.items():
            (scratch / "inputs" / name).write_bytes(data)
            os.chmod(scratch / "inputs" / name, 0o644)
        (scratch / "main.py").write_text(code, encoding="utf-8")
        os.chmod(scratch / "main.py", 0o644)
        output_bytes = -(-max_output_bytes // 4096) * 4096
        cg = Cgroup(cfg.cgroup_root, job_name())
        cg.limit(memory_bytes=memory_mb * MIB + output_bytes + cfg.tmp_bytes + 64 * MIB, pids=cfg.max_pids)
        job_binds = ((str(scratch / "main.py"), "/job/main.py"), (str(scratch / "inputs"), "/job/inputs"))
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        fds += [info_r, info_w, block_r, block_w]
        argv = bwrap_argv(
            cfg,
            lay,
            job_binds=job_binds,
            env=_jail_env(),
            output_bytes=output_bytes,
            block_fd=block_r,
            info_fd=info_w,
            argv=[lay.python, "-I", "-B", "main.py"],
        )
        rlimits = [
            (resource.RLIMIT_CPU, cpu_seconds),
            (resource.RLIMIT_AS, memory_mb * MIB),
            (resource.RLIMIT_NOFILE, max_files),
            (resource.RLIMIT_FSIZE, max_output_bytes),
            (resource.RLIMIT_CORE, 0),
        ]
        out_path, err_path = logs / "stdout", logs / "stderr"
        start = time.monotonic()
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, untrusted code only in main.py
                argv,
                cwd="/",
                env={},
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                close_fds=True,
                pass_fds=(info_w, block_r),
                start_new_session=True,
                preexec_fn=preexec(  # noqa: PLW1509
                    binds=lay.binds + job_binds, procs_files=cg.procs_files(), rlimits=rlimits
                ),
            )
        pid = proc.pid
        for f in (info_w, block_r):
            os.close(f)
            fds.remove(f)
        deadline = start + wall_seconds
        info = _read_info(info_r, deadline)
        child = info.get("child-pid") if info is not None else None
        if isinstance(child, int):
            with contextlib.suppress(OSError):
                out_fd = _open_outputs(child, output_bytes, deadline)
        if out_fd >= 0:
            os.write(block_w, b"x")  # let the job start
        os.close(block_w)
        fds.remove(block_w)
        timed_out = False
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(POLL_SECONDS)
        cg.kill_all()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        proc.returncode = exit_code
        if 128 < exit_code <= 128 + 64:  # bubblewrap reports a signal death as 128 + signal
            exit_code = -(exit_code - 128)
        wall = time.monotonic() - start
        cg_cpu = cg.cpu_seconds()
        cpu = max(cg_cpu or 0.0, usage.ru_utime + usage.ru_stime)  # the cgroup counts stragglers too
        stdout = read_log(out_path, max_log_bytes, tail=False)
        stderr = read_log(err_path, max_log_bytes, tail=True)
        if out_fd >= 0:
            outputs, ignored, too_big = collect_outputs(-1, max_output_bytes, outputs_fd=out_fd)
        else:
            outputs, ignored, too_big = {}, ["outputs/ (the jail did not start)"], False
        reason, message = classify(
            timed_out=timed_out,
            code=exit_code,
            cpu=cpu,
            stderr=stderr,
            cpu_seconds=cpu_seconds,
            memory_mb=memory_mb,
            wall_seconds=wall_seconds,
            oom=cg.oom_killed(),
            max_output_bytes=max_output_bytes,
        )
        if out_fd < 0 and reason == "ok":  # pragma: no cover - bubblewrap failed before the job
            reason, message = "error", "the jail could not be set up"
        return result_of(
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            outputs=outputs,
            ignored=ignored,
            too_big=too_big,
            reason=reason,
            message=message,
            pid=pid,
            cpu=cpu,
            wall=wall,
            max_output_bytes=max_output_bytes,
        )
    finally:
        for f in fds:
            with contextlib.suppress(OSError):
                os.close(f)
        if out_fd >= 0:
            os.close(out_fd)
        if cg is not None:
            cg.kill_all()
            cg.remove()
        rmtree(logs)
        rmtree(scratch)
