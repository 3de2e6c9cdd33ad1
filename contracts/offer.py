"""Signed offers, acceptances and contract events: immutable records anyone can check offline.

For: creating and verifying the signed records that make a contract and change it, and computing
a contract's status at a given time. Verification needs only the records themselves (they carry
the public keys) and, optionally, keys the caller pins.
Not for: deciding whether one use is allowed (:mod:`contracts.policy`), or binding an org name to a
key (the marketplace's key registry does that; pin keys with ``provider_key=``/``consumer_key=``).

The records::

    Offer        provider signs  {schema: som.offer/v1, offer_id, offering_id, provider_org,
                                  terms, provider_key, created}
    Acceptance   consumer signs  {schema: som.acceptance/v1, offer_digest, consumer_org,
                                  consumer_key, accepted_at}
    Contract   = offer + acceptance;  contract_id = "ct_" + first 32 hex of the acceptance digest
    Event        {schema: som.event/v1, kind, contract_id, seq, prev_digest, time, by, reason, terms}
                 + signatures {provider?, consumer?}

Each signature is Ed25519 over the RFC 8785 canonical JSON of the record without its signature
field(s); ``schema`` inside the body separates the record kinds. ``offer_digest`` is
``canonical_digest`` of the *signed* offer, so the acceptance binds the exact terms and signature.

Events form a chain: event ``n`` (1-based ``seq``) carries ``prev_digest`` = digest of event
``n-1``, or of the contract (``Contract.digest()``) for the first. Who may sign what:

============  =====================================  =========================================
kind          signed by                              allowed when
============  =====================================  =========================================
suspension    provider                               active
resumption    provider                               suspended
termination   the party in ``by`` (either side)      not terminated
amendment     both (``by`` names the proposer)       not terminated; currency unchanged
============  =====================================  =========================================

Nothing may follow a termination. Event times never go backwards and are not before the acceptance.
An event takes effect at its ``time``. Key rotation inside a contract is not supported: events are
signed with the keys in the offer and the acceptance.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Any, NewType

from contracts._validate import (
    describe,
    expect_keys,
    format_time,
    get_digest,
    get_int,
    get_str,
    get_time,
    now_utc,
    require_utc,
)
from contracts.errors import ChainError, SchemaError
from contracts.terms import Terms
from crypto.canonical import canonical_digest, canonicalize
from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.signing import SigningKey, verify

__all__ = [
    "ACCEPTANCE_SCHEMA",
    "EVENT_SCHEMA",
    "OFFER_SCHEMA",
    "Acceptance",
    "ChainState",
    "Contract",
    "ContractEvent",
    "ContractId",
    "ContractState",
    "Digest",
    "EventKind",
    "Party",
    "Status",
    "accept_offer",
    "advance",
    "contract_status",
    "draft_event",
    "initial_state",
    "make_offer",
    "sign_event",
    "verify_chain",
    "verify_contract",
    "verify_event",
]

OFFER_SCHEMA = "som.offer/v1"
ACCEPTANCE_SCHEMA = "som.acceptance/v1"
EVENT_SCHEMA = "som.event/v1"

ContractId = NewType("ContractId", str)
Digest = NewType("Digest", str)

KEY_RE = re.compile(r"ed25519:[A-Za-z0-9+/]{43}=")
SIG_RE = re.compile(r"[A-Za-z0-9+/]{86}==")
MAX_REASON = 1000


class Status(StrEnum):
    """A contract's status at a time. Precedence: terminated, expired, not_yet_valid, suspended."""

    ACTIVE = "active"
    SUSPENDED = "suspended"
    TERMINATED = "terminated"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"


class EventKind(StrEnum):
    AMENDMENT = "amendment"
    SUSPENSION = "suspension"
    RESUMPTION = "resumption"
    TERMINATION = "termination"


class Party(StrEnum):
    PROVIDER = "provider"
    CONSUMER = "consumer"


def _sign(key: SigningKey, body: Mapping[str, Any]) -> str:
    if not isinstance(key, SigningKey):
        raise TypeError(f"signing_key: expected crypto.signing.SigningKey, got {describe(key)}")
    return base64.b64encode(key.sign(canonicalize(body))).decode()


