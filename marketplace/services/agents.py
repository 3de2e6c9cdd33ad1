"""Provider agents: their keys, their presence, and the sealing key consumers seal to.

For: provider-hosted offerings, whose weights stay on the provider's machine. A ``som agent``
process authenticates with an *agent key* (ApiKey kind="agent", bound to its organisation and
offerings), says hello with the public key that job inputs are sealed to, heartbeats (which also
extends the leases of the work it holds, :func:`marketplace.services.leases.extend`) and says
bye; the provider's signed statements vouch for its sealing key (:func:`register_seal_statements`,
:func:`sealing_key_for`).
Not for: handing agents work and taking their results (:mod:`marketplace.services.dispatch`),
the jobs' lifecycle (:mod:`marketplace.services.jobs`) or running anything itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from crypto.errors import InvalidSignature, KeyMaterialError
from crypto.sealing import SealPublicKey
from marketplace.agent.sealkey import SealKeyStatement, verify_seal_key
from marketplace.db.base import utcnow
from marketplace.db.models import ApiKey, Offering
from marketplace.db.models_contracts import OfferRow
from marketplace.db.models_jobs import Agent
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit, leases
from marketplace.services.identity import Principal, create_key

__all__ = [
    "CAPABILITIES",
    "agent_of",
    "bye",
    "create_agent_key",
    "heartbeat",
    "hello",
    "is_online",
    "online_agents",
    "register_seal_statements",
    "require_agent",
    "sealing_key_for",
]

CAPABILITIES = ("predict", "evaluate", "custom", "he_infer", "gateway")


# -- keys and presence --------------------------------------------------------------------


def require_agent(p: Principal) -> frozenset[str]:
    """The offerings an agent key serves. Raises Forbidden for other keys."""
    if p.kind != "agent":
        raise Forbidden("this route is for provider agents: use an agent key (som agent key create)")
    return p.offering_ids or frozenset()


def _check_provider_offerings(s: Session, org_id: str, offering_ids: Iterable[str]) -> list[str]:
    out = []
    for oid in offering_ids:
        off = s.get(Offering, oid)
        if off is None or off.org_id != org_id:
            raise NotFound(f"offering {oid} not found", denied=oid)
        if off.hosting != "provider":
            raise Conflict(f"offering {oid} is marketplace-hosted: it needs no agent")
        out.append(oid)
    if not out:
        raise Invalid("an agent key needs at least one offering")
    return sorted(set(out))


def create_agent_key(
    s: Session, p: Principal, *, offering_ids: list[str], name: str, ttl_days: int, who: audit.Actor
) -> tuple[ApiKey, str]:
    """A provider creates a key for its agent, bound to its organisation and these offerings."""
    p.require("provider")
    if p.kind == "agent":
        raise Forbidden("an agent key cannot create keys")
    ids = _check_provider_offerings(s, p.org_id, offering_ids)
    row, plaintext = create_key(
        s,
        org_id=p.org_id,
        roles=["provider"],
        name=name or "agent",
        ttl_days=ttl_days,
        kind="agent",
        offering_ids=ids,
        created_by=p.key_id,
    )
    audit.emit(s, who, "agent.key.create", target=row.id, detail={"offerings": ids})
    return row, plaintext


def agent_of(s: Session, p: Principal, agent_id: str) -> Agent:
    agent = s.get(Agent, agent_id)
    if agent is None or agent.key_id != p.key_id:
        raise NotFound(f"agent {agent_id} not found")
    return agent


def hello(
    rt: Runtime,
    p: Principal,
    *,
    name: str,
    seal_public: str,
    capabilities: list[str],
    offering_ids: list[str] | None,
    who: audit.Actor,
) -> Agent:
    """Register a running agent instance. Its ``seal_public`` is what consumers seal inputs to."""
    allowed = require_agent(p)
    try:
        SealPublicKey.from_text(seal_public)
    except KeyMaterialError as e:
        raise Invalid(f"seal_public: {e}") from e
    bad = [c for c in capabilities if c not in CAPABILITIES]
    if bad or not capabilities:
        raise Invalid(f"capabilities must be a non-empty subset of {list(CAPABILITIES)}, got {capabilities}")
    wanted = set(offering_ids) if offering_ids else set(allowed)
    if not wanted <= allowed:
        raise Forbidden(f"this agent key does not serve {sorted(wanted - allowed)}")
    with rt.tx() as s:
        ids = _check_provider_offerings(s, p.org_id, wanted)
        agent = Agent(
            org_id=p.org_id,
            key_id=p.key_id,
            name=name[:200],
            offering_ids=ids,
            seal_public=seal_public,
            capabilities=sorted(set(capabilities)),
        )
        s.add(agent)
        s.flush()
        audit.emit(s, who, "agent.connect", target=agent.id, detail={"offerings": ids, "name": agent.name})
    leases.notify(rt)
    return agent


def heartbeat(
    rt: Runtime, p: Principal, agent_id: str, *, holding: list[str], now: datetime | None = None
) -> dict[str, Any]:
    """Mark the agent alive and extend its leases. Returns ``{"lost": [ids it must drop]}``."""
    require_agent(p)
    now = now or utcnow()
    until = now + timedelta(seconds=rt.settings.agent_lease_seconds)
    with rt.tx() as s:
        agent = agent_of(s, p, agent_id)
        agent.last_seen_at = now
        agent.stopped_at = None
        lost = leases.extend(s, agent.id, holding, until)
    return {"lost": lost, "lease_seconds": rt.settings.agent_lease_seconds}


def bye(rt: Runtime, p: Principal, agent_id: str, who: audit.Actor) -> None:
    require_agent(p)
    with rt.tx() as s:
        agent = agent_of(s, p, agent_id)
        agent.stopped_at = utcnow()
        audit.emit(s, who, "agent.disconnect", target=agent.id)


def _online_clause(rt: Runtime, now: datetime) -> ColumnElement[bool]:
    cutoff = now - timedelta(seconds=rt.settings.agent_offline_seconds)
    return (Agent.last_seen_at >= cutoff) & (Agent.stopped_at.is_(None))


def online_agents(rt: Runtime, s: Session, offering_id: str, *, now: datetime | None = None) -> list[Agent]:
    """Agents serving ``offering_id`` that were seen recently, most recent first."""
    now = now or utcnow()
    rows = s.scalars(select(Agent).where(_online_clause(rt, now)).order_by(Agent.last_seen_at.desc()))
    return [a for a in rows if offering_id in (a.offering_ids or [])]


def is_online(rt: Runtime, s: Session, offering_id: str, *, now: datetime | None = None) -> bool:
    return bool(online_agents(rt, s, offering_id, now=now))


def register_seal_statements(
    rt: Runtime,
    p: Principal,
    agent_id: str,
    statements: list[dict[str, Any]],
    *,
    who: audit.Actor,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Store the provider's signed ``som.seal-key/v1`` statements vouching for the agent's key.

    Each must name one of the agent's offerings and exactly its ``seal_public``, verify under the
    key it carries, not be expired and, if the offering already has offers, be signed by a key
    that signed one of them (a wrong key file on the agent is reported here, not by consumers).
    The marketplace cannot forge them; consumers verify them against their contract's provider
    key before sealing. Raises Invalid (422) with the first problem.
    """
    require_agent(p)
    now = now or utcnow()
    if not statements:
        raise Invalid("statements: expected at least one signed som.seal-key/v1 statement")
    with rt.tx() as s:
        agent = agent_of(s, p, agent_id)
        stored = dict(agent.seal_statements or {})
        for i, raw in enumerate(statements):
            try:
                st = SealKeyStatement.from_dict(raw)
            except ValueError as e:
                raise Invalid(f"statements[{i}]: {e}") from e
            if st.offering_id not in (agent.offering_ids or []):
                raise Invalid(f"statements[{i}]: this agent does not serve offering {st.offering_id}")
            if st.seal_public != agent.seal_public:
                raise Invalid(
                    f"statements[{i}]: vouches for {st.seal_public}, but this agent registered {agent.seal_public}"
                )
            try:
                verify_seal_key(
                    st, provider_key=st.provider_key, offering_id=st.offering_id, seal_public=agent.seal_public, now=now
                )
            except InvalidSignature as e:
                raise Invalid(f"statements[{i}]: the signature does not verify or the statement expired") from e
            offer_keys = set(s.scalars(select(OfferRow.provider_key).where(OfferRow.offering_id == st.offering_id)))
            if offer_keys and st.provider_key not in offer_keys:
                raise Invalid(
                    f"statements[{i}]: signed by {st.provider_key}, but the offers of {st.offering_id} are signed by "
                    f"{sorted(offer_keys)}; start the agent with the provider's signing key (--signing-key)"
                )
            stored[st.offering_id] = st.to_dict()
        agent.seal_statements = stored
        audit.emit(
            s,
            who,
            "agent.seal_key",
            target=agent.id,
            detail={
                "offerings": sorted(stored),
                "seal_public": agent.seal_public,
                "provider_keys": sorted({v["provider_key"] for v in stored.values()}),
            },
        )
    leases.notify(rt)
    return {"id": agent_id, "offering_ids": sorted(stored)}


