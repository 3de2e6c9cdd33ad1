"""The jail for consumer code: bubblewrap namespaces plus cgroup v1 limits, and the policy around it.

For: running an approved ``custom`` job's code (through
:func:`marketplace.services.sandbox.run_isolated`) where it cannot see or reach the service.
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
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import importlib.util
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

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

NOBODY = 65534
_CONTROLLERS = ("memory", "pids", "freezer")
_OPTIONAL = ("cpuacct",)


class JailUnavailable(Exception):
    """The jail cannot be set up here and unjailed runs are not allowed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            f"custom jobs are refused: the job jail is unavailable on this compute site ({reason}); "
            "the operator can install bubblewrap and cgroups, or set SOM_UNSAFE_UNJAILED_CUSTOM_JOBS=true "
            "to run consumer code without a jail (unsafe)"
        )
        self.reason = reason


@dataclass(frozen=True)
class JailConfig:
    """How to build the jail. ``packages``: top-level Python packages the job may import
    besides the standard library (bound read-only from where this process finds them)."""

    bwrap: str = "/usr/bin/bwrap"
    cgroup_root: str = "/sys/fs/cgroup"
    max_pids: int = 64
    tmp_bytes: int = 64 << 20
    packages: tuple[str, ...] = ("numpy",)
    unsafe_unjailed: bool = False


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def config_from_env(environ: Mapping[str, str] | None = None) -> JailConfig:
    """The jail settings from ``SOM_JAIL_BWRAP``, ``SOM_JAIL_MAX_PIDS`` and
    ``SOM_UNSAFE_UNJAILED_CUSTOM_JOBS`` (for the agent, which has no service settings)."""
    env = os.environ if environ is None else environ
    return JailConfig(
        bwrap=env.get("SOM_JAIL_BWRAP") or JailConfig.bwrap,
        max_pids=int(env.get("SOM_JAIL_MAX_PIDS") or JailConfig.max_pids),
        unsafe_unjailed=_truthy(env.get("SOM_UNSAFE_UNJAILED_CUSTOM_JOBS")),
    )


# ---------------------------------------------------------------- the root file system


@dataclass(frozen=True)
class Layout:
    """What the jail's root is made of: (host path, jail path) read-only binds, tmpfs mount
    points over the interpreter's site directories, symlinks, and the interpreter to run."""

    python: str
    binds: tuple[tuple[str, str], ...]
    masks: tuple[str, ...]
    symlinks: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=8)
def layout(python: str, packages: tuple[str, ...]) -> Layout:
    """The jail's root for ``python`` (resolved to the real interpreter: a venv's own
    site-packages, which would expose the project, is never bound). Raises OSError/ValueError."""
    exe = os.path.realpath(python)
    out = subprocess.run(  # noqa: S603 - our own interpreter, fixed argv
        [exe, "-I", "-S", "-c", "import sys, json, site; print(json.dumps([sys.prefix, site.getsitepackages()]))"],
        capture_output=True, text=True, timeout=30, env={}, check=True,
    )
    prefix, sitedirs = json.loads(out.stdout)
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    symlinks: list[tuple[str, str]] = []
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            symlinks.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append((top, top))
    if os.path.exists("/etc/ld.so.cache"):
        binds.append(("/etc/ld.so.cache", "/etc/ld.so.cache"))
    real_prefix = os.path.realpath(prefix)
    if not (real_prefix == "/usr" or real_prefix.startswith("/usr/")):
        binds.append((real_prefix, real_prefix))
    if not exe.startswith(("/usr/", real_prefix + "/")):
        binds.append((exe, exe))
    masks = tuple(d for d in sitedirs if os.path.isdir(d))
    if not masks:
        raise ValueError(f"the interpreter {exe} has no site directory to hold the allowed packages")
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"the package {name!r} allowed in the jail is not installed as a package")
        src = os.path.realpath(next(iter(spec.submodule_search_locations)))
        binds.append((src, f"{masks[0]}/{name}"))
        libs = src + ".libs"  # manylinux wheels keep their shared libraries next to the package
        if os.path.isdir(libs):
            binds.append((libs, f"{masks[0]}/{name}.libs"))
    return Layout(python=exe, binds=tuple(binds), masks=masks, symlinks=tuple(symlinks))


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


# ---------------------------------------------------------------- the child's set-up


