"""Contract calls: publish signed offers, accept them, sign lifecycle events, statements, receipts.

The organisation's Ed25519 signing key stays on the caller's machine: every record is signed
here, locally, and only the signed record (with the public key) goes to the server. Use
:func:`load_signing_key` for a 0600 key file created on first use.
"""

from __future__ import annotations

import base64
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

from contracts.offer import (
    Contract,
    ContractEvent,
    EventKind,
    Offer,
    Party,
    accept_offer,
    draft_event,
    make_offer,
    sign_event,
    verify_chain,
)
from contracts.terms import Terms
from crypto.signing import SigningKey
from marketplace.sdk.base import BaseClient

__all__ = ["ContractsAPI", "default_key_path", "load_signing_key"]

_KEY_PREFIX = "ed25519-seed:"


def default_key_path(org: str) -> Path:
    """``$SOM_SIGNING_KEY`` if set, else ``~/.config/som/<org>.key``."""
    env = os.environ.get("SOM_SIGNING_KEY")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "som" / f"{org}.key"


def load_signing_key(path: str | Path, *, create: bool = True) -> SigningKey:
    """Read the Ed25519 key at ``path``; create it (0600, parent 0700) if missing and ``create``.

    Raises ``FileNotFoundError`` if missing and not ``create``; ``ValueError`` if the file is not
    a key this module wrote, or if it is readable by others (fix with ``chmod 600``).
    """
    p = Path(path).expanduser()
    if not p.exists():
        if not create:
            raise FileNotFoundError(f"no signing key at {p}")
        p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = SigningKey.generate()
        text = _KEY_PREFIX + base64.b64encode(key.unsafe_private_bytes()).decode() + "\n"
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return key
    if p.stat().st_mode & 0o077:
        raise ValueError(f"signing key {p} is readable by other users; run `chmod 600 {p}`")
    text = p.read_text().strip()
    if not text.startswith(_KEY_PREFIX):
        raise ValueError(f"{p}: expected a line starting with {_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(_KEY_PREFIX) :], validate=True)
    except ValueError as e:
        raise ValueError(f"{p}: the key is not valid base64") from e
    return SigningKey.from_private_bytes(raw)


class ContractsAPI(BaseClient):
    def _org_id(self) -> str:
        org = getattr(self, "_som_org_id", None)
        if org is None:
            org = str(self.get_json("/v1/whoami")["org_id"])
            self._som_org_id = org
        return org

    # offers
    def publish_offer(
        self,
        offering_id: str,
        terms: Terms | dict[str, Any],
        *,
        signing_key: SigningKey,
        offer_id: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Sign ``terms`` for ``offering_id`` with the provider's key and publish the offer."""
        t = terms if isinstance(terms, Terms) else Terms.from_dict(terms)
        offer = make_offer(
            offer_id=offer_id or "ofr_" + secrets.token_hex(10),
            offering_id=offering_id,
            provider_org=self._org_id(),
            terms=t,
            signing_key=signing_key,
            now=now,
        )
        return dict(self.post_json(f"/v1/offerings/{offering_id}/offers", offer.to_dict()))

    def list_offers(self, offering_id: str) -> list[dict[str, Any]]:
        return list(self.get_json(f"/v1/offerings/{offering_id}/offers"))

    def get_offer(self, offer_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/offers/{offer_id}"))

    def withdraw_offer(self, offer_id: str) -> dict[str, Any]:
        return dict(self.post_json(f"/v1/offers/{offer_id}/withdraw"))

    def accept_offer(
        self,
        offer_id: str,
        *,
        signing_key: SigningKey,
        provider_key: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Fetch the offer, verify its signature (and ``provider_key`` if pinned), sign the
        acceptance locally and send it. Returns the contract."""
        data = self.get_offer(offer_id)
        offer = Offer.from_dict(data["offer"])
        if offer.offer_id != offer_id:
            raise ValueError(f"server returned offer {offer.offer_id} for {offer_id}")
        if provider_key is not None and offer.provider_key != provider_key:
            raise ValueError(f"offer {offer_id} is signed by {offer.provider_key}, not the pinned {provider_key}")
        contract = accept_offer(offer, consumer_org=self._org_id(), signing_key=signing_key, now=now)
        return dict(self.post_json(f"/v1/offers/{offer_id}/accept", contract.acceptance.to_dict()))

    # contracts
    def list_contracts(self, **filters: Any) -> list[dict[str, Any]]:
        return self.paginate("/v1/contracts", **filters)

    def get_contract(self, contract_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/contracts/{contract_id}"))

    def contract_event(
        self,
        contract_id: str,
        kind: EventKind | str,
        *,
        signing_key: SigningKey,
        reason: str = "",
        terms: Terms | None = None,
        now: datetime | None = None,
    ) -> dict[str, Any]:
        """Verify the contract's chain locally, sign the next event as this organisation's party
        and record it. Amendments need both signatures and are not sent by this helper."""
        data = self.get_contract(contract_id)
        contract = Contract.from_dict(data["contract"])
        state = verify_chain(contract, [ContractEvent.from_dict(e) for e in data["events"]])
        org = self._org_id()
        if org == contract.offer.provider_org:
            party = Party.PROVIDER
        elif org == contract.acceptance.consumer_org:
            party = Party.CONSUMER
        else:  # pragma: no cover - the server shows contracts to their parties only
            raise ValueError(f"organisation {org} is not a party to {contract_id}")
        ev = draft_event(contract, state, kind, by=party, reason=reason, terms=terms, now=now)
        ev = sign_event(ev, party, signing_key)
        return dict(self.post_json(f"/v1/contracts/{contract_id}/events", ev.to_dict()))

    def suspend_contract(self, contract_id: str, *, signing_key: SigningKey, reason: str = "") -> dict[str, Any]:
        return self.contract_event(contract_id, EventKind.SUSPENSION, signing_key=signing_key, reason=reason)

    def resume_contract(self, contract_id: str, *, signing_key: SigningKey, reason: str = "") -> dict[str, Any]:
        return self.contract_event(contract_id, EventKind.RESUMPTION, signing_key=signing_key, reason=reason)

    def terminate_contract(self, contract_id: str, *, signing_key: SigningKey, reason: str = "") -> dict[str, Any]:
        return self.contract_event(contract_id, EventKind.TERMINATION, signing_key=signing_key, reason=reason)

    def statement(
        self, contract_id: str, *, start: str | None = None, end: str | None = None, format: str = "json"
    ) -> Any:
        """The usage statement (a dict, or CSV text with ``format="csv"``)."""
        params = {k: v for k, v in {"from": start, "to": end, "format": format}.items() if v is not None}
        r = self.request("GET", f"/v1/contracts/{contract_id}/statement", params=params)
        return r.text if format == "csv" else r.json()

    def receipt(self, usage_id: str) -> dict[str, Any]:
        return dict(self.get_json(f"/v1/receipts/{usage_id}"))