def _statement_for(agent: Agent, offering_id: str, now: datetime) -> dict[str, Any] | None:
    raw = (agent.seal_statements or {}).get(offering_id)
    if raw is None:
        return None
    try:
        st = SealKeyStatement.from_dict(raw)
    except ValueError:
        return None
    if st.seal_public != agent.seal_public or (st.not_after is not None and st.not_after < now):
        return None
    return dict(raw)


def sealing_key_for(rt: Runtime, s: Session, off: Offering) -> tuple[str, dict[str, Any] | None]:
    """The key consumers seal a provider-hosted offering's job inputs to, and the provider's
    signed statement vouching for it (None if its agent registered none): the freshest agent's,
    preferring agents whose statement is valid.

    Several agents of one offering should share one sealing key file (``som agent --seal-key``);
    a job is only leased to agents holding the key it was sealed to.
    """
    now = utcnow()
    candidates = online_agents(rt, s, off.id) or [
        a
        for a in s.scalars(select(Agent).where(Agent.org_id == off.org_id).order_by(Agent.last_seen_at.desc()))
        if off.id in (a.offering_ids or [])
    ]
    if not candidates:
        raise Unavailable(f"offering {off.id} has no agent yet; the provider must run `som agent`")
    for a in candidates:
        st = _statement_for(a, off.id, now)
        if st is not None:
            return a.seal_public, st
    return candidates[0].seal_public, None