_libc: ctypes.CDLL | None = None
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE, _MS_NOSUID, _MS_NODEV = 4096, 16384, 1 << 18, 2, 4
STAGE = "/tmp"  # noqa: S108 - replaced by a private tmpfs in the child's own mount namespace


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def staged(binds: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """Where each bind's source appears in the child's staging tmpfs (see :func:`preexec`)."""
    return [(f"{STAGE}/{i}", dest) for i, (_, dest) in enumerate(binds)]


def preexec(
    *, binds: tuple[tuple[str, str], ...], procs_files: list[str], rlimits: list[tuple[int, int]], uid: int = NOBODY
) -> Callable[[], None]:
    """The function run in the child between fork and exec (as root): join the job's cgroups,
    make a private mount namespace whose ``/tmp`` is a tmpfs holding bind mounts of every jail
    source (so bubblewrap, running as ``uid``, can reach sources below folders ``uid`` cannot
    traverse), set the rlimits, drop to ``uid`` for good, and let exec run bubblewrap."""
    import resource

    libc = _c()
    pid_text = b"0"

    def run() -> None:
        try:
            steps()
        except BaseException as e:
            os.write(2, f"som jail set-up failed: {type(e).__name__}: {e}\n".encode())
            raise

    def steps() -> None:
        for f in procs_files:  # "0": the writing process itself
            fd = os.open(f, os.O_WRONLY)
            try:
                os.write(fd, pid_text)
            finally:
                os.close(fd)
        _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
        held = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _ in binds]  # before /tmp is covered
        _check(libc.mount(b"tmpfs", STAGE.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=64k"),
               "mount staging tmpfs")
        for i, ((src, _), fd) in enumerate(zip(binds, held, strict=True)):
            target = f"{STAGE}/{i}"
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            _check(libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
                   f"bind {src}")
            os.close(fd)
        for res, value in rlimits:
            resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return run


def bwrap_argv(
    cfg: JailConfig, lay: Layout, *, job_binds: tuple[tuple[str, str], ...], env: Mapping[str, str],
    output_bytes: int, block_fd: int, info_fd: int, argv: list[str], uid: int = NOBODY,
) -> list[str]:
    """The bubblewrap command line; ``job_binds`` are read-only (host, jail) binds of the job's
    files. Sources are named by their place in the staging tmpfs (the order of
    ``lay.binds + job_binds``, as :func:`preexec` mounted them)."""
    all_binds = lay.binds + job_binds
    a = [
        cfg.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--uid", str(uid), "--gid", str(uid), "--hostname", "som-job", "--info-fd", str(info_fd),
    ]

    def masked(dest: str) -> bool:
        return any(dest.startswith(m + "/") for m in lay.masks)

    staging = staged(all_binds)
    for (stage, dest) in staging:  # the system and the interpreter first
        if not masked(dest):
            a += ["--ro-bind", stage, dest]
    for target, link in lay.symlinks:
        a += ["--symlink", target, link]
    for m in lay.masks:  # then empty site directories over the interpreter's own
        a += ["--tmpfs", m]
    for (stage, dest) in staging:  # holding only the allowed packages
        if masked(dest):
            a += ["--ro-bind", stage, dest]
    for m in lay.masks:
        a += ["--remount-ro", m]
    a += ["--proc", "/proc", "--dev", "/dev", "--size", str(cfg.tmp_bytes), "--tmpfs", "/tmp"]  # noqa: S108
    a += ["--size", str(output_bytes), "--tmpfs", "/job/outputs", "--remount-ro", "/"]
    a += ["--chdir", "/job", "--clearenv"]
    for k, v in env.items():
        a += ["--setenv", k, v]
    # The job starts only once the parent holds the output folder (see sandbox.py).
    a += ["--", "/usr/bin/bash", "-c", f'read -r -n 1 _ <&{block_fd} || exit 125; exec {block_fd}<&-; unset PWD OLDPWD; '
                                   'exec /usr/bin/env -u SHLVL -u _ "$@"', "som-job", *argv]
    return a


def job_name() -> str:
    return f"som-job-{os.getpid()}-{secrets.token_hex(6)}"


# ---------------------------------------------------------------- the probe


def _probe_run(cfg: JailConfig, python: str) -> None:
    from marketplace.services.sandbox import run_isolated

    res = run_isolated(
        "import numpy, os\nopen('outputs/ok', 'w').write(str(os.getuid()))\n",
        inputs={}, workdir=Path(os.environ.get("TMPDIR") or "/tmp") / "som-jail-probe",  # noqa: S108
        cpu_seconds=20, memory_mb=512, wall_seconds=30.0, python=python, jail=cfg,
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
            "it can read everything this service's user can read", reason,
        )
        return None
    raise JailUnavailable(reason)

