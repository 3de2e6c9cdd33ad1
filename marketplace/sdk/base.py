"""HTTP plumbing shared by the SDK's feature mixins."""

from __future__ import annotations

from typing import Any

import httpx

from marketplace.sdk.errors import SomAPIError
from marketplace.sdk.retry import DEFAULT_RETRY, RetryPolicy, send_with_retries

__all__ = ["BaseClient", "SomAPIError"]


class BaseClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        http: httpx.Client | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
    ) -> None:
        headers = {"User-Agent": "som-sdk/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.retry = retry  # for charged requests sent with an Idempotency-Key (marketplace.sdk.retry)
        self._http = http or httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)
        if http is not None and api_key:
            self._http.headers.update(headers)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        if r.status_code < 400:
            return
        try:
            body = r.json()
            err = body.get("error", {})
            code, message = str(err.get("code", "http_error")), str(err.get("message", r.text))
        except ValueError:
            body, code, message = {}, "http_error", r.text[:500]
        raise SomAPIError(r.status_code, code, message, body, r.headers)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        self._raise(r)
        return r

    def request_idempotent(self, method: str, path: str, idempotency_key: str, **kw: Any) -> httpx.Response:
        """Send a request carrying ``idempotency_key``, retrying lost answers, timeouts, 503 and
        409-in-progress with the same key (``self.retry``): the server answers a retry of a
        charged request with its first answer."""
        headers = {**kw.pop("headers", {}), "Idempotency-Key": idempotency_key}
        r = send_with_retries(lambda: self._http.request(method, path, headers=headers, **kw), self.retry)
        self._raise(r)
        return r

    def get_json(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

    def post_json(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, json=body, **kw).json()

    def paginate(self, path: str, *, limit: int = 100, **params: Any) -> list[Any]:
        """Fetch every page of a list endpoint."""
        out: list[Any] = []
        offset: int | None = 0
        while offset is not None:
            page = self.get_json(path, limit=limit, offset=offset, **params)
            out.extend(page["items"])
            offset = page.get("next_offset")
        return out
