"""The agent protocol client: what a provider's agent says to the marketplace (``/v1/agent/*``).

For: :class:`AgentAPI`, one method per call of the agent protocol, so the agent
(:mod:`marketplace.agent.runner`) never builds requests itself::

    call                  route                                      answer
    hello(body)           POST /v1/agent/hello       {id, offering_ids, heartbeat_seconds, lease_wait_max}
    seal_statements(...)  POST /v1/agent/seal-key                    the provider's signed vouches for the sealing key
    plan(oid, ...)        POST /v1/agent/offerings/{oid}/plan        the PUBLIC HE plan and its report
    lease(wait)           POST /v1/agent/lease (long poll)           a work item, or None (204); 404: say hello again
    heartbeat(holding)    POST /v1/agent/heartbeat                   {lost: [...]}: work no longer ours
    payload(wid)          GET  /v1/agent/work/{wid}/payload          sealed input / HE request bytes
    keyset(ksid)          GET  /v1/agent/keysets/{ksid}              a consumer's public key set bytes
    complete(wid, data)   POST /v1/agent/work/{wid}/result           -
    fail(wid, ...)        POST /v1/agent/work/{wid}/fail             -
    bye()                 POST /v1/agent/bye                         - (never raises for a status)

Every call after ``hello`` names the agent in ``X-Som-Agent`` (the ``agent_id`` argument).
Errors: :class:`~marketplace.sdk.errors.SomAPIError` for an HTTP error status,
``httpx.TransportError`` when the marketplace cannot be reached.

Not for: the provider's *user* calls (approving code, offerings: :class:`marketplace.sdk.SomClient`)
or anything the agent computes.
"""

from __future__ import annotations

from typing import Any

import httpx

from marketplace.sdk.base import BaseClient

__all__ = ["AGENT_HEADER", "AgentAPI"]

AGENT_HEADER = "X-Som-Agent"


class AgentAPI:
    """The agent protocol over one HTTP client (an agent key in ``Authorization``)."""

    def __init__(
        self, base_url: str, api_key: str, *, http: httpx.Client | None = None, timeout: float = 120.0
    ) -> None:
        self._client = BaseClient(base_url, api_key, http=http, timeout=timeout)

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _h(agent_id: str | None) -> dict[str, str]:
        return {AGENT_HEADER: agent_id or ""}

    # -- presence ----------------------------------------------------------------------------

    def hello(self, body: dict[str, Any]) -> dict[str, Any]:
        """Register: ``seal_public``, ``name``, ``capabilities`` (and ``offering_ids``)."""
        out: dict[str, Any] = self._client.post_json("/v1/agent/hello", body)
        return out

    def seal_statements(self, statements: list[dict[str, Any]], *, agent_id: str) -> None:
        """Register the provider's signed statements vouching for this agent's sealing key."""
        self._client.post_json("/v1/agent/seal-key", {"statements": statements}, headers=self._h(agent_id))

    def plan(self, offering_id: str, plan: dict[str, Any], report: dict[str, Any], *, agent_id: str) -> None:
        """Publish the PUBLIC HE plan (and its compile report) of ``offering_id``."""
        self._client.post_json(
            f"/v1/agent/offerings/{offering_id}/plan", {"plan": plan, "report": report}, headers=self._h(agent_id)
        )

    def heartbeat(self, holding: list[str], *, agent_id: str | None) -> list[str]:
        """Say we are alive and still hold ``holding`` (extends their leases); the ids we lost."""
        out = self._client.post_json("/v1/agent/heartbeat", {"holding": holding}, headers=self._h(agent_id))
        return [str(w) for w in out.get("lost", [])]

    def bye(self, *, agent_id: str | None, timeout: float = 5.0) -> None:
        """Say goodbye (best effort: an error status is ignored)."""
        self._client._http.post("/v1/agent/bye", headers=self._h(agent_id), timeout=timeout)

    # -- work --------------------------------------------------------------------------------

    def lease(self, wait: float, *, agent_id: str | None) -> dict[str, Any] | None:
        """Long-poll up to ``wait`` seconds for work: the item, or None. Raises SomAPIError (404:
        the marketplace does not know this agent, say hello again)."""
        r = self._client.request("POST", "/v1/agent/lease", json={"wait": wait}, headers=self._h(agent_id))
        if r.status_code == 204:
            return None
        item: dict[str, Any] = r.json()
        return item

    def gateway_exchange(self, body: dict[str, Any], *, agent_id: str) -> list[dict[str, Any]]:
        """Post the previous gateway answers and long-poll for the next plaintext requests
        (docs/gateway.md). Raises SomAPIError (401/403: this key may not serve; stop)."""
        r = self._client.request("POST", "/v1/agent/gateway/exchange", json=body, headers=self._h(agent_id))
        return list(r.json().get("requests") or [])

    def payload(self, work_id: str, *, agent_id: str | None) -> bytes:
        """The work's input: a sealed job input or an HE request frame."""
        return self._client.request("GET", f"/v1/agent/work/{work_id}/payload", headers=self._h(agent_id)).content

    def keyset(self, keyset_id: str, *, agent_id: str | None) -> bytes:
        """A consumer's public HE key set (serialized :class:`crypto.he.PublicContext`)."""
        return self._client.request("GET", f"/v1/agent/keysets/{keyset_id}", headers=self._h(agent_id)).content

    def complete(self, work_id: str, data: bytes, *, agent_id: str | None) -> None:
        """Post the result (sealed job result or HE result frame)."""
        self._client.request(
            "POST",
            f"/v1/agent/work/{work_id}/result",
            content=data,
            headers={**self._h(agent_id), "Content-Type": "application/octet-stream"},
        )

    def fail(self, work_id: str, reason: str, message: str, *, agent_id: str | None) -> None:
        """Report that the work cannot produce a result (``message`` is cut to 4000 characters)."""
        self._client.post_json(
            f"/v1/agent/work/{work_id}/fail", {"reason": reason, "message": message[:4000]}, headers=self._h(agent_id)
        )
