"""The tamper-evident usage ledger: an RFC 9162 Merkle tree in the DB, signed checkpoints,
proofs and receipts.

=====================  ==============================================================
module                 holds
=====================  ==============================================================
``ledger.tree``        the sequencer, appends, the stored frontier and nodes, proofs, reads
``ledger.checkpoints`` the log key, signing checkpoints (after re-verifying the history),
                       receipts, the background :class:`Checkpointer`
=====================  ==============================================================

Callers use the names below (``from marketplace.services import ledger``; ``ledger.append``).
Audit events become leaves in :func:`marketplace.services.audit.emit`; the runtime owns the
log signer and the checkpointer (:class:`marketplace.runtime.Runtime`). Not for: what a leaf
means (:mod:`contracts.compliance`), offline verification (``crypto.logverify``), HTTP
(``marketplace.api.routes_ledger``).
"""

from __future__ import annotations

from marketplace.services.ledger.checkpoints import (
    Checkpointer,
    StoredCheckpoint,
    check_kept,
    check_on_start,
    checkpoint_at,
    latest_checkpoint,
    latest_or_sign,
    load_log_signer,
    receipt,
    sign_checkpoint,
    vkey,
)
from marketplace.services.ledger.tree import (
    LeafRef,
    LedgerIntegrityError,
    append,
    append_many,
    consistency_proof,
    find_leaf,
    inclusion_proof,
    iter_leaves,
    leaf_row,
    root_at,
    tree_size,
)

__all__ = [
    "Checkpointer",
    "LeafRef",
    "LedgerIntegrityError",
    "StoredCheckpoint",
    "append",
    "append_many",
    "checkpoint_at",
    "consistency_proof",
    "find_leaf",
    "inclusion_proof",
    "iter_leaves",
    "latest_checkpoint",
    "latest_or_sign",
    "leaf_row",
    "check_kept",
    "check_on_start",
    "load_log_signer",
    "receipt",
    "root_at",
    "sign_checkpoint",
    "tree_size",
    "vkey",
]
