"""SDK: the usage ledger (checkpoints, proofs, leaves, export, receipts) and offline receipt checks.

:func:`verify_receipt` needs only ``crypto``: a consumer holding a receipt and the log's vkey can
check it without the server. The vkey is the caller's trust root, obtained out of band (or pinned
on first use); a receipt carries no key of its own, and none from the server that issued it is
taken on faith.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Mapping
from typing import Any

from crypto.checkpoint import Checkpoint, open_checkpoint
from crypto.errors import InvalidProof
from crypto.merkle import leaf_hash, verify_inclusion
from crypto.note import NoteVerifier
from marketplace.sdk.base import BaseClient

__all__ = ["LedgerAPI", "decode_receipt_header", "verify_receipt"]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"receipt.{what}: expected a base64 string, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as e:
        raise ValueError(f"receipt.{what}: not base64") from e


def verify_receipt(receipt: Mapping[str, Any], trusted_vkey: str, *, origin: str | None = None) -> Checkpoint:
    """Check a receipt offline against the log key the caller trusts; return the checkpoint it is
    anchored in.

    ``trusted_vkey`` (required) is the log's C2SP vkey obtained out of band, never one that came
    with the receipt. ``origin`` is the log's expected origin (default: the key's name).
    Checks the trusted key's signature on the checkpoint and its origin, that ``leaf_hash`` is the RFC 9162 hash of
    ``leaf``, and the inclusion proof of ``index`` against the checkpoint's size and root.
    Raises ``ValueError`` for a malformed receipt, :class:`crypto.errors.InvalidSignature` or
    :class:`crypto.errors.InvalidProof` if it does not verify.
    """
    if not isinstance(receipt, Mapping):
        raise ValueError(f"receipt: expected a JSON object, got {type(receipt).__name__}")
    missing = {"index", "leaf", "leaf_hash", "inclusion_proof", "checkpoint"} - set(receipt)
    if missing:
        raise ValueError(f"receipt: missing {sorted(missing)}")
    index = receipt["index"]
    if type(index) is not int or index < 0:
        raise ValueError(f"receipt.index: expected an int >= 0, got {index!r}")
    leaf = _b64(receipt["leaf"], "leaf")
    claimed = _b64(receipt["leaf_hash"], "leaf_hash")
    proof_in = receipt["inclusion_proof"]
    if not isinstance(proof_in, list):
        raise ValueError("receipt.inclusion_proof: expected a list of base64 hashes")
    proof = [_b64(h, "inclusion_proof[]") for h in proof_in]
    note = receipt["checkpoint"]
    if not isinstance(note, str):
        raise ValueError("receipt.checkpoint: expected the signed note text")
    if not isinstance(trusted_vkey, str) or not trusted_vkey.strip():
        raise ValueError("trusted_vkey: the log's vkey obtained out of band is required")
    verifier = NoteVerifier.from_vkey(trusted_vkey)
    cp = open_checkpoint(note.encode(), verifier, origin=verifier.name if origin is None else origin)
    h = leaf_hash(leaf)
    if h != claimed:
        raise InvalidProof("receipt leaf hash does not match its leaf")
    verify_inclusion(h, index, cp.size, proof, cp.root_hash)
    return cp


def decode_receipt_header(value: str) -> dict[str, Any]:
    """The receipt carried in an ``X-Som-Receipt`` header (base64url of canonical JSON)."""
    pad = "=" * (-len(value) % 4)
    obj = json.loads(base64.urlsafe_b64decode(value + pad))
    if not isinstance(obj, dict):
        raise ValueError("X-Som-Receipt is not a JSON object")
    return obj


class LedgerAPI(BaseClient):
    def ledger_key(self) -> str:
        """The log's vkey text."""
        return self.request("GET", "/v1/ledger/key").text.strip()

    def ledger_checkpoint(self) -> bytes:
        """The latest signed checkpoint note, exactly as served."""
        return self.request("GET", "/v1/ledger/checkpoint").content

    def ledger_checkpoints(self) -> list[dict[str, Any]]:
        return self.paginate("/v1/ledger/checkpoints", limit=200)

    def sign_ledger_checkpoint(self) -> dict[str, Any]:
        out: dict[str, Any] = self.post_json("/v1/ledger/checkpoints")
        return out

    def ledger_leaves(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.get_json("/v1/ledger/leaves", start=start, end=end)
        return out

    def inclusion_proof(
        self, *, index: int | None = None, leaf_hash: str | None = None, size: int | None = None
    ) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("/v1/ledger/proof/inclusion", index=index, leaf_hash=leaf_hash, size=size)
        return out

    def consistency_proof(self, size1: int, size2: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json("/v1/ledger/proof/consistency", size1=size1, size2=size2)
        return out

    def ledger_receipt(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json(f"/v1/ledger/receipts/{index}")
        return out

    def ledger_export_lines(self, *, size: int | None = None) -> Iterator[bytes]:
        """Stream the export's JSONL lines (``{"index", "leaf"}``)."""
        params = {} if size is None else {"size": size}
        with self._http.stream("GET", "/v1/ledger/export", params=params) as r:
            if r.status_code >= 400:
                r.read()
                self._raise(r)
            for line in r.iter_lines():
                if line:
                    yield line.encode()

    def ledger_usage(self, **filters: Any) -> list[dict[str, Any]]:
        """Usage leaves matching the filters (contract_id, consumer_org, provider_org,
        offering_id, mode, outcome, since, until)."""
        return self.paginate("/v1/ledger/usage", limit=200, **filters)

    def ledger_totals(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.get_json("/v1/ledger/totals")
        return out
