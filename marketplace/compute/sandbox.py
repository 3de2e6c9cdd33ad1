"""Run untrusted consumer code (``custom`` jobs, after provider approval) in a jailed child process.

For: running one approved ``custom`` job's code where it can reach nothing but its own inputs
and outputs (the jail of :mod:`marketplace.compute.jail`: bubblewrap namespaces, an unprivileged
uid, a read-only minimal root, no network, per-job cgroups), bounding what it consumes (CPU
time, memory, processes, open files, file and output sizes, wall-clock time), and collecting
its output files. Not for: running code nobody approved, or deciding whether the jail may be
skipped (:func:`marketplace.compute.jail.require` does; ``jail=None`` here runs the old
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

This module checks the arguments and runs the unjailed child; the jailed run is
:mod:`marketplace.compute.sandbox_jailed`, the pieces both share :mod:`marketplace.compute.sandbox_child`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from marketplace.compute.jail_build import JailConfig
from marketplace.compute.sandbox_child import (
    INPUT_NAME,
    MIB,
    POLL_SECONDS,
    Reason,
    SandboxResult,
    check_positive,
    child_env,
    classify,
    collect_outputs,
    read_log,
    result_of,
    rlimit_preexec,
    rmtree,
)
from marketplace.compute.sandbox_jailed import run_jailed

__all__ = ["Reason", "SandboxResult", "run_isolated"]

_DEFAULT_JAIL = JailConfig()


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
    max_output_bytes: int = 64 * MIB,
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
    check_positive("wall_seconds", wall_seconds)
    check_positive("max_output_bytes", max_output_bytes)
    check_positive("max_log_bytes", max_log_bytes)
    for name, data in inputs.items():
        if not isinstance(name, str) or not INPUT_NAME.fullmatch(name):
            raise ValueError(f"input names must match {INPUT_NAME.pattern}, got {name!r}")
        if not isinstance(data, bytes):
            raise TypeError(f"input {name!r} must be bytes, got {type(data).__name__}")

    workdir = Path(workdir)
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if jail is not None:
        return run_jailed(
            code,
            inputs=inputs,
            workdir=workdir,
            cpu_seconds=cpu_seconds,
            memory_mb=memory_mb,
            wall_seconds=wall_seconds,
            python=python,
            max_files=max_files,
            max_output_bytes=max_output_bytes,
            max_log_bytes=max_log_bytes,
            cfg=jail,
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
                env=child_env(scratch),
                stdin=subprocess.DEVNULL,
                stdout=out_f,
                stderr=err_f,
                close_fds=True,
                start_new_session=True,
                preexec_fn=rlimit_preexec(cpu_seconds, memory_mb * MIB, max_files, max_output_bytes),  # noqa: PLW1509
            )
        pid = proc.pid
        timed_out = False
        deadline = start + wall_seconds
        # Wait without reaping (WNOWAIT) so the group id stays ours until the group is killed.
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(POLL_SECONDS)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        exit_code = os.waitstatus_to_exitcode(status)
        proc.returncode = exit_code  # reaped here; keep Popen consistent
        wall = time.monotonic() - start
        cpu = usage.ru_utime + usage.ru_stime

        stdout = read_log(out_path, max_log_bytes, tail=False)
        stderr = read_log(err_path, max_log_bytes, tail=True)
        outputs, ignored, too_big = collect_outputs(scratch_fd, max_output_bytes)
        reason, message = classify(
            timed_out=timed_out,
            code=exit_code,
            cpu=cpu,
            stderr=stderr,
            cpu_seconds=cpu_seconds,
            memory_mb=memory_mb,
            wall_seconds=wall_seconds,
        )
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
        os.close(scratch_fd)
        rmtree(logs)
        if not keep_scratch:
            rmtree(scratch)
