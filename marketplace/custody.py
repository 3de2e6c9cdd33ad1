"""Key custody: where the service's secret keys live (the key directory), apart from the data.

For: resolving and creating the key directory that holds every secret key of the service (the
KEK keyring ``kek.json``, the job sealing key ``job_seal.key``, the task-message HMAC key
``task_mac.key``, the ledger's log key ``log.key``), refusing a data directory that still holds
keys (migration), refusing to make fresh keys for a data directory that was set up before, and
creating the DB and log files 0600. A copy of the data directory alone then holds ciphertext and
no key that opens it (docs/crypto-at-rest.md "Key custody").
Not for: making or using the keys themselves (:mod:`crypto.keyproviders`,
:func:`marketplace.services.jobs.marketplace_seal_key`, :attr:`marketplace.runtime.Runtime.log_signer`,
:func:`marketplace.compute.messages.task_key`).

Default key directory: ``$XDG_CONFIG_HOME/som/keys/<instance id>`` (``~/.config/som/...``), where
the instance id is a random, public name written once to ``<data_dir>/instance-id``: the data
directory can be moved and still finds its keys, and two data directories never share keys.
``SOM_KEY_DIR`` overrides it (a separate volume, a secrets mount shared by replicas and workers).
``SOM_UNSAFE_KEYS_IN_DATA_DIR=1`` keeps the old layout ``<data_dir>/keys`` for development and logs
a warning at every start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import stat
from pathlib import Path

from sqlalchemy.engine import make_url

from marketplace.settings import Settings, SettingsError

__all__ = [
    "INSTANCE_FILE",
    "KEK_FILE",
    "KEY_FILES",
    "LOG_KEY_FILE",
    "SEAL_KEY_FILE",
    "TASK_KEY_FILE",
    "UNSAFE_WARNING",
    "announce",
    "default_key_root",
    "notice",
    "private_file",
    "resolve_key_dir",
    "tighten_db_files",
]

log = logging.getLogger("som.custody")

KEK_FILE = "kek.json"
SEAL_KEY_FILE = "job_seal.key"
TASK_KEY_FILE = "task_mac.key"
LOG_KEY_FILE = "log.key"
KEY_FILES = (KEK_FILE, SEAL_KEY_FILE, TASK_KEY_FILE, LOG_KEY_FILE)
INSTANCE_FILE = "instance-id"
_LEGACY = "keys"

UNSAFE_WARNING = (
    "SOM_UNSAFE_KEYS_IN_DATA_DIR is set: the secret keys are kept in {path}, inside the data "
    "directory they protect; a copy or backup of the data directory reveals every model and every "
    "sealed job input. Development only: unset it and move the keys out (docs/deployment.md)."
)


def default_key_root() -> Path:
    """``$XDG_CONFIG_HOME/som/keys`` or ``~/.config/som/keys``."""
    base = os.environ.get("XDG_CONFIG_HOME") or ""
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".config"
    return root / "som" / "keys"


def _read_instance(path: Path) -> str:
    text = path.read_text().strip()
    if len(text) != 32 or any(c not in "0123456789abcdef" for c in text):
        raise SettingsError(f"{path} is not a som instance id (32 hex digits); do not edit it")
    return text


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SettingsError(f"key directory {path} has mode {mode:04o}: open to group/others; run: chmod 700 {path}")


def resolve_key_dir(settings: Settings, *, create: bool) -> Path:
    """The key directory of ``settings``: made 0700 (with the instance id) when ``create``.

    Raises :class:`SettingsError` if the key directory is inside the data directory (without the
    unsafe setting), if the data directory still holds keys from before (with the ``mv`` to run),
    if the data directory was set up before but its key directory is missing (restore it), or,
    without ``create`` and without ``SOM_KEY_DIR``, if the data directory has no instance id yet.
    """
    data = settings.data_dir.expanduser().resolve()
    legacy = data / _LEGACY
    if settings.unsafe_keys_in_data_dir:
        if create:
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
            _mkdir_private(legacy)
        return legacy
    explicit = settings.key_dir.expanduser().resolve() if settings.key_dir is not None else None
    if explicit is not None and _inside(explicit, data):
        raise SettingsError(
            f"SOM_KEY_DIR {explicit} is inside the data directory {data}: a copy of the data "
            "directory would carry the keys; choose a directory outside it"
        )
    found = [f for f in KEY_FILES if os.path.lexists(legacy / f)]
    if explicit is not None and not create and not found:
        return explicit  # a worker reads its keys lazily: a missing file fails that task, loudly
    inst = data / INSTANCE_FILE
    fresh = False
    if create and not inst.exists():
        fresh = _make_instance(data, explicit, with_key_dir=not found)
    if found:
        try:
            kd_text = str(explicit or default_key_root() / _read_instance(inst))
        except FileNotFoundError:
            kd_text = "KEYDIR"
        raise SettingsError(
            f"the data directory {data} still holds secret keys in {legacy} ({', '.join(found)}); "
            "keys must live outside the data directory they protect. Stop every replica and worker, "
            f"then move them: mkdir -m 700 -p {kd_text} && mv {legacy}/* {kd_text}/ && rmdir {legacy} "
            "(or set SOM_KEY_DIR to where you move them). Old backups of the data directory contain "
            "the keys: rotate the KEK afterwards (som admin rotate-kek). Development only: "
            "SOM_UNSAFE_KEYS_IN_DATA_DIR=1 keeps them where they are."
        )
    try:
        iid = _read_instance(inst)
    except FileNotFoundError as e:
        raise SettingsError(
            f"the data directory {data} has no {INSTANCE_FILE}: start an API replica on it first "
            "(som serve), which creates it and the key directory"
        ) from e
    kd = explicit or default_key_root() / iid
    if not kd.is_dir():
        if create and fresh:
            _mkdir_private(kd)
        else:
            raise SettingsError(
                f"the key directory {kd} of the data directory {data} (instance {iid}) does not "
                "exist; the data directory was set up with keys elsewhere: restore the key "
                "directory from its backup, or point SOM_KEY_DIR at it. Without its keys nothing "
                "in the data directory can be decrypted."
            )
    elif create:
        _mkdir_private(kd)
    return kd


def _make_instance(data: Path, explicit: Path | None, *, with_key_dir: bool) -> bool:
    """Write ``<data>/instance-id`` once (atomic: one replica wins); return whether we won."""
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    iid = secrets.token_hex(16)
    kd = explicit or default_key_root() / iid
    if with_key_dir:
        _mkdir_private(kd)  # before the id is visible: whoever reads the id finds the directory
    tmp = data / f".{INSTANCE_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(iid + "\n")
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, data / INSTANCE_FILE)
    except FileExistsError:  # another replica won the first start: use its id
        if explicit is None and with_key_dir:
            with contextlib.suppress(OSError):
                kd.rmdir()
        return False
    finally:
        tmp.unlink(missing_ok=True)
    return True


def private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing; narrow it to 0600 if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except FileNotFoundError:
        return
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def tighten_db_files(database_url: str) -> None:
    """For a file-backed SQLite URL, create the DB file 0600 before SQLite opens it (its -wal and
    -shm files take the DB file's mode) and narrow existing DB/WAL/SHM files to 0600."""
    if not database_url.startswith("sqlite"):
        return

    db = make_url(database_url).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return
    p = Path(db)
    if not p.parent.is_dir():
        return
    private_file(p)
    for suffix in ("-wal", "-shm", "-journal"):
        side = p.with_name(p.name + suffix)
        if side.exists():
            private_file(side)


def notice(settings: Settings, key_dir: Path) -> str:
    """The start-up line saying where the keys are (``WARNING: ...`` when unsafe)."""
    if settings.unsafe_keys_in_data_dir:
        return "WARNING: " + UNSAFE_WARNING.format(path=key_dir)
    return (
        f"keys in {key_dir} (outside the data directory {settings.data_dir.resolve()}); "
        "back them up separately from the data directory"
    )


def announce(settings: Settings, key_dir: Path) -> str:
    """Log (and return) :func:`notice`: at WARNING when unsafe, else at INFO."""
    msg = notice(settings, key_dir)
    if settings.unsafe_keys_in_data_dir:
        log.warning(msg.removeprefix("WARNING: "))
    else:
        log.info(msg)
    return msg
