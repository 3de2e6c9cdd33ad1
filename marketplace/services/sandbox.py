"""Run untrusted consumer code (``custom`` jobs, after provider approval) in a limited child process.

For: bounding what one approved ``custom`` job can consume (CPU time, address space, open
files, file sizes, wall-clock time), keeping the service's secrets out of its reach through the
environment, and collecting its output files. Not for: running code nobody approved. This is
resource isolation, not a security boundary against hostile code: the child runs as the same
user, can read whatever that user can read and can open network connections. Deployments that
run ``custom`` jobs should run workers as a dedicated unprivileged user in a container or under
a namespace/seccomp jail (bubblewrap, nsjail) on top of this (see docs/crypto-at-rest.md).

Contract with the consumer's code: it runs as ``main.py`` with the scratch folder as its
working directory, reads its inputs from ``inputs/<name>``, writes results to
``outputs/<name>`` (regular files at the top level; anything else is ignored).

Mechanics: a fresh scratch folder per run (0700, removed afterwards), ``python -I -B``, an
empty environment apart from ``PATH``, locale and thread-count variables and
``PYTHONNOUSERSITE``, stdin closed, a new session (process group) that is SIGKILLed when the
wall clock runs out and again after the run to take stragglers with it, and ``setrlimit`` of
RLIMIT_CPU, RLIMIT_AS, RLIMIT_NOFILE, RLIMIT_FSIZE and RLIMIT_CORE in the child before exec.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
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


def _collect_outputs(scratch_fd: int, max_bytes: int) -> tuple[dict[str, bytes], list[str], bool]:
    """Read top-level regular files of ``outputs/`` without following symlinks."""
    outputs: dict[str, bytes] = {}
    ignored: list[str] = []
    try:
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
    *, timed_out: bool, code: int, cpu: float, stderr: str, cpu_seconds: int, memory_mb: int, wall_seconds: float
) -> tuple[Reason, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {wall_seconds:g} s exceeded; process group killed"
    sig = -code if code < 0 else 0
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_seconds - 0.05):
        return "cpu_limit", f"CPU time limit of {cpu_seconds} s exceeded (used {cpu:.2f} s)"
    if code != 0 and any(m in stderr for m in _MEMORY_MARKERS):
        return "memory_limit", f"memory limit of {memory_mb} MiB exceeded (allocation failed)"
    if sig == signal.SIGXFSZ or (code != 0 and "File too large" in stderr):
        # Python ignores SIGXFSZ, so the write fails with EFBIG ("File too large") instead.
        return "error", "file size limit exceeded (an output or log grew too large)"
    if code == 0:
        return "ok", "ok"
    if sig:
        return "error", f"killed by signal {signal.Signals(sig).name}"
    return "error", f"exited with code {code}"


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
) -> SandboxResult:
    """Run ``code`` in a fresh scratch folder under ``workdir`` with the given limits.

    Preconditions: ``inputs`` names are plain file names (letters, digits, ``._-``).
    Returns a :class:`SandboxResult`; never raises for anything the child does. Raises
    ValueError/TypeError on bad arguments, OSError if the scratch folder cannot be made.
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
