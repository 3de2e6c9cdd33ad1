"""The SDK client: one class composed of per-feature mixins (``*_api.py`` in this package)."""

from __future__ import annotations

from marketplace.sdk.base import SomAPIError
from marketplace.sdk.catalog_api import CatalogAPI
from marketplace.sdk.contracts_api import ContractsAPI
from marketplace.sdk.federations_api import FederationsAPI
from marketplace.sdk.gateway_api import GatewayAPI
from marketplace.sdk.he_api import HEAPI
from marketplace.sdk.jobs_api import JobsAPI
from marketplace.sdk.ledger_api import LedgerAPI
from marketplace.sdk.sharing_api import SharingAPI

__all__ = ["SomAPIError", "SomClient"]


class SomClient(CatalogAPI, LedgerAPI, HEAPI, ContractsAPI, JobsAPI, FederationsAPI, GatewayAPI, SharingAPI):
    """Talks to a Share-of-Model server. ``transport=`` accepts an ``httpx`` test transport."""
