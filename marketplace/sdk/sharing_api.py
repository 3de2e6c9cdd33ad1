"""Teams, grants, visibility, private offers, an offering's audit trail, version validation."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Any

from contracts.offer import make_offer
from contracts.terms import Terms
from crypto.signing import SigningKey
from marketplace.sdk.base import BaseClient


class SharingAPI(BaseClient):
    # teams
    def create_team(self, name: str) -> dict[str, Any]:
        return dict(self.post_json("/v1/teams", {"name": name}))

    def list_teams(self) -> list[dict[str, Any]]:
        return list(self.get_json("/v1/teams"))

    def get_team(self, team: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/teams/{team}"))

    def add_team_member(self, team: str, member_id: str) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/teams/{team}/members", {"member_id": member_id}))

    def remove_team_member(self, team: str, member_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/v1/teams/{team}/members/{member_id}").json())

    # grants and visibility
    def grant(
        self, offering_id: str, *, org_id: str | None = None, team_id: str | None = None, permission: str = "read"
    ) -> dict[str, Any]:
        body = {"org_id": org_id, "team_id": team_id, "permission": permission}
        return dict(self.post_json(f"/v1/offerings/{offering_id}/grants", body))

    def list_grants(self, offering_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/v1/offerings/{offering_id}/grants"))

    def revoke_grant(self, offering_id: str, grant_id: str) -> None:
        self.request("DELETE", f"/v1/offerings/{offering_id}/grants/{grant_id}")

    def set_visibility(self, offering_id: str, visibility: str) -> dict[str, Any]:
        return dict(
            self.request("PUT", f"/v1/offerings/{offering_id}/visibility", json={"visibility": visibility}).json()
        )

    def offering_audit(self, offering_id: str, *, action: str | None = None) -> list[dict[str, Any]]:
        return self.paginate(f"/v1/offerings/{offering_id}/audit", action=action)

    # private offers
    def publish_private_offer(
        self,
        offering_id: str,
        terms: Terms | dict[str, Any],
        *,
        to: list[str],
        signing_key: SigningKey,
        offer_id: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Sign ``terms`` and publish an offer only the organisations ``to`` can see and accept."""
        t = terms if isinstance(terms, Terms) else Terms.from_dict(terms)
        offer = make_offer(
            offer_id=offer_id or "ofr_" + secrets.token_hex(10),
            offering_id=offering_id,
            provider_org=str(self.get_json("/v1/whoami")["org_id"]),
            terms=t,
            signing_key=signing_key,
            now=now,
        )
        return dict(self.post_json(f"/v1/offerings/{offering_id}/offers", offer.to_dict(), params={"to": to}))

    # version metadata and validation
    def set_version_metadata(self, offering_id: str, number: int, **fields: Any) -> dict[str, Any]:
        """Declare metrics (``metrics={"accuracy": 0.97}``), ``measured_on``, ``notes``, ``parent``,
        ``tolerance``, ``he_min_agreement`` and an ``evaluation={"x": rows, "y": labels}`` set."""
        return dict(self.request("PUT", f"/v1/offerings/{offering_id}/versions/{number}/metadata", json=fields).json())

    def validation_report(self, offering_id: str, number: int) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/offerings/{offering_id}/versions/{number}/validation"))
