"""Identity, catalog and audit calls."""

from __future__ import annotations

from typing import Any

from marketplace.sdk.base import BaseClient


class CatalogAPI(BaseClient):
    # identity
    def whoami(self) -> dict[str, Any]:
        return dict(self.get_json("/v1/whoami"))

    def create_org(self, name: str) -> dict[str, Any]:
        return dict(self.post_json("/v1/orgs", {"name": name}))

    def list_orgs(self) -> list[dict[str, Any]]:
        return self.paginate("/v1/orgs")

    def create_key(self, org_id: str, roles: list[str], *, name: str = "", ttl_days: int = 365) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/orgs/{org_id}/keys", {"roles": roles, "name": name, "ttl_days": ttl_days}))

    def list_keys(self, org_id: str | None = None) -> list[dict[str, Any]]:
        return self.paginate("/v1/keys", org_id=org_id)

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/keys/{key_id}").json())

    # catalog
    def create_offering(self, **fields: Any) -> dict[str, Any]:
        return dict(self.post_json("/v1/offerings", fields))

    def update_offering(self, offering_id: str, **fields: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/v1/offerings/{offering_id}", json=fields).json())

    def get_offering(self, offering_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/offerings/{offering_id}"))

    def search_offerings(self, **filters: Any) -> list[dict[str, Any]]:
        return self.paginate("/v1/offerings", **filters)

    def upload_version(
        self, offering_id: str, data: bytes, *, format: str, input_shape: list[int] | None = None
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"format": format}
        if input_shape:
            params["input_shape"] = ",".join(str(int(x)) for x in input_shape)
        r = self.request(
            "POST",
            f"/v1/offerings/{offering_id}/versions",
            params=params,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        return dict(r.json())

    def upload_sklearn(
        self, offering_id: str, estimator: Any, *, format: str = "npz", check_rows: Any = None
    ) -> dict[str, Any]:
        """Convert a fitted scikit-learn estimator locally, check it, and upload it as a new version.

        The estimator never leaves this process as a pickle: only its parameters, as the declarative
        artifact of :mod:`marketplace.sdk.convert`. ``check_rows`` (n, d) default to probe rows around
        the pipeline's scaler. Raises ``UnsupportedModel`` (a ValueError) before anything is sent.
        """
        from marketplace.sdk import convert  # numpy-heavy; only for providers who call it

        art = convert.from_estimator(estimator, format=format)  # type: ignore[arg-type]
        rows = convert.probe_rows(estimator, art.input_dim) if check_rows is None else check_rows
        art = convert.check_artifact(art, estimator, rows)
        return self.upload_version(offering_id, art.data, format=art.format, input_shape=art.input_shape)

    def upload_torch(self, offering_id: str, module: Any, *, format: str = "npz") -> dict[str, Any]:
        """Convert a ``torch.nn.Sequential`` locally and upload it (needs the ``torch`` extra)."""
        from marketplace.sdk import convert  # lazy: numpy-heavy, only for providers who call it

        art = convert.from_torch(module, format=format)  # type: ignore[arg-type]
        return self.upload_version(offering_id, art.data, format=art.format, input_shape=art.input_shape)

    def list_versions(self, offering_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/v1/offerings/{offering_id}/versions"))

    def publish(self, offering_id: str) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/offerings/{offering_id}/publish"))

    def withdraw(self, offering_id: str) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/offerings/{offering_id}/withdraw"))

    # audit
    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        return self.paginate("/v1/audit", **filters)
