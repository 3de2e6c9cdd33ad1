"""Contracts in the service: signed offers, acceptances and lifecycle events, stored and ledgered.

==========================  =========================================================
module                      holds
==========================  =========================================================
``contracts.store``         parsed-record caches, row locks, ledger leaves, clock checks
``contracts.offers``        publishing, reading and withdrawing providers' signed offers
``contracts.lifecycle``     acceptances (the contract), signed events, party reads,
                            statements
==========================  =========================================================

Callers use the names below (``from marketplace.services import contracts``). Signatures are
made by the parties' own keys on their own machines; the service only verifies them with
:mod:`contracts.offer`. Not for: metering a use (:mod:`marketplace.services.metering`), policy
logic (:mod:`contracts.policy`), the ledger's internals (:mod:`marketplace.services.ledger`).
"""

from __future__ import annotations

from marketplace.services.contracts.lifecycle import (
    accept_offer,
    add_event,
    events_of,
    get_for_party,
    party_query,
    statement,
    usage_leaves,
)
from marketplace.services.contracts.offers import (
    get_offer,
    list_offers,
    publish_offer,
    withdraw_offer,
)
from marketplace.services.contracts.store import (
    CLOCK_SKEW,
    OFFER_ID_RE,
    contract_of,
    ledger_append,
    ledger_receipt,
    lock_contract,
    terms_of,
)

__all__ = [
    "CLOCK_SKEW",
    "OFFER_ID_RE",
    "accept_offer",
    "add_event",
    "contract_of",
    "events_of",
    "get_for_party",
    "get_offer",
    "ledger_append",
    "ledger_receipt",
    "list_offers",
    "lock_contract",
    "party_query",
    "publish_offer",
    "statement",
    "terms_of",
    "usage_leaves",
    "withdraw_offer",
]
