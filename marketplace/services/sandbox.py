"""Run untrusted consumer code (``custom`` jobs, after provider approval) in a jailed child process.

For: running one approved ``custom`` job's code where it can reach nothing but its own inputs
and outputs (the jail of :mod:`marketplace.services.jail`: bubblewrap namespaces, an unprivileged
uid, a read-only minimal root, no network, per-job cgroups), bounding what it consumes (CPU
time, memory, processes, open files, file and output sizes, wall-clock time), and collecting
its output files. Not for: running code nobody approved, or deciding whether the jail may be
skipped (:func:`marketplace.services.jail.require` does; ``jail=None`` here runs the old
unjailed child, only for the operator's explicit ``SOM_UNSAFE_UNJAILED_CUSTOM_JOBS``).

Contract with the consumer's code: it runs as ``main.py`` with its job folder as the working
directory, reads its inputs from ``inputs/<name>``, writes results to ``outputs/<name>``
(regular files at the top level; anything else is ignored). In the jail the job folder is
``/job``; only ``outputs/`` (a tmpfs capped at ``max_output_bytes``) and a private ``/tmp``
are writable.

Mechanics: a fresh scratch folder per run (0700, removed afterwards), ``python -I -B``, an
empty environment apart from ``PATH``, locale and thread-count variables and
``PYTHONNOUSERSITE``, stdin closed, RLIMIT_CPU, RLIMIT_AS, RLIMIT_NOFILE, RLIMIT_FSIZE and
RLIMIT_CORE set before exec. Jailed, the job's cgroup is frozen and every member SIGKILLed when
the job ends or its wall clock runs out (and the PID namespace dies with its first process);
unjailed, its process group is SIGKILLed instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from marketplace.services import jail as _jail
from marketplace.services.jail import JailConfig

__all__ = ["Reason", "SandboxResult", "run_isolated"]

Reason = Literal["ok", "cpu_limit", "memory_limit", "timeout", "error"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_MIB = 1024 * 1024
_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run did.

    ``exit_code`` is the process's code, or ``-signal`` if a signal ended it. ``stdout`` is its
    head and ``stderr`` its tail (tracebacks end there), each cut to ``max_log_bytes``.
    ``message`` says in words why the run ended; ``pid`` was also its process-group id.
    """

    ok: bool
    exit_code: int
    stdout: str
    stderr: str
    outputs: dict[str, bytes]
    reason: Reason
    message: str
    pid: int
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    ignored_outputs: tuple[str, ...] = field(default=())


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _preexec(cpu_seconds: int, memory_bytes: int, max_files: int, max_file_bytes: int) -> Callable[[], None]:
    def limits() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limits


