"""Python SDK for Share-of-Model (httpx). The CLI uses it; so can you.

>>> from marketplace.sdk import SomClient
>>> client = SomClient("http://127.0.0.1:8600", api_key="som_...")
>>> client.search_offerings(q="cancer")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from marketplace.sdk.errors import SomAPIError

if TYPE_CHECKING:
    from marketplace.sdk.client import SomClient

__all__ = ["SomAPIError", "SomClient"]


def __getattr__(name: str) -> Any:
    # PEP 562: the client (httpx, the crypto stack) loads on first use, not on ``import
    # marketplace.sdk.errors``, so that ``som --help`` starts fast (start-up cost).
    if name == "SomClient":
        from marketplace.sdk.client import SomClient

        return SomClient
    raise AttributeError(f"module 'marketplace.sdk' has no attribute {name!r}")
