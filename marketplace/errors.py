"""Errors of the marketplace service, each mapped to one HTTP status by one handler.

The tree::

    MarketplaceError                 500 internal (never raised on purpose)
    ├── Unauthenticated              401 missing, unknown, expired or revoked API key
    ├── Forbidden                    403 authenticated but the role does not allow it
    ├── NotFound                     404 no such object, or one you may not see
    ├── Conflict                     409 state does not allow it (already revoked, ...)
    ├── Invalid                      422 well-formed request with bad values
    ├── PayloadTooLarge              413 body or upload over its limit
    ├── UnsupportedMediaType         415 wrong content type or artifact format (a pickle)
    ├── PolicyDenied                 403/429 the contract does not allow this use (reason named)
    ├── Throttled                    429 too many failed authentications (Retry-After)
    └── Unavailable                  503 a dependency (agent, worker) is not there now
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "Conflict",
    "Forbidden",
    "Invalid",
    "MarketplaceError",
    "NotFound",
    "PayloadTooLarge",
    "PolicyDenied",
    "Unauthenticated",
    "Throttled",
    "Unavailable",
    "UnsupportedMediaType",
]


class MarketplaceError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal"

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, denied: str | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.extra = extra
        # A failed authorization on this target: the error handler records an ``authz.denied``
        # audit event after the request's transaction has ended (never inside it: SQLite has one writer).
        self.denied = denied


class Unauthenticated(MarketplaceError):
    status = 401
    code = "unauthenticated"


class Forbidden(MarketplaceError):
    status = 403
    code = "forbidden"


class NotFound(MarketplaceError):
    status = 404
    code = "not_found"


class Conflict(MarketplaceError):
    status = 409
    code = "conflict"


class Invalid(MarketplaceError):
    status = 422
    code = "invalid"


class PayloadTooLarge(MarketplaceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(MarketplaceError):
    status = 415
    code = "unsupported_media_type"


class PolicyDenied(MarketplaceError):
    """A contract policy denial; ``reason`` is the named reason from ``contracts.policy``.

    ``contract_id`` names the contract that denied the use (shown to the caller, a party to it).
    The denial is audited (``authz.denied`` with the reason) by whoever decided it
    (:func:`marketplace.services.metering.begin`), so ``denied`` stays unset here: the generic
    handler's event would carry no reason and count the denial twice.
    """

    status = 403
    code = "policy_denied"

    def __init__(
        self, message: str, *, reason: str, retry_after: float | None = None, contract_id: str | None = None
    ) -> None:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))
        super().__init__(message, headers=headers, reason=reason, contract_id=contract_id)
        self.reason = reason
        self.contract_id = contract_id
        if reason == "rate_limited":
            self.status = 429  # type: ignore[misc]


class Throttled(MarketplaceError):
    """Too many failed authentications from this client or for this key prefix; carries Retry-After."""

    status = 429
    code = "too_many_requests"


class Unavailable(MarketplaceError):
    status = 503
    code = "unavailable"
