"""Errors raised by the ``contracts`` package.

The tree::

    ContractError
    ├── SchemaError (also ValueError)   a dict, record or terms value does not match its schema;
    │                                   the message names the field, what was expected and what came
    ├── ChainError                      a contract event does not follow its chain: wrong contract,
    │                                   wrong predecessor digest or sequence number, a party not
    │                                   entitled to make it, or a transition the state forbids
    ├── UsageError (also ValueError)    an impossible usage transition (commit or release more than
    │                                   is reserved, a reservation from another contract)
    ├── StatementMismatch               two statements of the same contract do not reconcile
    └── ComplianceViolation             a ledger leaf breaks a contract's terms; carries the leaf
                                        ``index`` and a human message

Signatures that do not verify raise :class:`crypto.errors.InvalidSignature`, which is opaque:
it never says which check failed. Bad *arguments* to a function (wrong Python type, a naive
datetime) raise plain ``TypeError``/``ValueError`` before any work.
"""

from __future__ import annotations

__all__ = [
    "ChainError",
    "ComplianceViolation",
    "ContractError",
    "SchemaError",
    "StatementMismatch",
    "UsageError",
]


class ContractError(Exception):
    """Base class of every error raised by ``contracts`` (except opaque signature failures)."""


class SchemaError(ContractError, ValueError):
    """A value does not match its schema; the message says where, what was expected and what came."""


class ChainError(ContractError):
    """A contract event does not follow the contract's event chain."""


class UsageError(ContractError, ValueError):
    """An impossible usage-state transition."""


class StatementMismatch(ContractError):
    """Two statements that should reconcile do not."""


class ComplianceViolation(ContractError):
    """Ledger leaf ``index`` violates a contract (or the record schema)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(f"leaf {index}: {message}")
        self.index = index
        self.message = message
