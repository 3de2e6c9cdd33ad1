"""The SDK client: one class composed of per-feature mixins (``*_api.py`` in this package)."""

from __future__ import annotations

from marketplace.sdk.base import SomAPIError
from marketplace.sdk.catalog_api import CatalogAPI

__all__ = ["SomAPIError", "SomClient"]


class SomClient(CatalogAPI):
    """Talks to a Share-of-Model server. ``transport=`` accepts an ``httpx`` test transport."""