def _verify(public_key: str, signature: str, body: Mapping[str, Any]) -> None:
    try:
        verify(public_key, signature, canonicalize(body))
    except KeyMaterialError as e:  # a malformed key in a record is a failed verification
        raise InvalidSignature("signature did not verify") from e


# -- offer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """A provider's signed terms for one offering."""

    offer_id: str
    offering_id: str
    provider_org: str
    terms: Terms
    provider_key: str
    created: datetime
    signature: str

    def body(self) -> dict[str, Any]:
        """The signed part (everything but ``signature``)."""
        return {
            "schema": OFFER_SCHEMA,
            "offer_id": self.offer_id,
            "offering_id": self.offering_id,
            "provider_org": self.provider_org,
            "terms": self.terms.to_dict(),
            "provider_key": self.provider_key,
            "created": format_time(self.created),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @cached_property
    def _digest(self) -> str:
        return canonical_digest(self.to_dict())

    def digest(self) -> Digest:
        """``sha256:<hex>`` of the canonical signed offer: what an acceptance signs."""
        return Digest(self._digest)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "offer") -> Offer:
        d = expect_keys(
            data,
            where,
            (
                "schema",
                "offer_id",
                "offering_id",
                "provider_org",
                "terms",
                "provider_key",
                "created",
                "signature",
            ),
        )
        get_str(d, "schema", where, choices=(OFFER_SCHEMA,))
        return cls(
            offer_id=get_str(d, "offer_id", where),
            offering_id=get_str(d, "offering_id", where),
            provider_org=get_str(d, "provider_org", where),
            terms=Terms.from_dict(d["terms"], where=f"{where}.terms"),
            provider_key=get_str(d, "provider_key", where, pattern=KEY_RE),
            created=get_time(d, "created", where),
            signature=get_str(d, "signature", where, pattern=SIG_RE),
        )


def make_offer(
    *,
    offer_id: str,
    offering_id: str,
    provider_org: str,
    terms: Terms,
    signing_key: SigningKey,
    now: datetime | None = None,
) -> Offer:
    """Sign ``terms`` for ``offering_id`` with the provider's key."""
    if not isinstance(terms, Terms):
        raise TypeError(f"terms: expected Terms, got {describe(terms)}")
    created = require_utc(now_utc() if now is None else now, "now")
    fields = {"offer_id": offer_id, "offering_id": offering_id, "provider_org": provider_org}
    expect_keys(fields, "offer", fields)
    for name in fields:
        get_str(fields, name, "offer")
    unsigned = Offer(
        offer_id=offer_id,
        offering_id=offering_id,
        provider_org=provider_org,
        terms=terms,
        provider_key=signing_key.verify_key.to_text(),
        created=created,
        signature="",
    )
    return replace(unsigned, signature=_sign(signing_key, unsigned.body()))


# -- acceptance and contract ---------------------------------------------------------------


