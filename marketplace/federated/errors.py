"""Errors of the federated engine that the API maps to HTTP (kept free of Flower imports)."""

from __future__ import annotations

__all__ = ["ReplyRefused"]


class ReplyRefused(ValueError):
    """A reply the mailbox will not pass to the coordinator (malformed, unsolicited, replayed)."""
