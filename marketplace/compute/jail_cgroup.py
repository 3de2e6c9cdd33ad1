"""Per-job cgroups (v1): a job's ``memory``, ``pids`` and ``freezer`` (and ``cpuacct``) groups.

For: :class:`Cgroup`, made under the caller's own cgroup in each controller, limiting memory and
swap and the number of processes, freezing and killing every member when the job ends, and
removed afterwards (stale groups of dead parents are reaped on the next job); :func:`job_name`.
Not for: namespaces or mounts (:mod:`marketplace.compute.jail_build`) or the policy
(:mod:`marketplace.compute.jail`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import time
from pathlib import Path

__all__ = ["Cgroup", "job_name"]

log = logging.getLogger("som.jail")

_CONTROLLERS = ("memory", "pids", "freezer")
_OPTIONAL = ("cpuacct",)


# ---------------------------------------------------------------- cgroups (v1)


def _own_cgroup(controller: str) -> str:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    raise OSError(errno.ENOENT, f"no cgroup v1 {controller} controller for this process")


def _reap_stale(parent: Path) -> None:
    """Remove empty job cgroups left by a process that was killed mid-job (the name holds its pid)."""
    for p in parent.glob("som-job-*-*"):
        try:
            pid = int(p.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        with contextlib.suppress(OSError):
            p.rmdir()  # fails (EBUSY) while a member is alive: then it stays


class Cgroup:
    """One job's cgroup in each v1 controller, under this process's own cgroup."""

    def __init__(self, root: str, name: str) -> None:
        self.paths: dict[str, Path] = {}
        for c in (*_CONTROLLERS, *_OPTIONAL):
            base = Path(root) / c
            if not (base / "cgroup.procs").exists():
                if c in _OPTIONAL:
                    continue
                raise OSError(errno.ENOENT, f"cgroup v1 controller {c} is not mounted at {base}")
            self.paths[c] = base / _own_cgroup(c).lstrip("/") / name
            _reap_stale(self.paths[c].parent)
        made: list[Path] = []
        try:
            for p in self.paths.values():
                p.mkdir(mode=0o755)
                made.append(p)
        except OSError:
            for p in reversed(made):
                with contextlib.suppress(OSError):
                    p.rmdir()
            raise

    def limit(self, *, memory_bytes: int, pids: int) -> None:
        mem = self.paths["memory"]
        (mem / "memory.limit_in_bytes").write_text(str(memory_bytes))
        if (mem / "memory.memsw.limit_in_bytes").exists():  # no swapping around the limit
            (mem / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (self.paths["pids"] / "pids.max").write_text(str(pids))

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.paths.values()]

    def pids(self) -> list[int]:
        try:
            text = (self.paths["pids"] / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(x) for x in text.split()]

    def oom_killed(self) -> bool:
        mem = self.paths["memory"]
        try:
            if int((mem / "memory.failcnt").read_text()) > 0:
                return True
            for line in (mem / "memory.oom_control").read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "oom_kill" and int(v) > 0:
                    return True
        except (OSError, ValueError):
            return False
        return False

    def cpu_seconds(self) -> float | None:
        p = self.paths.get("cpuacct")
        if p is None:
            return None
        try:
            return int((p / "cpuacct.usage").read_text()) / 1e9
        except (OSError, ValueError):
            return None

    def kill_all(self, *, timeout: float = 5.0) -> None:
        """Freeze the cgroup (so nothing forks meanwhile), SIGKILL every member, thaw, and wait
        until it is empty."""
        fr = self.paths["freezer"] / "freezer.state"
        with contextlib.suppress(OSError):
            fr.write_text("FROZEN")
            end = time.monotonic() + 1.0
            while fr.read_text().strip() != "FROZEN" and time.monotonic() < end:
                time.sleep(0.002)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            fr.write_text("THAWED")
        end = time.monotonic() + timeout
        while self.pids() and time.monotonic() < end:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        for p in self.paths.values():
            for _ in range(200):
                try:
                    p.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.005)  # the last member is still being torn down
            else:
                log.error("could not remove the job cgroup %s", p)


def job_name() -> str:
    return f"som-job-{os.getpid()}-{secrets.token_hex(6)}"