@dataclass(frozen=True)
class Acceptance:
    """A consumer's signature over an offer's digest and its own identity."""

    offer_digest: str
    consumer_org: str
    consumer_key: str
    accepted_at: datetime
    signature: str

    def body(self) -> dict[str, Any]:
        return {
            "schema": ACCEPTANCE_SCHEMA,
            "offer_digest": self.offer_digest,
            "consumer_org": self.consumer_org,
            "consumer_key": self.consumer_key,
            "accepted_at": format_time(self.accepted_at),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signature": self.signature}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "acceptance") -> Acceptance:
        d = expect_keys(
            data,
            where,
            ("schema", "offer_digest", "consumer_org", "consumer_key", "accepted_at", "signature"),
        )
        get_str(d, "schema", where, choices=(ACCEPTANCE_SCHEMA,))
        return cls(
            offer_digest=get_digest(d, "offer_digest", where),
            consumer_org=get_str(d, "consumer_org", where),
            consumer_key=get_str(d, "consumer_key", where, pattern=KEY_RE),
            accepted_at=get_time(d, "accepted_at", where),
            signature=get_str(d, "signature", where, pattern=SIG_RE),
        )


@dataclass(frozen=True)
class Contract:
    """An offer and its acceptance. Check it with :func:`verify_contract` before relying on it."""

    offer: Offer
    acceptance: Acceptance

    @property
    def terms(self) -> Terms:
        """The terms as signed (see :func:`contract_status` for terms after amendments)."""
        return self.offer.terms

    @cached_property
    def contract_id(self) -> ContractId:
        """``ct_`` + the first 32 hex digits of the acceptance digest (deterministic)."""
        return ContractId("ct_" + canonical_digest(self.acceptance.to_dict())[7:39])

    @cached_property
    def _digest(self) -> str:
        return canonical_digest(self.to_dict())

    def digest(self) -> Digest:
        """Digest of the whole contract: the ``prev_digest`` of its first event."""
        return Digest(self._digest)

    def to_dict(self) -> dict[str, Any]:
        return {"offer": self.offer.to_dict(), "acceptance": self.acceptance.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "contract") -> Contract:
        d = expect_keys(data, where, ("offer", "acceptance"))
        return cls(
            offer=Offer.from_dict(d["offer"], where=f"{where}.offer"),
            acceptance=Acceptance.from_dict(d["acceptance"], where=f"{where}.acceptance"),
        )


def accept_offer(offer: Offer, *, consumer_org: str, signing_key: SigningKey, now: datetime | None = None) -> Contract:
    """Sign ``offer`` as ``consumer_org``; returns the contract. Verifies the offer first."""
    if not isinstance(offer, Offer):
        raise TypeError(f"offer: expected Offer, got {describe(offer)}")
    at = require_utc(now_utc() if now is None else now, "now")
    get_str({"consumer_org": consumer_org}, "consumer_org", "acceptance")
    if at < offer.created:
        raise ValueError(f"now: expected at or after the offer's creation {offer.created}, got {at}")
    _verify(offer.provider_key, offer.signature, offer.body())
    unsigned = Acceptance(
        offer_digest=offer.digest(),
        consumer_org=consumer_org,
        consumer_key=signing_key.verify_key.to_text(),
        accepted_at=at,
        signature="",
    )
    signed = replace(unsigned, signature=_sign(signing_key, unsigned.body()))
    return Contract(offer=offer, acceptance=signed)


def _as_contract(record: Contract | Mapping[str, Any]) -> Contract:
    return record if isinstance(record, Contract) else Contract.from_dict(record)


def verify_contract(
    record: Contract | Mapping[str, Any],
    *,
    provider_key: str | None = None,
    consumer_key: str | None = None,
) -> None:
    """Return ``None`` if both signatures verify and the acceptance binds this exact offer.

    ``record`` may be a :class:`Contract` or its ``to_dict()`` (a malformed dict raises
    :class:`SchemaError`). ``provider_key``/``consumer_key`` pin the expected public keys.
    Raises :class:`crypto.errors.InvalidSignature` (opaque) otherwise.
    """
    c = _as_contract(record)
    ok = (
        (provider_key is None or provider_key == c.offer.provider_key)
        and (consumer_key is None or consumer_key == c.acceptance.consumer_key)
        and c.acceptance.offer_digest == c.offer.digest()
        and c.acceptance.accepted_at >= c.offer.created
    )
    if not ok:
        raise InvalidSignature("signature did not verify")
    _verify(c.offer.provider_key, c.offer.signature, c.offer.body())
    _verify(c.acceptance.consumer_key, c.acceptance.signature, c.acceptance.body())


# -- events --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContractEvent:
    """An amendment, suspension, resumption or termination of a contract (see module docstring)."""

    kind: EventKind
    contract_id: str
    seq: int
    prev_digest: str
    time: datetime
    by: Party
    reason: str = ""
    terms: Terms | None = None
    signatures: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", EventKind(self.kind))
        object.__setattr__(self, "by", Party(self.by))
        object.__setattr__(self, "time", require_utc(self.time, "time"))
        object.__setattr__(self, "signatures", MappingProxyType(dict(self.signatures)))
        if (self.kind is EventKind.AMENDMENT) != (self.terms is not None):
            raise ValueError(
                f"terms: expected new terms exactly for an amendment, got kind={self.kind} "
                f"with terms={'set' if self.terms is not None else 'None'}"
            )
        if type(self.reason) is not str or len(self.reason) > MAX_REASON:
            raise ValueError(f"reason: expected a string of at most {MAX_REASON} characters")
        if type(self.seq) is not int or self.seq < 1:
            raise ValueError(f"seq: expected an integer >= 1, got {describe(self.seq)}")

    def __hash__(self) -> int:
        return hash(self._digest)

    def body(self) -> dict[str, Any]:
        return {
            "schema": EVENT_SCHEMA,
            "kind": str(self.kind),
            "contract_id": self.contract_id,
            "seq": self.seq,
            "prev_digest": self.prev_digest,
            "time": format_time(self.time),
            "by": str(self.by),
            "reason": self.reason,
            "terms": None if self.terms is None else self.terms.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "signatures": dict(sorted(self.signatures.items()))}

    @cached_property
    def _digest(self) -> str:
        return canonical_digest(self.to_dict())

    def digest(self) -> Digest:
        """Digest of the signed event: the next event's ``prev_digest``."""
        return Digest(self._digest)

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "event") -> ContractEvent:
        d = expect_keys(
            data,
            where,
            (
                "schema",
                "kind",
                "contract_id",
                "seq",
                "prev_digest",
                "time",
                "by",
                "reason",
                "terms",
                "signatures",
            ),
        )
        get_str(d, "schema", where, choices=(EVENT_SCHEMA,))
        kind = EventKind(get_str(d, "kind", where, choices=[k.value for k in EventKind]))
        reason = d["reason"]
        if type(reason) is not str or len(reason) > MAX_REASON:
            raise SchemaError(
                f"{where}.reason: expected a string of at most {MAX_REASON} characters, got {describe(reason)}"
            )
        terms = None if d["terms"] is None else Terms.from_dict(d["terms"], where=f"{where}.terms")
        if (kind is EventKind.AMENDMENT) != (terms is not None):
            raise SchemaError(
                f"{where}.terms: expected terms for an amendment and null otherwise, got "
                f"{'terms' if terms is not None else 'null'} for kind {kind.value!r}"
            )
        sigs = expect_keys(d["signatures"], f"{where}.signatures", (), [p.value for p in Party])
        for name in sigs:
            get_str(sigs, name, f"{where}.signatures", pattern=SIG_RE)
        return cls(
            kind=kind,
            contract_id=get_str(d, "contract_id", where),
            seq=get_int(d, "seq", where, minimum=1),
            prev_digest=get_digest(d, "prev_digest", where),
            time=get_time(d, "time", where),
            by=Party(get_str(d, "by", where, choices=[p.value for p in Party])),
            reason=reason,
            terms=terms,
            signatures=dict(sigs),
        )


