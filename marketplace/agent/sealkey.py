"""The provider's signed statement vouching for a compute site's sealing key (``som.seal-key/v1``).

For: closing the key-substitution gap of sealed remote jobs on provider-hosted offerings. The
consumer seals its job input to the X25519 key the marketplace names (``seal_public``); a
malicious operator could name its own key and read the input. So the provider signs, with the
same Ed25519 key that signs its offers (and that the consumer's contract therefore carries)::

    {"schema": "som.seal-key/v1", "offering_id": ..., "seal_public": "x25519:...",
     "not_after": "2026-01-02T03:04:05Z"}            # RFC 8785 canonical JSON, then Ed25519

The agent registers the signed statement with the marketplace, which serves it with each job;
the consumer's SDK checks it against the provider key of its own contract *before* sealing
(:func:`verify_seal_key`). The marketplace cannot forge it.

Wire form (what travels and is stored): ``{"statement": {...}, "provider_key": "ed25519:...",
"signature": "<base64>"}``. ``provider_key`` is a hint for the server's sanity checks and for
error messages: verifiers use the key THEY trust, never the carried one.

Not for: marketplace-hosted offerings (there the marketplace's own worker is the compute site and
holds the weights in memory anyway), or key storage (:mod:`marketplace.sdk.contracts_api`
keeps the signing key file). Pure: no network, no DB.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from crypto.canonical import canonicalize
from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.sealing import SealPublicKey
from crypto.signing import SigningKey, VerifyKey, verify

__all__ = [
    "DEFAULT_VALIDITY",
    "SCHEMA",
    "SealKeyStatement",
    "sign_seal_key",
    "verify_seal_key",
]

SCHEMA = "som.seal-key/v1"
DEFAULT_VALIDITY = timedelta(days=7)
"""How long the agent's statements are valid; it re-signs at half-life and on every hello."""
_TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_SIG_RE = re.compile(r"[A-Za-z0-9+/]{86}==")
_STATEMENT_KEYS = {"schema", "offering_id", "seal_public", "not_after"}


def _fmt(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError(f"not_after: expected an aware UTC datetime, got a naive one ({t})")
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class SealKeyStatement:
    """A signed ``som.seal-key/v1`` statement. Build with :func:`sign_seal_key` or :meth:`from_dict`."""

    offering_id: str
    seal_public: str
    provider_key: str
    signature: str
    not_after: datetime | None = None

    def body(self) -> dict[str, Any]:
        """The signed part (RFC 8785 canonical JSON of this is what the signature covers)."""
        out: dict[str, Any] = {"schema": SCHEMA, "offering_id": self.offering_id, "seal_public": self.seal_public}
        if self.not_after is not None:
            out["not_after"] = _fmt(self.not_after)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"statement": self.body(), "provider_key": self.provider_key, "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Any) -> SealKeyStatement:
        """Parse the wire form. Raises ValueError (expected vs got) for anything malformed."""
        if not isinstance(data, Mapping):
            raise ValueError(f"seal-key statement: expected an object, got {type(data).__name__}")
        if set(data) != {"statement", "provider_key", "signature"}:
            raise ValueError(
                f"seal-key statement: expected keys ['provider_key', 'signature', 'statement'], got {sorted(data)}"
            )
        st, pk, sig = data["statement"], data["provider_key"], data["signature"]
        if not isinstance(st, Mapping) or not {"schema", "offering_id", "seal_public"} <= set(st) <= _STATEMENT_KEYS:
            raise ValueError(
                f"seal-key statement: expected statement keys {sorted(_STATEMENT_KEYS)} (not_after optional)"
            )
        if st["schema"] != SCHEMA:
            raise ValueError(f"seal-key statement: expected schema {SCHEMA!r}, got {st['schema']!r}")
        oid, sp = st["offering_id"], st["seal_public"]
        if not isinstance(oid, str) or not 0 < len(oid) <= 64:
            raise ValueError(f"seal-key statement: offering_id must be a string of 1..64 characters, got {oid!r}")
        if not isinstance(sp, str):
            raise ValueError(f"seal-key statement: seal_public must be a string, got {type(sp).__name__}")
        if not isinstance(pk, str):
            raise ValueError(f"seal-key statement: provider_key must be 'ed25519:<base64>', got {type(pk).__name__}")
        try:
            SealPublicKey.from_text(sp)
            VerifyKey.from_text(pk)
        except KeyMaterialError as e:
            raise ValueError(f"seal-key statement: {e}") from e
        if not isinstance(sig, str) or not _SIG_RE.fullmatch(sig):
            raise ValueError("seal-key statement: signature must be 64 bytes in base64")
        not_after = None
        if "not_after" in st:
            na = st["not_after"]
            if not isinstance(na, str) or not _TIME_RE.fullmatch(na):
                raise ValueError(f"seal-key statement: not_after must be like '2026-01-02T03:04:05Z', got {na!r}")
            not_after = datetime.strptime(na, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        return cls(offering_id=oid, seal_public=sp, provider_key=pk, signature=sig, not_after=not_after)


def sign_seal_key(
    signing_key: SigningKey, *, offering_id: str, seal_public: str, not_after: datetime | None = None
) -> SealKeyStatement:
    """The provider vouches that inputs for ``offering_id`` may be sealed to ``seal_public``."""
    if not isinstance(signing_key, SigningKey):
        raise TypeError(f"signing_key: expected crypto.signing.SigningKey, got {type(signing_key).__name__}")
    SealPublicKey.from_text(seal_public)
    if not_after is not None:
        not_after = datetime.strptime(_fmt(not_after), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    unsigned = SealKeyStatement(
        offering_id=offering_id,
        seal_public=seal_public,
        provider_key=signing_key.verify_key.to_text(),
        signature="",
        not_after=not_after,
    )
    sig = base64.b64encode(signing_key.sign(canonicalize(unsigned.body()))).decode()
    return replace(unsigned, signature=sig)


def verify_seal_key(
    statement: SealKeyStatement | Mapping[str, Any] | None,
    *,
    provider_key: str,
    offering_id: str,
    seal_public: str,
    now: datetime | None = None,
) -> None:
    """Return ``None`` if ``statement`` is ``provider_key``'s signature vouching for exactly
    ``seal_public`` on ``offering_id`` and has not expired at ``now``; else raise
    :class:`crypto.errors.InvalidSignature` (opaque: missing, malformed, other key, other
    offering, other sealing key, expired and bad signature all look the same)."""
    now = now or datetime.now(UTC)
    try:
        st = statement if isinstance(statement, SealKeyStatement) else SealKeyStatement.from_dict(statement)
    except ValueError as e:
        raise InvalidSignature("seal-key statement did not verify") from e
    ok = (
        st.offering_id == offering_id
        and st.seal_public == seal_public
        and (st.not_after is None or now <= st.not_after)
    )
    if not ok:
        raise InvalidSignature("seal-key statement did not verify")
    try:
        verify(provider_key, st.signature, canonicalize(st.body()))
    except KeyMaterialError as e:
        raise InvalidSignature("seal-key statement did not verify") from e
