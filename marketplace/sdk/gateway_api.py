"""SDK: plaintext inference through the gateway (``POST /v1/offerings/{id}/predict``).

``predict(offering, rows)`` sends the rows as JSON (``{"rows": [[...], ...]}``) and returns the
predictions as a float64 array of shape (n, k); ``predict_csv`` sends CSV bytes and returns the
CSV answer. Both set ``last_receipt`` (the usage receipt, verifiable offline), ``last_usage_id``
and ``last_timing`` (the ``Server-Timing`` durations in ms). A retry with the same
``idempotency_key`` returns the first answer and is charged once.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np

from marketplace.sdk.base import BaseClient
from marketplace.sdk.he_api import decode_receipt

__all__ = ["GatewayAPI", "parse_server_timing"]


def parse_server_timing(header: str | None) -> dict[str, float]:
    """``"queue;dur=0.1, model;dur=0.02"`` -> ``{"queue": 0.1, "model": 0.02}`` (ms)."""
    out: dict[str, float] = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        for param in rest.split(";"):
            k, _, v = param.strip().partition("=")
            if k == "dur" and name:
                with contextlib.suppress(ValueError):
                    out[name] = float(v)
    return out


class GatewayAPI(BaseClient):
    last_receipt: dict[str, Any] | None = None
    last_usage_id: str | None = None
    last_timing: dict[str, float] | None = None

    def _gateway(
        self,
        offering_id: str,
        content: bytes,
        content_type: str,
        *,
        idempotency_key: str | None,
        contract_id: str | None,
    ) -> httpx.Response:
        headers = {
            "Content-Type": content_type,
            "Accept": content_type,
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }
        if contract_id:
            headers["X-Som-Contract"] = contract_id
        r = self.request("POST", f"/v1/offerings/{offering_id}/predict", content=content, headers=headers)
        self.last_receipt = decode_receipt(r.headers.get("x-som-receipt"))
        self.last_usage_id = r.headers.get("x-som-usage-id")
        self.last_timing = parse_server_timing(r.headers.get("server-timing"))
        return r

    def predict(
        self,
        offering: str,
        rows: np.ndarray | Sequence[Sequence[float]],
        *,
        idempotency_key: str | None = None,
        contract_id: str | None = None,
    ) -> np.ndarray:
        """Predictions for ``rows`` (n, d) as an (n, k) float64 array (one unit per row)."""
        x = np.asarray(rows, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        body = json.dumps({"rows": x.tolist()}, allow_nan=True).encode()
        r = self._gateway(offering, body, "application/json", idempotency_key=idempotency_key, contract_id=contract_id)
        return np.asarray(r.json()["outputs"], dtype=np.float64)

    def predict_csv(
        self,
        offering: str,
        csv_bytes: bytes,
        *,
        idempotency_key: str | None = None,
        contract_id: str | None = None,
    ) -> bytes:
        """Send CSV rows; the CSV answer (header ``y0,...``)."""
        r = self._gateway(offering, csv_bytes, "text/csv", idempotency_key=idempotency_key, contract_id=contract_id)
        return r.content
