"""SDK: federations (create, join, start, status, rounds, receipts) and the participant loop's
two calls (long-poll the coordinator's next Flower message, post the reply)."""

from __future__ import annotations

from typing import Any

from marketplace.sdk.base import BaseClient

__all__ = ["FederationsAPI"]


class FederationsAPI(BaseClient):
    def create_federation(
        self,
        offering_id: str,
        recipe: dict[str, Any],
        *,
        terms: dict[str, Any] | None = None,
        name: str = "",
        parent_version_id: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "offering_id": offering_id,
            "recipe": recipe,
            "terms": terms or {},
            "name": name,
            "parent_version_id": parent_version_id,
        }
        return dict(self.post_json("/v1/federations", body))

    def join_federation(self, fed_id: str, *, samples: int) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/federations/{fed_id}/join", {"samples": samples}))

    def start_federation(self, fed_id: str) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/federations/{fed_id}/start"))

    def federation(self, fed_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/federations/{fed_id}"))

    def federations(self) -> list[dict[str, Any]]:
        return list(self.get_json("/v1/federations"))

    def federation_rounds(self, fed_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/v1/federations/{fed_id}/rounds"))

    def federation_receipts(self, fed_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/v1/federations/{fed_id}/receipts"))

    def federation_next(self, fed_id: str, wait: float = 20.0) -> tuple[bytes | None, str]:
        """The coordinator's next message for this organisation (or None) and the federation's status."""
        r = self.request("POST", f"/v1/federations/{fed_id}/messages/next", json={"wait": wait}, timeout=wait + 30.0)
        status = r.headers.get("X-Som-Federation-Status", "")
        return (r.content if r.status_code == 200 else None), status

    def federation_reply(self, fed_id: str, data: bytes) -> dict[str, Any]:
        r = self.request(
            "POST",
            f"/v1/federations/{fed_id}/replies",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return dict(r.json())
