"""The jail for consumer code: bubblewrap namespaces plus cgroup v1 limits, and the policy around it.

For: running an approved ``custom`` job's code (through
:func:`marketplace.compute.sandbox.run_isolated`) where it cannot see or reach the service.
The jailed process runs as uid/gid 65534 (``nobody``) both inside its user namespace and on the
host, in its own user, mount, PID, IPC, UTS, cgroup and network namespaces (no network at all),
with a new session, ``--die-with-parent`` and no further user namespaces (``--disable-userns``).
Its root is a read-only tmpfs holding only ``/usr`` (and the ``/bin``, ``/lib*`` links), the
dynamic loader's cache, the Python installation that runs the job (its own site directories
replaced by an empty tmpfs holding only the allowed packages, ``numpy`` by default), a fresh
``/proc`` of its PID namespace, a minimal ``/dev``, a private size-capped ``/tmp``, and
``/job`` with ``main.py`` and ``inputs/`` (read-only) and ``outputs/`` (a tmpfs capped at the
output limit, read back by the parent through a directory handle). It sees no data directory,
keys, database, project source, parent ``/proc`` or parent environment.
Limits: a per-job cgroup under the caller's own cgroup in the ``memory`` (memory and swap),
``pids`` and ``freezer`` controllers (plus ``cpuacct`` for the CPU figure when present); the
whole cgroup is frozen and killed when the job ends and removed afterwards.

Not for: deciding whether code may run (the provider's approval), seccomp filtering (none is
applied: the kernel's system-call surface is reachable), or hiding side channels.

Policy: :func:`probe` says (cached) whether the jail works on this machine. :func:`require`
returns the :class:`JailConfig` to use, or ``None`` only when the operator set the loudly named
``unsafe_unjailed`` switch (``SOM_UNSAFE_UNJAILED_CUSTOM_JOBS``), logging a warning each time;
otherwise it raises :class:`JailUnavailable`. Nothing falls back silently.

This module is the policy and the public face; the jail is built by
:mod:`marketplace.compute.jail_build` (config, root file system, child set-up, bubblewrap argv)
and :mod:`marketplace.compute.jail_cgroup` (per-job cgroups), and run by
:mod:`marketplace.compute.sandbox` (``sandbox_jailed``).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from pathlib import Path

from marketplace.compute.jail_build import NOBODY, JailConfig, Layout, config_from_env, layout
from marketplace.compute.jail_cgroup import Cgroup, job_name
from marketplace.compute.sandbox import run_isolated

__all__ = [
    "Cgroup",
    "JailConfig",
    "JailUnavailable",
    "Layout",
    "config_from_env",
    "layout",
    "probe",
    "require",
    "status",
]

log = logging.getLogger("som.jail")


class JailUnavailable(Exception):
    """The jail cannot be set up here and unjailed runs are not allowed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"custom jobs are refused: the job jail is unavailable on this compute site ({reason}); "
            "the operator can install bubblewrap and cgroups, or set SOM_UNSAFE_UNJAILED_CUSTOM_JOBS=true "
            "to run consumer code without a jail (unsafe)"
        )
        self.reason = reason


# ---------------------------------------------------------------- the probe


def _probe_run(cfg: JailConfig, python: str) -> None:

    res = run_isolated(
        "import numpy, os\nopen('outputs/ok', 'w').write(str(os.getuid()))\n",
        inputs={},
        workdir=Path(os.environ.get("TMPDIR") or "/tmp") / "som-jail-probe",  # noqa: S108
        cpu_seconds=20,
        memory_mb=512,
        wall_seconds=30.0,
        python=python,
        jail=cfg,
    )
    if not res.ok or res.outputs.get("ok") != str(NOBODY).encode():
        raise OSError(f"a trial job did not run in the jail: {res.message}: {res.stderr.strip()[-300:]}")


@functools.lru_cache(maxsize=8)
def _probe(cfg: JailConfig, python: str) -> str | None:
    if not (os.path.isfile(cfg.bwrap) and os.access(cfg.bwrap, os.X_OK)):
        return f"bubblewrap not found at {cfg.bwrap}"
    if os.geteuid() != 0:
        return "the jail needs root to create per-job cgroups and drop to an unprivileged user"
    try:
        cg = Cgroup(cfg.cgroup_root, job_name())
        cg.remove()
    except OSError as e:
        return f"cgroup v1 memory/pids/freezer controllers unusable: {e}"
    try:
        layout(python, cfg.packages)
        _probe_run(cfg, python)
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def probe(cfg: JailConfig, python: str = sys.executable) -> str | None:
    """None if jobs can run jailed on this machine with ``cfg``, else why not (cached)."""
    return _probe(cfg, python)


def status(cfg: JailConfig) -> str:
    """One word for the health endpoint: ``ok``, ``unsafe_unjailed`` or ``unavailable``."""
    if probe(cfg) is None:
        return "ok"
    return "unsafe_unjailed" if cfg.unsafe_unjailed else "unavailable"


def require(cfg: JailConfig, python: str = sys.executable) -> JailConfig | None:
    """The config to run a job with; None (with a warning) only under the unsafe switch.
    Raises :class:`JailUnavailable`."""
    reason = probe(cfg, python)
    if reason is None:
        return cfg
    if cfg.unsafe_unjailed:
        log.warning(
            "SOM_UNSAFE_UNJAILED_CUSTOM_JOBS=true: running consumer code WITHOUT a jail (%s); "
            "it can read everything this service's user can read",
            reason,
        )
        return None
    raise JailUnavailable(reason)
