"""The ledger leaf schema: the one place that says what a ledger leaf looks like.

For: building ledger leaves (plain dicts that the ledger service RFC 8785-canonicalizes and
appends) and validating leaves read back (:func:`parse_record`, :func:`validate_record`). The
ledger service and the offline verifier both use this module, so they cannot disagree.
Not for: Merkle trees or checkpoints (``crypto``), contract semantics across leaves
(:mod:`contracts.compliance`). Leaves hold metadata and digests only, never payloads.

Schemas (every field required; times are RFC 3339 UTC with microseconds and ``Z``; digests are
``sha256:<64 hex>``)::

    som.usage/v1           usage_id, contract_id, offering_id, consumer_org, provider_org, mode,
                           units, unit_price_minor, currency, amount_minor,
                           outcome ("charged" | "released"), request_digest,
                           idempotency_key_digest, time; optionally version (the model
                           version a pinned contract computed with)
    som.contract/v1        contract_id, contract (Contract.to_dict(): signed offer + acceptance), time
    som.contract-event/v1  contract_id, event (ContractEvent.to_dict(): signed), time
    som.audit/v1           event_id, actor, org|null, action, target|null,
                           outcome ("success" | "failure" | "denied"), request_id|null, time
    som.job-approval/v1    job_id, contract_id, code_digest, decision ("approved" | "rejected"),
                           actor, time

A usage leaf's ``time`` is the *reservation* time (when :func:`contracts.policy.decide` allowed the
use), so the offline checker recomputes the same rate window the online policy used. ``units`` of a
released leaf are the units that were reserved and given back; its ``amount_minor`` is 0.

:func:`format_time` / :func:`parse_time` are the one wire time format (re-exported here so
callers need not import the private ``contracts._validate``).
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from contracts._validate import (
    DIGEST_RE,
    MAX_ID_LEN,
    TIME_RE,
    describe,
    expect_keys,
    format_time,
    get_digest,
    get_int,
    get_opt_str,
    get_str,
    parse_time,
)
from contracts.errors import SchemaError
from contracts.offer import Contract, ContractEvent
from contracts.terms import CURRENCY_RE, MODES, Terms

__all__ = [
    "AUDIT_OUTCOMES",
    "AUDIT_SCHEMA",
    "CONTRACT_EVENT_SCHEMA",
    "CONTRACT_SCHEMA",
    "FL_CONTRIBUTION_SCHEMA",
    "JOB_APPROVAL_SCHEMA",
    "SCHEMAS",
    "USAGE_OUTCOMES",
    "USAGE_SCHEMA",
    "audit_record",
    "format_time",
    "parse_time",
    "contract_event_record",
    "contract_record",
    "fl_contribution_record",
    "job_approval_record",
    "parse_record",
    "usage_record",
    "validate_record",
]

USAGE_SCHEMA = "som.usage/v1"
CONTRACT_SCHEMA = "som.contract/v1"
CONTRACT_EVENT_SCHEMA = "som.contract-event/v1"
AUDIT_SCHEMA = "som.audit/v1"
JOB_APPROVAL_SCHEMA = "som.job-approval/v1"
FL_CONTRIBUTION_SCHEMA = "som.fl-contribution/v1"
USAGE_OUTCOMES = ("charged", "released")
AUDIT_OUTCOMES = ("success", "failure", "denied")
JOB_DECISIONS = ("approved", "rejected")

_USAGE_KEYS = frozenset(
    [
        "schema",
        "usage_id",
        "contract_id",
        "offering_id",
        "consumer_org",
        "provider_org",
        "mode",
        "units",
        "unit_price_minor",
        "currency",
        "amount_minor",
        "outcome",
        "request_digest",
        "idempotency_key_digest",
        "time",
    ]
)
#: A usage leaf may also name the model version it computed with (a contract's pinned version).
_USAGE_KEYS_VERSIONED = _USAGE_KEYS | {"version"}
_MAX = 2**53 - 1
_MODES = frozenset(MODES)
_OUTCOMES = frozenset(USAGE_OUTCOMES)


# -- builders ------------------------------------------------------------------------------


def usage_record(
    contract: Contract,
    *,
    usage_id: str,
    mode: str,
    units: int,
    outcome: str,
    request_digest: str,
    idempotency_key_digest: str,
    time: datetime,
    terms: Terms | None = None,
    version: int | None = None,
) -> dict[str, Any]:
    """A ``som.usage/v1`` leaf for one use of ``contract`` (``version``: the model version it
    computed with, when the contract pinned one; the leaf then carries ``"version"``).

    ``terms`` are the terms in effect (after amendments; default: the signed ones). The amount is
    ``units * unit_price_minor`` when charged and 0 when released. ``time`` is the reservation time.
    Raises :class:`SchemaError` if any field is malformed.
    """
    t = contract.terms if terms is None else terms
    amount = units * t.unit_price_minor if outcome == "charged" and type(units) is int else 0
    rec = {
        "schema": USAGE_SCHEMA,
        "usage_id": usage_id,
        "contract_id": contract.contract_id,
        "offering_id": contract.offer.offering_id,
        "consumer_org": contract.acceptance.consumer_org,
        "provider_org": contract.offer.provider_org,
        "mode": mode,
        "units": units,
        "unit_price_minor": t.unit_price_minor,
        "currency": t.currency,
        "amount_minor": amount,
        "outcome": outcome,
        "request_digest": request_digest,
        "idempotency_key_digest": idempotency_key_digest,
        "time": format_time(time),
    }
    if version is not None:
        rec["version"] = version
    return validate_record(rec)


def contract_record(contract: Contract, *, time: datetime) -> dict[str, Any]:
    """A ``som.contract/v1`` leaf: the full signed contract, appended when it is accepted."""
    return validate_record(
        {
            "schema": CONTRACT_SCHEMA,
            "contract_id": contract.contract_id,
            "contract": contract.to_dict(),
            "time": format_time(time),
        }
    )


def contract_event_record(event: ContractEvent, *, time: datetime) -> dict[str, Any]:
    """A ``som.contract-event/v1`` leaf carrying one signed event."""
    return validate_record(
        {
            "schema": CONTRACT_EVENT_SCHEMA,
            "contract_id": event.contract_id,
            "event": event.to_dict(),
            "time": format_time(time),
        }
    )


def audit_record(
    *,
    event_id: str,
    actor: str,
    org: str | None,
    action: str,
    target: str | None,
    outcome: str,
    request_id: str | None,
    time: datetime,
) -> dict[str, Any]:
    """A ``som.audit/v1`` leaf: who did what to what, and how it ended (no payloads)."""
    return validate_record(
        {
            "schema": AUDIT_SCHEMA,
            "event_id": event_id,
            "actor": actor,
            "org": org,
            "action": action,
            "target": target,
            "outcome": outcome,
            "request_id": request_id,
            "time": format_time(time),
        }
    )


def job_approval_record(
    *, job_id: str, contract_id: str, code_digest: str, decision: str, actor: str, time: datetime
) -> dict[str, Any]:
    """A ``som.job-approval/v1`` leaf: a provider approved or rejected custom job code."""
    return validate_record(
        {
            "schema": JOB_APPROVAL_SCHEMA,
            "job_id": job_id,
            "contract_id": contract_id,
            "code_digest": code_digest,
            "decision": decision,
            "actor": actor,
            "time": format_time(time),
        }
    )


def fl_contribution_record(
    *,
    federation_id: str,
    round: int,
    org: str,
    samples: int,
    update_digest: str,
    epsilon: str,
    delta: str,
    time: datetime,
) -> dict[str, Any]:
    """A ``som.fl-contribution/v1`` leaf: ``org`` contributed an update to a federation's round
    (``samples`` as declared; ``update_digest`` of the masked shares the coordinator received;
    ``epsilon``/``delta`` the cumulative privacy spent, decimal strings)."""
    return validate_record(
        {
            "schema": FL_CONTRIBUTION_SCHEMA,
            "federation_id": federation_id,
            "round": round,
            "org": org,
            "samples": samples,
            "update_digest": update_digest,
            "epsilon": epsilon,
            "delta": delta,
            "time": format_time(time),
        }
    )


# -- validators ----------------------------------------------------------------------------


_usage_fields = operator.itemgetter(
    "usage_id",
    "contract_id",
    "offering_id",
    "consumer_org",
    "provider_org",
    "mode",
    "units",
    "unit_price_minor",
    "amount_minor",
    "currency",
    "outcome",
    "request_digest",
    "idempotency_key_digest",
    "time",
)
_digest_ok, _time_ok, _currency_ok = DIGEST_RE.fullmatch, TIME_RE.fullmatch, CURRENCY_RE.fullmatch


def _usage_ok(d: Mapping[str, Any]) -> bool:
    """The whole som.usage/v1 check in one expression (the compliance walk's hot path)."""
    if d.keys() != _USAGE_KEYS and (
        d.keys() != _USAGE_KEYS_VERSIONED or type(d["version"]) is not int or not 0 < d["version"] <= _MAX
    ):
        return False
    uid, cid, off, cons, prov, mode, units, price, amount, cur, outcome, rd, kd, t = _usage_fields(d)
    return bool(
        type(uid) is type(cid) is type(off) is type(cons) is type(prov) is str
        and 0 < len(uid) <= MAX_ID_LEN
        and 0 < len(cid) <= MAX_ID_LEN
        and 0 < len(off) <= MAX_ID_LEN
        and 0 < len(cons) <= MAX_ID_LEN
        and 0 < len(prov) <= MAX_ID_LEN
        # printable iff each part is (a per-character property)
        and (uid + cid + off + cons + prov).isprintable()
        and type(mode) is type(outcome) is type(cur) is str
        and mode in _MODES
        and outcome in _OUTCOMES
        and type(units) is type(price) is type(amount) is int
        and 0 < units <= _MAX
        and 0 <= price <= _MAX
        and 0 <= amount <= _MAX
        and _currency_ok(cur)
        and type(rd) is type(kd) is type(t) is str
        and _digest_ok(rd)
        and _digest_ok(kd)
        and _time_ok(t)
    )


def _validate_usage(d: Mapping[str, Any]) -> None:
    # Hot path: one fast check; on failure the field-by-field checks below give the precise error.
    if _usage_ok(d):
        return
    w = USAGE_SCHEMA
    expect_keys(d, w, _USAGE_KEYS, optional=("version",))
    if "version" in d:
        get_int(d, "version", w, minimum=1)
    for k in ("usage_id", "contract_id", "offering_id", "consumer_org", "provider_org"):
        get_str(d, k, w)
    get_str(d, "mode", w, choices=MODES)
    get_int(d, "units", w, minimum=1)
    get_int(d, "unit_price_minor", w)
    get_int(d, "amount_minor", w)
    get_str(d, "currency", w, pattern=CURRENCY_RE)
    get_str(d, "outcome", w, choices=USAGE_OUTCOMES)
    get_digest(d, "request_digest", w)
    get_digest(d, "idempotency_key_digest", w)
    get_str(d, "time", w, pattern=TIME_RE)
    raise SchemaError(f"{w}: invalid record")  # pragma: no cover - one check above fails


def _validate_contract(d: Mapping[str, Any]) -> None:
    w = CONTRACT_SCHEMA
    expect_keys(d, w, ("schema", "contract_id", "contract", "time"))
    get_str(d, "contract_id", w)
    get_str(d, "time", w, pattern=TIME_RE)
    Contract.from_dict(d["contract"], where=f"{w}.contract")


def _validate_contract_event(d: Mapping[str, Any]) -> None:
    w = CONTRACT_EVENT_SCHEMA
    expect_keys(d, w, ("schema", "contract_id", "event", "time"))
    get_str(d, "contract_id", w)
    get_str(d, "time", w, pattern=TIME_RE)
    ContractEvent.from_dict(d["event"], where=f"{w}.event")


def _validate_audit(d: Mapping[str, Any]) -> None:
    w = AUDIT_SCHEMA
    expect_keys(
        d,
        w,
        ("schema", "event_id", "actor", "org", "action", "target", "outcome", "request_id", "time"),
    )
    for k in ("event_id", "actor", "action"):
        get_str(d, k, w)
    for k in ("org", "target", "request_id"):
        get_opt_str(d, k, w)
    get_str(d, "outcome", w, choices=AUDIT_OUTCOMES)
    get_str(d, "time", w, pattern=TIME_RE)


def _validate_job_approval(d: Mapping[str, Any]) -> None:
    w = JOB_APPROVAL_SCHEMA
    expect_keys(d, w, ("schema", "job_id", "contract_id", "code_digest", "decision", "actor", "time"))
    for k in ("job_id", "contract_id", "actor"):
        get_str(d, k, w)
    get_digest(d, "code_digest", w)
    get_str(d, "decision", w, choices=JOB_DECISIONS)
    get_str(d, "time", w, pattern=TIME_RE)


def _validate_fl_contribution(d: Mapping[str, Any]) -> None:
    w = FL_CONTRIBUTION_SCHEMA
    expect_keys(
        d, w, ("schema", "federation_id", "round", "org", "samples", "update_digest", "epsilon", "delta", "time")
    )
    for k in ("federation_id", "org"):
        get_str(d, k, w)
    get_int(d, "round", w, minimum=1)
    get_int(d, "samples", w, minimum=0)
    get_digest(d, "update_digest", w)
    for k in ("epsilon", "delta"):
        get_str(d, k, w, pattern=_DECIMAL_RE)
    get_str(d, "time", w, pattern=TIME_RE)


_DECIMAL_RE = re.compile(r"(0|[1-9][0-9]{0,8})(\.[0-9]{1,12})?|inf")

_VALIDATORS: dict[str, Callable[[Mapping[str, Any]], None]] = {
    USAGE_SCHEMA: _validate_usage,
    CONTRACT_SCHEMA: _validate_contract,
    CONTRACT_EVENT_SCHEMA: _validate_contract_event,
    AUDIT_SCHEMA: _validate_audit,
    JOB_APPROVAL_SCHEMA: _validate_job_approval,
    FL_CONTRIBUTION_SCHEMA: _validate_fl_contribution,
}
SCHEMAS: tuple[str, ...] = tuple(_VALIDATORS)


def validate_record(record: Any) -> dict[str, Any]:
    """Return ``record`` if it is a well-formed leaf of a known schema; raise :class:`SchemaError`
    naming the field, what was expected and what came. Structure only: whether a usage leaf
    respects its contract is :mod:`contracts.compliance`'s job."""
    if not isinstance(record, dict):
        raise SchemaError(f"record: expected a JSON object, got {describe(record)}")
    schema = record.get("schema")
    check = _VALIDATORS.get(schema) if type(schema) is str else None
    if check is None:
        raise SchemaError(f"record.schema: expected one of {list(SCHEMAS)}, got {describe(schema)}")
    check(record)
    return record


def _reject_constant(name: str) -> Any:
    raise SchemaError(f"record: {name} is not JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise SchemaError(f"record: duplicate key {dup!r}")
    return d


# One decoder for every leaf (json.loads with hooks would build a new one per call).
_decode = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_reject_constant).decode


def parse_record(data: bytes) -> dict[str, Any]:
    """Parse and validate one leaf from its bytes (UTF-8 JSON; duplicate keys, NaN and
    infinities refused). Raises :class:`SchemaError` with the reason."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"data: expected bytes, got {describe(data)}")
    try:
        text = (data if type(data) is bytes else bytes(data)).decode("utf-8")
        value = _decode(text)
    except UnicodeDecodeError as e:
        raise SchemaError(f"record: expected UTF-8, got invalid byte at {e.start}") from e
    except json.JSONDecodeError as e:
        raise SchemaError(f"record: expected JSON, got {e.msg} at offset {e.pos}") from e
    return validate_record(value)
