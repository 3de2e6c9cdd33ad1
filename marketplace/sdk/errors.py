"""The SDK's one error type (no I/O imports, so the CLI can catch it without loading httpx)."""

from __future__ import annotations

from typing import Any

__all__ = ["SomAPIError"]


class SomAPIError(Exception):
    """The API answered with an error ``{"error": {"code", "message"}}``."""

    def __init__(
        self, status: int, code: str, message: str, body: dict[str, Any] | None = None, headers: Any = None
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}
        self.headers = dict(headers or {})
