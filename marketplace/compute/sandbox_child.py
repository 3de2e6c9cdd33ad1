"""What both sandboxed runs share: the result record, the child's environment and rlimits, its logs and outputs.

For: :class:`SandboxResult`, the environment and rlimits of the child, reading its (bounded)
logs and regular output files through a directory handle, removing scratch folders, and turning
an exit (signal, code, CPU time, stderr markers) into a :data:`Reason`. Used by the plain run
(:func:`marketplace.compute.sandbox.run_isolated`) and the jailed one
(:mod:`marketplace.compute.sandbox_jailed`). Not for: starting anything.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "result_of",
    "INPUT_NAME",
    "MIB",
    "POLL_SECONDS",
    "Reason",
    "SandboxResult",
    "check_positive",
    "child_env",
    "classify",
    "collect_outputs",
    "read_log",
    "rlimit_preexec",
    "rmtree",
]

Reason = Literal["ok", "cpu_limit", "memory_limit", "timeout", "error"]

INPUT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MEMORY_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
MIB = 1024 * 1024
POLL_SECONDS = 0.01


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


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def rlimit_preexec(cpu_seconds: int, memory_bytes: int, max_files: int, max_file_bytes: int) -> Callable[[], None]:
    def limits() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return limits


def child_env(scratch: Path) -> dict[str, str]:
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


def read_log(path: Path, limit: int, *, tail: bool) -> str:
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


def collect_outputs(
    scratch_fd: int, max_bytes: int, *, outputs_fd: int | None = None
) -> tuple[dict[str, bytes], list[str], bool]:
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
            if not stat.S_ISREG(st.st_mode) or not INPUT_NAME.fullmatch(name):
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


def rmtree(path: Path) -> None:
    def fix(func: Callable[..., object], p: str, _exc: object) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(OSError):
            func(p)

    shutil.rmtree(path, onerror=fix)


def classify(
    *,
    timed_out: bool,
    code: int,
    cpu: float,
    stderr: str,
    cpu_seconds: int,
    memory_mb: int,
    wall_seconds: float,
    oom: bool = False,
    max_output_bytes: int = 0,
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


def result_of(
    *,
    exit_code: int,
    stdout: str,
    stderr: str,
    outputs: dict[str, bytes],
    ignored: list[str],
    too_big: bool,
    reason: Reason,
    message: str,
    pid: int,
    cpu: float,
    wall: float,
    max_output_bytes: int,
) -> SandboxResult:
    """The :class:`SandboxResult` of a finished run (jailed or not): outputs over the cap void a
    run that otherwise succeeded."""
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