def _signers(kind: EventKind, by: Party) -> frozenset[Party]:
    if kind is EventKind.AMENDMENT:
        return frozenset(Party)
    if kind is EventKind.TERMINATION:
        return frozenset({by})
    return frozenset({Party.PROVIDER})


@dataclass(frozen=True)
class ChainState:
    """Where a contract's event chain stands after some events (lifecycle only, no clock)."""

    status: Status  # ACTIVE, SUSPENDED or TERMINATED
    terms: Terms
    seq: int
    head: Digest
    time: datetime


def initial_state(contract: Contract) -> ChainState:
    """The chain state right after acceptance: active, signed terms, no events."""
    return ChainState(Status.ACTIVE, contract.terms, 0, contract.digest(), contract.acceptance.accepted_at)


def draft_event(
    contract: Contract,
    state: ChainState,
    kind: EventKind | str,
    *,
    by: Party | str,
    reason: str = "",
    terms: Terms | None = None,
    now: datetime | None = None,
) -> ContractEvent:
    """An unsigned event following ``state``; add signatures with :func:`sign_event`."""
    return ContractEvent(
        kind=EventKind(kind),
        contract_id=contract.contract_id,
        seq=state.seq + 1,
        prev_digest=state.head,
        time=require_utc(now_utc() if now is None else now, "now"),
        by=Party(by),
        reason=reason,
        terms=terms,
    )


def sign_event(event: ContractEvent, party: Party | str, signing_key: SigningKey) -> ContractEvent:
    """``event`` with ``party``'s signature added (over the body, so signatures are independent)."""
    p = Party(party)
    sigs = {**event.signatures, p.value: _sign(signing_key, event.body())}
    return replace(event, signatures=sigs)


