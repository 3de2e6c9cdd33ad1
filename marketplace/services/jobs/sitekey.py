"""The marketplace's own compute-site sealing key: what consumers seal marketplace-hosted inputs to.

For: :func:`marketplace_seal_key` (made on first use, atomically, shared by replicas).
Not for: provider agents' keys (:func:`marketplace.services.agents.sealing_key_for`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from crypto.sealing import SealKeyPair
from marketplace.custody import SEAL_KEY_FILE
from marketplace.runtime import Runtime

__all__ = ["marketplace_seal_key"]


def marketplace_seal_key(rt: Runtime) -> SealKeyPair:
    """The worker's sealing key pair (``<key_dir>/job_seal.key``, 0600, made on first use; the key
    directory is outside the data directory, :mod:`marketplace.custody`)."""
    if rt.job_seal_key is not None:
        return rt.job_seal_key
    path = Path(rt.key_dir) / SEAL_KEY_FILE
    try:
        kp = SealKeyPair.from_private_bytes(path.read_bytes())
    except FileNotFoundError:
        # Write a complete key to a private temp file, then link it into place: atomic, and when
        # several replicas race on first use exactly one key wins and everyone reads that one.
        kp = SealKeyPair.generate()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(kp.unsafe_private_bytes())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            kp = SealKeyPair.from_private_bytes(path.read_bytes())
        finally:
            tmp.unlink(missing_ok=True)
    rt.job_seal_key = kp
    return kp