def _env(scratch: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PYTHONNOUSERSITE": "1",
        "HOME": str(scratch),
        "TMPDIR": str(scratch / "tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _read_log(path: Path, limit: int, *, tail: bool) -> str:
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size <= limit:
                data = f.read()
                note = b""
            elif tail:
                f.seek(size - limit)
                data = f.read(limit)
                note = b"[... %d bytes cut ...]\n" % (size - limit)
                data = note + data
            else:
                data = f.read(limit) + b"\n[... %d bytes cut ...]" % (size - limit)
    except FileNotFoundError:
        return ""
    return data.decode("utf-8", errors="replace")


def _collect_outputs(scratch_fd: int, max_bytes: int, *, outputs_fd: int | None = None) -> tuple[dict[str, bytes], list[str], bool]:
    """Read top-level regular files of ``outputs/`` (or of the open folder ``outputs_fd``)
    without following symlinks."""
    outputs: dict[str, bytes] = {}
    ignored: list[str] = []
    try:
        if outputs_fd is not None:
            dfd = os.dup(outputs_fd)
        else:
            dfd = os.open("outputs", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=scratch_fd)
    except OSError:
        return outputs, ["outputs/ (missing or not a directory)"], False
    total = 0
    try:
        for name in sorted(os.listdir(dfd)):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
            except OSError:
                ignored.append(name)
                continue
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or not _NAME.fullmatch(name):
                os.close(fd)
                ignored.append(name)
                continue
            with os.fdopen(fd, "rb") as f:
                total += st.st_size
                if total > max_bytes:
                    return outputs, ignored, True
                outputs[name] = f.read(st.st_size + 1)
                if len(outputs[name]) > st.st_size:  # still growing: a straggler writes to it
                    return outputs, ignored, True
    finally:
        os.close(dfd)
    return outputs, ignored, False


def _rmtree(path: Path) -> None:
    def fix(func: Callable[..., object], p: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)

    shutil.rmtree(path, onerror=fix)


def _classify(
    *, timed_out: bool, code: int, cpu: float, stderr: str, cpu_seconds: int, memory_mb: int, wall_seconds: float,
    oom: bool = False, max_output_bytes: int = 0,
) -> tuple[Reason, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {wall_seconds:g} s exceeded; process group killed"
    sig = -code if code < 0 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_seconds - 0.05):
        return "cpu_limit", f"CPU time limit of {cpu_seconds} s exceeded (used {cpu:.2f} s)"
    if code != 0 and any(m in stderr for m in _MEMORY_MARKERS):
        return "memory_limit", f"memory limit of {memory_mb} MiB exceeded (allocation failed)"
    if oom and code != 0:  # the cgroup's OOM killer took the job or one of its processes
        return "memory_limit", f"memory limit of {memory_mb} MiB exceeded (the job's cgroup ran out of memory)"
    if code != 0 and "No space left on device" in stderr:
        return "error", f"outputs exceed the limit of {max_output_bytes} bytes (the output folder is full)"
    if sig == signal.SIGXFSZ or (code != 0 and "File too large" in stderr):
        # Python ignores SIGXFSZ, so the write fails with EFBIG ("File too large") instead.
        return "error", "file size limit exceeded (an output or log grew too large)"
    if code == 0:
        return "ok", "ok"
    if sig:
        return "error", f"killed by signal {signal.Signals(sig).name}"
    return "error", f"exited with code {code}"


_DEFAULT_JAIL = JailConfig()


def _jail_env() -> dict[str, str]:
    env = _env(Path("/tmp"))  # noqa: S108 - the jail's private /tmp
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


def _run_jailed(
    code: str, *, inputs: Mapping[str, bytes], workdir: Path, cpu_seconds: int, memory_mb: int,
    wall_seconds: float, python: str, max_files: int, max_output_bytes: int, max_log_bytes: int,
    cfg: JailConfig,
) -> SandboxResult:
    lay = _jail.layout(python, cfg.packages)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))  # 0700: no host user reaches in
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=workdir))
    cg: _jail.Cgroup | None = None
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
        cg = _jail.Cgroup(cfg.cgroup_root, _jail.job_name())
        cg.limit(memory_bytes=memory_mb * _MIB + output_bytes + cfg.tmp_bytes + 64 * _MIB, pids=cfg.max_pids)
        job_binds = ((str(scratch / "main.py"), "/job/main.py"), (str(scratch / "inputs"), "/job/inputs"))
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        fds += [info_r, info_w, block_r, block_w]
        argv = _jail.bwrap_argv(
            cfg, lay, job_binds=job_binds, env=_jail_env(), output_bytes=output_bytes,
            block_fd=block_r, info_fd=info_w, argv=[lay.python, "-I", "-B", "main.py"],
        )
        import resource

        rlimits = [
            (resource.RLIMIT_CPU, cpu_seconds), (resource.RLIMIT_AS, memory_mb * _MIB),
            (resource.RLIMIT_NOFILE, max_files), (resource.RLIMIT_FSIZE, max_output_bytes),
            (resource.RLIMIT_CORE, 0),
        ]
        out_path, err_path = logs / "stdout", logs / "stderr"
        start = time.monotonic()
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, untrusted code only in main.py
                argv, cwd="/", env={}, stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                close_fds=True, pass_fds=(info_w, block_r), start_new_session=True,
                preexec_fn=_jail.preexec(  # noqa: PLW1509
                    binds=lay.binds + job_binds, procs_files=cg.procs_files(), rlimits=rlimits),
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
            time.sleep(_POLL_SECONDS)
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
        stdout = _read_log(out_path, max_log_bytes, tail=False)
        stderr = _read_log(err_path, max_log_bytes, tail=True)
        if out_fd >= 0:
            outputs, ignored, too_big = _collect_outputs(-1, max_output_bytes, outputs_fd=out_fd)
        else:
            outputs, ignored, too_big = {}, ["outputs/ (the jail did not start)"], False
        reason, message = _classify(
            timed_out=timed_out, code=exit_code, cpu=cpu, stderr=stderr, cpu_seconds=cpu_seconds,
            memory_mb=memory_mb, wall_seconds=wall_seconds, oom=cg.oom_killed(), max_output_bytes=max_output_bytes,
        )
        if out_fd < 0 and reason == "ok":  # pragma: no cover - bubblewrap failed before the job
            reason, message = "error", "the jail could not be set up"
        if too_big and reason == "ok":
            reason, message = "error", f"outputs exceed the limit of {max_output_bytes} bytes"
            outputs = {}
        return SandboxResult(
            ok=reason == "ok", exit_code=exit_code, stdout=stdout, stderr=stderr, outputs=outputs,
            reason=reason, message=message, pid=pid, cpu_seconds=cpu, wall_seconds=wall,
            ignored_outputs=tuple(ignored),
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
        _rmtree(logs)
        _rmtree(scratch)


def run_isolated(
    code: str,
    *,
    inputs: Mapping[str, bytes],
    workdir: Path,
    cpu_seconds: int,
    memory_mb: int,
    wall_seconds: float,
    python: str = sys.executable,
    max_files: int = 64,
    max_output_bytes: int = 64 * _MIB,
    max_log_bytes: int = 64 * 1024,
    keep_scratch: bool = False,
    jail: JailConfig | None = _DEFAULT_JAIL,
) -> SandboxResult:
    """Run ``code`` in a fresh scratch folder under ``workdir`` with the given limits, in the
    jail ``jail`` (``None``: unjailed, only for the operator's explicit unsafe switch).

    Preconditions: ``inputs`` names are plain file names (letters, digits, ``._-``).
    Returns a :class:`SandboxResult`; never raises for anything the child does. Raises
    ValueError/TypeError on bad arguments, OSError if the scratch folder, the job's cgroup or
    the jail cannot be made.
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be str, got {type(code).__name__}")
    for name, value in (("cpu_seconds", cpu_seconds), ("memory_mb", memory_mb), ("max_files", max_files)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    _check_positive("wall_seconds", wall_seconds)
    _check_positive("max_output_bytes", max_output_bytes)
    _check_positive("max_log_bytes", max_log_bytes)
    for name, data in inputs.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"input names must match {_NAME.pattern}, got {name!r}")
        if not isinstance(data, bytes):
            raise TypeError(f"input {name!r} must be bytes, got {type(data).__name__}")

    workdir = Path(workdir)
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if jail is not None:
        return _run_jailed(
            code, inputs=inputs, workdir=workdir, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
            wall_seconds=wall_seconds, python=python, max_files=max_files, max_output_bytes=max_output_bytes,
            max_log_bytes=max_log_bytes, cfg=jail,
        )
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=workdir))  # 0700
    logs = Path(tempfile.mkdtemp(prefix="logs-", dir=workdir))
    scratch_fd = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for sub in ("inputs", "outputs", "tmp"):
            (scratch / sub).mkdir(mode=0o700)
        for name, data in inputs.items():
            (scratch / "inputs" / name).write_bytes(data)
        (scratch / "main.py").write_text(code, encoding="utf-8")
        out_path, err_path = logs / "stdout", logs / "stderr"
        start = time.monotonic()
        with out_path.open("wb") as out_f, err_path.open("wb") as err_f:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, untrusted code only in main.py
                [python, "-I", "-B", "main.py"],
                cwd=scratch,
                env=_env(scratch),
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                close_fds=True,
                start_new_session=True,
                preexec_fn=_preexec(cpu_seconds, memory_mb * _MIB, max_files, max_output_bytes),  # noqa: PLW1509
            )
        pid = proc.pid
        timed_out = False
        deadline = start + wall_seconds
        # Wait without reaping (WNOWAIT) so the group id stays ours until the group is killed.
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(_POLL_SECONDS)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        proc.returncode = exit_code  # reaped here; keep Popen consistent
        wall = time.monotonic() - start
        cpu = usage.ru_utime + usage.ru_stime

        stdout = _read_log(out_path, max_log_bytes, tail=False)
        stderr = _read_log(err_path, max_log_bytes, tail=True)
        outputs, ignored, too_big = _collect_outputs(scratch_fd, max_output_bytes)
        reason, message = _classify(
            timed_out=timed_out,
            code=exit_code,
            cpu=cpu,
            stderr=stderr,
            cpu_seconds=cpu_seconds,
            memory_mb=memory_mb,
            wall_seconds=wall_seconds,
        )
        if too_big and reason == "ok":
            reason, message = "error", f"outputs exceed the limit of {max_output_bytes} bytes"
            outputs = {}
        return SandboxResult(
            ok=reason == "ok",
            exit_code=exit_code,
            stdout=stdout,
            stderr=stderr,
            outputs=outputs,
            reason=reason,
            message=message,
            pid=pid,
            cpu_seconds=cpu,
            wall_seconds=wall,
            ignored_outputs=tuple(ignored),
        )
    finally:
        os.close(scratch_fd)
        _rmtree(logs)
        if not keep_scratch:
            _rmtree(scratch)
