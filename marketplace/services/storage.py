"""Per-organisation storage quota: what an organisation keeps in the marketplace's store.

For: refusing (413) a model upload or a job submission that would take an organisation past
``SOM_ORG_STORAGE_QUOTA_MB``. Counted per organisation: the model versions of its offerings
(plaintext size of each uploaded artifact, which its envelope ciphertext matches to a few bytes),
the sealed inputs of its jobs that are still stored (a job's input is deleted when the job becomes
final) and the sealed results of its jobs that are still stored (deleted when they expire).
Not for: the blob store itself (:mod:`marketplace.services.blobstore`), per-request size limits
(``SOM_MAX_UPLOAD_BYTES``, ``SOM_MAX_SEALED_BYTES``) or metering.

The check runs before the bytes are stored, in its own short transaction: uploads racing each
other may together overshoot the quota by at most one payload each.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from marketplace.db.models import Offering, OfferingVersion
from marketplace.db.models_jobs import Job
from marketplace.errors import PayloadTooLarge
from marketplace.runtime import Runtime

__all__ = ["check_quota", "used_bytes"]

_MB = 1 << 20


def used_bytes(s: Session, org_id: str) -> int:
    """Bytes the organisation ``org_id`` keeps stored (see the module docstring)."""
    models = s.scalar(
        select(func.coalesce(func.sum(OfferingVersion.size), 0))
        .join(Offering, Offering.id == OfferingVersion.offering_id)
        .where(Offering.org_id == org_id)
    )
    inputs = s.scalar(
        select(func.coalesce(func.sum(Job.input_size), 0)).where(Job.org_id == org_id, Job.input_blob != "")
    )
    results = s.scalar(
        select(func.coalesce(func.sum(Job.result_size), 0)).where(Job.org_id == org_id, Job.result_blob.is_not(None))
    )
    return int(models or 0) + int(inputs or 0) + int(results or 0)


def check_quota(rt: Runtime, s: Session, org_id: str, adding: int, *, what: str) -> None:
    """Raise :class:`PayloadTooLarge` (413) if storing ``adding`` more bytes for ``org_id`` would
    exceed the organisation's quota. A quota of 0 means no quota."""
    quota_mb = int(rt.settings.org_storage_quota_mb)
    if quota_mb <= 0:
        return
    used = used_bytes(s, org_id)
    if used + adding > quota_mb * _MB:
        raise PayloadTooLarge(
            f"storage quota exceeded: {what} ({adding} bytes) would bring your organisation to "
            f"{used + adding} bytes, beyond its quota of {quota_mb} MiB ({used} bytes in use); "
            f"finished jobs free their inputs, expired results free theirs"
        )
