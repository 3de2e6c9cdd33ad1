"""Python SDK for Share-of-Model (httpx). The CLI uses it; so can you.

>>> from marketplace.sdk import SomClient
>>> client = SomClient("http://127.0.0.1:8600", api_key="som_...")
>>> client.search_offerings(q="cancer")
"""

from marketplace.sdk.client import SomAPIError, SomClient

__all__ = ["SomAPIError", "SomClient"]
