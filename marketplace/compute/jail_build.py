"""How one jail is built: its settings, its root file system, the child's set-up and bubblewrap's argv.

For: :class:`JailConfig` (and :func:`config_from_env` for the agent), :func:`layout` (the
read-only root: ``/usr``, the loader cache, the interpreter with only the allowed packages),
:func:`preexec` (what the child does between fork and exec: join the cgroups, stage the bind
sources, set the rlimits, drop to ``nobody``) and :func:`bwrap_argv` (the namespaces and mounts).
The policy (may a job run jailed here?) is :mod:`marketplace.compute.jail`; the per-job cgroups
are :mod:`marketplace.compute.jail_cgroup`; running a job is :mod:`marketplace.compute.sandbox`.

Not for: deciding whether to run at all, or running anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import json
import os
import resource
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["NOBODY", "STAGE", "JailConfig", "Layout", "bwrap_argv", "config_from_env", "layout", "preexec", "staged"]

NOBODY = 65534


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
        capture_output=True,
        text=True,
        timeout=30,
        env={},
        check=True,
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
        _check(
            libc.mount(b"tmpfs", STAGE.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=0755,size=64k"),
            "mount staging tmpfs",
        )
        for i, ((src, _), fd) in enumerate(zip(binds, held, strict=True)):
            target = f"{STAGE}/{i}"
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.mkdir(target, 0o755)
            else:
                os.close(os.open(target, os.O_WRONLY | os.O_CREAT, 0o644))
            _check(
                libc.mount(f"/proc/self/fd/{fd}".encode(), target.encode(), None, _MS_BIND | _MS_REC, None),
                f"bind {src}",
            )
            os.close(fd)
        for res, value in rlimits:
            resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)

    return run


def bwrap_argv(
    cfg: JailConfig,
    lay: Layout,
    *,
    job_binds: tuple[tuple[str, str], ...],
    env: Mapping[str, str],
    output_bytes: int,
    block_fd: int,
    info_fd: int,
    argv: list[str],
    uid: int = NOBODY,
) -> list[str]:
    """The bubblewrap command line; ``job_binds`` are read-only (host, jail) binds of the job's
    files. Sources are named by their place in the staging tmpfs (the order of
    ``lay.binds + job_binds``, as :func:`preexec` mounted them)."""
    all_binds = lay.binds + job_binds
    a = [
        cfg.bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--uid",
        str(uid),
        "--gid",
        str(uid),
        "--hostname",
        "som-job",
        "--info-fd",
        str(info_fd),
    ]

    def masked(dest: str) -> bool:
        return any(dest.startswith(m + "/") for m in lay.masks)

    staging = staged(all_binds)
    for stage, dest in staging:  # the system and the interpreter first
        if not masked(dest):
            a += ["--ro-bind", stage, dest]
    for target, link in lay.symlinks:
        a += ["--symlink", target, link]
    for m in lay.masks:  # then empty site directories over the interpreter's own
        a += ["--tmpfs", m]
    for stage, dest in staging:  # holding only the allowed packages
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
    a += [
        "--",
        "/usr/bin/bash",
        "-c",
        f"read -r -n 1 _ <&{block_fd} || exit 125; exec {block_fd}<&-; unset PWD OLDPWD; "
        'exec /usr/bin/env -u SHLVL -u _ "$@"',
        "som-job",
        *argv,
    ]
    return a
