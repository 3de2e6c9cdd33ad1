"""Catalog: offerings, their versions, and model artifacts encrypted at rest.

An uploaded artifact is validated (size, format, declared input shape, supported operators; an
``.npz`` from its zip metadata and ``.npy`` headers before decompression, ONNX external data
refused: see :mod:`crypto.safe_arrays` and :func:`crypto.he.onnx_import.load_onnx`) off the event
loop and outside any transaction (:func:`prepare_version`),
its SHA-256 becomes the version digest, and it is stored envelope-encrypted (fresh AES-256-GCM
data key per version, wrapped by the key-encryption key) in the content-addressed blob store.
The plaintext is never written anywhere: not to disk, the DB or the logs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import String, cast, func, or_, select
from sqlalchemy.orm import Session

from crypto.envelope import WrappedKey, encrypt_artifact
from crypto.envelope import decrypt_artifact as _dec
from crypto.errors import HEError
from marketplace.db.base import new_id, utcnow
from marketplace.db.models import Artifact, Hosting, Offering, OfferingStatus, OfferingVersion
from marketplace.db.paging import Window, page_scalars
from marketplace.errors import Conflict, Invalid, NotFound, PayloadTooLarge, UnsupportedMediaType
from marketplace.runtime import Runtime
from marketplace.services import audit, sharing, storage, validation
from marketplace.services.identity import Principal

__all__ = [
    "PreparedVersion",
    "add_version",
    "check_uploadable",
    "commit_version",
    "decrypt_artifact",
    "get_owned",
    "get_visible",
    "latest_version",
    "prepare_version",
    "search",
    "set_status",
    "store_artifact",
]

PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def get_visible(s: Session, p: Principal, offering_id: str) -> Offering:
    """An offering the caller may read (:func:`marketplace.services.sharing.may`); others are a
    404 audited as a denied access."""
    return sharing.check(s, p, offering_id, sharing.Permission.READ)


def get_owned(s: Session, p: Principal, offering_id: str, permission: str = "write") -> Offering:
    """An offering of the caller's organisation its teams may ``permission`` on (provider role
    checked by the caller; :func:`marketplace.services.sharing.check`)."""
    off = sharing.check(s, p, offering_id, permission)
    if off.org_id != p.org_id:
        raise NotFound(f"offering {offering_id} not found", denied=offering_id)
    return off


def search(
    s: Session,
    p: Principal,
    *,
    q: str | None,
    task: str | None,
    tag: str | None,
    hosting: str | None,
    org_id: str | None,
    status: str | None,
    page: Window,
) -> tuple[list[Offering], int]:
    stmt = select(Offering).where(sharing.readable_clause(s, p))
    if q:
        like = f"%{q.lower()}%"
        stmt = stmt.where(or_(func.lower(Offering.name).like(like), func.lower(Offering.description).like(like)))
    if task:
        stmt = stmt.where(Offering.task == task)
    if hosting:
        stmt = stmt.where(Offering.hosting == hosting)
    if org_id:
        stmt = stmt.where(Offering.org_id == org_id)
    if status:
        stmt = stmt.where(Offering.status == status)
    if tag:
        # tags is a JSON list of strings stored as its JSON text on both backends; the quoted,
        # escaped element can only match a whole element.
        needle = json.dumps(tag).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(cast(Offering.tags, String).like(f"%{needle}%", escape="\\"))
    return page_scalars(s, stmt.order_by(Offering.created_at, Offering.id), page)


#: to -> the states an offering may come from
_TRANSITIONS: dict[OfferingStatus, frozenset[OfferingStatus]] = {
    OfferingStatus.PUBLISHED: frozenset({OfferingStatus.DRAFT, OfferingStatus.WITHDRAWN}),
    OfferingStatus.WITHDRAWN: frozenset({OfferingStatus.PUBLISHED, OfferingStatus.DRAFT}),
}


def set_status(s: Session, off: Offering, status: OfferingStatus, who: audit.Actor) -> Offering:
    """Publish or withdraw ``off`` (the one function every catalog transition goes through);
    Conflict when :data:`_TRANSITIONS` does not allow it."""
    if off.status not in _TRANSITIONS[status]:
        raise Conflict(f"offering {off.id} is {off.status}; cannot become {status}")
    if status is OfferingStatus.PUBLISHED and off.hosting == Hosting.MARKETPLACE and latest_version(s, off.id) is None:
        raise Conflict("upload a model version before publishing a marketplace-hosted offering")
    if status is OfferingStatus.PUBLISHED:
        validation.check_publishable(s, off)  # a failed validation report refuses with its reason
    off.status = status
    off.updated_at = utcnow()
    audit.emit(s, who, f"offering.{'publish' if status is OfferingStatus.PUBLISHED else 'withdraw'}", target=off.id)
    return off


def latest_version(s: Session, offering_id: str) -> OfferingVersion | None:
    return s.scalar(
        select(OfferingVersion)
        .where(OfferingVersion.offering_id == offering_id)
        .order_by(OfferingVersion.number.desc())
        .limit(1)
    )


def _validate(
    data: bytes, fmt: str, input_shape: list[int], max_bytes: int, *, max_decompressed: int
) -> dict[str, Any]:
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"artifact of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    if not data:
        raise Invalid("empty artifact")
    if data[:2] in PICKLE_MAGIC or data[:1] == b"\x80":
        raise UnsupportedMediaType(
            "pickled artifacts are refused (loading one runs its author's code); upload ONNX or an .npz of arrays"
        )
    if fmt not in ("onnx", "npz"):
        raise UnsupportedMediaType(f"format must be 'onnx' or 'npz', got {fmt!r}")
    # start-up cost: crypto.he loads TenSEAL (about a second); only uploads need it
    from crypto.he import validate_artifact

    try:
        info = validate_artifact(data, fmt, max_bytes=max_bytes, max_decompressed=max_decompressed)
    except HEError as e:
        raise Invalid(f"artifact refused: {e}") from e
    except ValueError as e:
        msg = str(e)
        if "pickle" in msg.lower() or "object arrays" in msg.lower():
            raise UnsupportedMediaType(f"artifact refused: {msg}") from e
        raise Invalid(f"artifact refused: {msg}") from e
    info_d: dict[str, Any] = info.to_dict() if hasattr(info, "to_dict") else dict(vars(info))
    declared = int(info_d.get("input_dim", 0))
    if input_shape and (len(input_shape) != 1 or input_shape[0] != declared):
        raise Invalid(f"declared input_shape {input_shape} does not match the model's input [{declared}]")
    return info_d


def store_artifact(rt: Runtime, s: Session, version: OfferingVersion, purpose: str, plaintext: bytes) -> Artifact:
    """Encrypt ``plaintext`` under a fresh data key and store it; returns the Artifact row."""
    aad = f"som:{version.id}:{purpose}"
    ciphertext, wrapped = encrypt_artifact(plaintext, provider=rt.key_provider, aad=aad.encode())
    addr = rt.blobs.put(ciphertext)
    art = Artifact(
        version_id=version.id,
        purpose=purpose,
        blob=addr,
        wrapped_key=wrapped.to_json().encode(),
        kek_id=wrapped.kek_id,
        aad=aad,
    )
    s.add(art)
    s.flush()
    return art


def decrypt_artifact(rt: Runtime, art: Artifact) -> bytes:
    """Decrypt an artifact in memory (callers emit ``artifact.decrypt`` audit events)."""
    wrapped = WrappedKey.from_json(art.wrapped_key.decode())
    return _dec(rt.blobs.get(art.blob), wrapped, provider=rt.key_provider, aad=art.aad.encode())


def check_uploadable(off: Offering) -> None:
    """Raise Conflict unless model versions may be uploaded to ``off`` (marketplace-hosted)."""
    if off.hosting != Hosting.MARKETPLACE:
        raise Conflict(
            "this offering is provider-hosted: its weights stay with the provider agent and are never uploaded"
        )


@dataclass(frozen=True)
class PreparedVersion:
    """An upload validated and envelope-encrypted (ciphertext already in the blob store), not yet in the DB."""

    version_id: str
    fmt: str
    digest: str
    size: int
    info: dict[str, Any]
    blob: str
    wrapped_key: bytes
    kek_id: str
    aad: str
    report: dict[str, Any] | None = None  # the upload's validation report (services.validation)


def prepare_version(rt: Runtime, data: bytes, *, fmt: str, input_shape: list[int]) -> PreparedVersion:
    """Validate ``data`` and encrypt it under a fresh data key: the CPU work of an upload.

    Takes no DB session: call it outside any transaction and off the event loop. Raises
    PayloadTooLarge, UnsupportedMediaType or Invalid (every parser error is one of these)."""
    info = _validate(
        data, fmt, input_shape, rt.settings.max_upload_bytes, max_decompressed=rt.settings.max_decompressed_bytes
    )
    version_id = new_id("ver")
    aad = f"som:{version_id}:model"
    ciphertext, wrapped = encrypt_artifact(data, provider=rt.key_provider, aad=aad.encode())
    addr = rt.blobs.put(ciphertext)
    return PreparedVersion(
        version_id=version_id,
        fmt=fmt,
        digest="sha256:" + hashlib.sha256(data).hexdigest(),
        size=len(data),
        info=info,
        blob=addr,
        wrapped_key=wrapped.to_json().encode(),
        kek_id=wrapped.kek_id,
        aad=aad,
        report=validation.upload_report(data, fmt, info),
    )


def commit_version(s: Session, off: Offering, prep: PreparedVersion, *, who: audit.Actor) -> OfferingVersion:
    """Record a prepared version (short: no parsing or crypto here)."""
    check_uploadable(off)
    number = (s.scalar(select(func.max(OfferingVersion.number)).where(OfferingVersion.offering_id == off.id)) or 0) + 1
    version = OfferingVersion(
        id=prep.version_id,
        offering_id=off.id,
        number=number,
        format=prep.fmt,
        digest=prep.digest,
        size=prep.size,
        input_shape=[int(prep.info.get("input_dim", 0))],
        info=prep.info,
        validation=prep.report,
    )
    s.add(version)
    s.flush()
    s.add(
        Artifact(
            version_id=version.id,
            purpose="model",
            blob=prep.blob,
            wrapped_key=prep.wrapped_key,
            kek_id=prep.kek_id,
            aad=prep.aad,
        )
    )
    s.flush()
    off.updated_at = utcnow()
    audit.emit(s, who, "offering.version.add", target=f"{off.id}/v{number}", detail={"digest": version.digest})
    return version


def add_version(
    rt: Runtime,
    s: Session,
    off: Offering,
    data: bytes,
    *,
    fmt: str,
    input_shape: list[int],
    who: audit.Actor,
) -> OfferingVersion:
    """Validate, encrypt and record in one go (inside the caller's transaction: for scripts and
    tests; the upload route uses :func:`prepare_version` then :func:`commit_version`)."""
    check_uploadable(off)
    storage.check_quota(rt, s, off.org_id, len(data), what="this model version")  # before parsing it
    return commit_version(s, off, prepare_version(rt, data, fmt=fmt, input_shape=input_shape), who=who)