def verify_event(contract: Contract, event: ContractEvent, *, previous: ChainState) -> None:
    """Check ``event`` follows ``previous`` on ``contract``'s chain and is signed by whom it must be.

    Raises :class:`ChainError` for a wrong contract id, sequence number, predecessor digest, time
    going backwards, missing or surplus signatures; :class:`crypto.errors.InvalidSignature`
    (opaque) when a required signature does not verify. Does not check the state transition
    (see :func:`advance`) nor the contract's own signatures (see :func:`verify_contract`).
    """
    if event.contract_id != contract.contract_id:
        raise ChainError(f"event contract_id: expected {contract.contract_id}, got {event.contract_id}")
    if event.seq != previous.seq + 1:
        raise ChainError(f"event seq: expected {previous.seq + 1}, got {event.seq}")
    if event.prev_digest != previous.head:
        raise ChainError(f"event {event.seq} prev_digest: expected {previous.head}, got {event.prev_digest}")
    if event.time < previous.time:
        raise ChainError(f"event {event.seq} time: expected >= {previous.time}, got {event.time}")
    need = {p.value for p in _signers(event.kind, event.by)}
    have = set(event.signatures)
    if have != need:
        raise ChainError(
            f"event {event.seq} ({event.kind.value} by {event.by.value}): expected signatures "
            f"of {sorted(need)}, got {sorted(have)}"
        )
    body = event.body()
    keys = {
        Party.PROVIDER.value: contract.offer.provider_key,
        Party.CONSUMER.value: contract.acceptance.consumer_key,
    }
    for party in sorted(need):
        _verify(keys[party], event.signatures[party], body)


def advance(contract: Contract, state: ChainState, event: ContractEvent) -> ChainState:
    """Verify ``event`` against ``state`` (see :func:`verify_event`) and apply it.

    Raises :class:`ChainError` for a transition the state forbids (see module docstring).
    """
    verify_event(contract, event, previous=state)
    kind, status, terms = event.kind, state.status, state.terms
    if status is Status.TERMINATED:
        raise ChainError(f"event {event.seq}: the contract is terminated; nothing may follow")
    if kind is EventKind.SUSPENSION:
        if status is not Status.ACTIVE:
            raise ChainError(f"event {event.seq}: suspension expected an active contract, got {status.value}")
        status = Status.SUSPENDED
    elif kind is EventKind.RESUMPTION:
        if status is not Status.SUSPENDED:
            raise ChainError(f"event {event.seq}: resumption expected a suspended contract, got {status.value}")
        status = Status.ACTIVE
    elif kind is EventKind.TERMINATION:
        status = Status.TERMINATED
    else:
        if event.terms is None:  # pragma: no cover - __post_init__ forbids it
            raise ChainError(f"event {event.seq}: amendment without terms")
        if event.terms.currency != terms.currency:
            raise ChainError(
                f"event {event.seq}: amendment currency: expected {terms.currency}, got {event.terms.currency}"
            )
        terms = event.terms
    return ChainState(status, terms, event.seq, event.digest(), event.time)


def verify_chain(contract: Contract, events: Iterable[ContractEvent]) -> ChainState:
    """Verify the contract and its whole event chain; returns the final :class:`ChainState`."""
    verify_contract(contract)
    state = initial_state(contract)
    for ev in events:
        state = advance(contract, state, ev)
    return state


@dataclass(frozen=True)
class ContractState:
    """A contract's status at a time and the terms in effect then."""

    status: Status
    terms: Terms


def contract_status(contract: Contract, events: Iterable[ContractEvent], now: datetime | None = None) -> ContractState:
    """Verify ``contract`` and ``events`` (in chain order) and return the status at ``now``.

    Events with ``time > now`` are verified but not yet in effect. Status precedence:
    terminated, expired, not_yet_valid, suspended, active (validity from the terms in effect).
    """
    t = require_utc(now_utc() if now is None else now, "now")
    verify_contract(contract)
    state = initial_state(contract)
    effective = state
    for ev in events:
        state = advance(contract, state, ev)
        if ev.time <= t:
            effective = state
    terms = effective.terms
    if effective.status is Status.TERMINATED:
        return ContractState(Status.TERMINATED, terms)
    if t >= terms.valid_until:
        return ContractState(Status.EXPIRED, terms)
    if t < terms.valid_from:
        return ContractState(Status.NOT_YET_VALID, terms)
    return ContractState(effective.status, terms)
