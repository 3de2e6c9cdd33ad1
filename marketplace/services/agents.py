"""Provider agents: keys, presence, the work queue they long-poll, and ``run_on_agent``.

For: provider-hosted offerings, whose weights stay on the provider's machine. A ``som agent``
process authenticates with an *agent key* (ApiKey kind="agent", bound to its organisation and
offerings), says hello with the public key that job inputs are sealed to, long-polls
:func:`lease` (outbound HTTP only), heartbeats, and posts results. :func:`run_on_agent` lets an
API request (HE inference) enqueue a task for an online agent and wait for its answer.
Not for: the jobs' lifecycle and metering (:mod:`marketplace.services.jobs`) or running
anything itself.

Leases: every piece of work handed to an agent carries a lease of ``settings.agent_lease_seconds``
that heartbeats extend; work whose lease ran out goes back to the queue (or fails after too many
attempts), so a killed agent loses nothing. Waiting is in-process (a condition variable notified
on enqueue and on result) with a short DB poll as the fallback for other replicas.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from marketplace.db.base import new_id, utcnow
from marketplace.db.models import ApiKey, Offering
from marketplace.db.models_jobs import Agent, AgentTask
from marketplace.errors import Conflict, Forbidden, Invalid, NotFound, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import audit
from marketplace.services.identity import Principal, create_key

__all__ = [
    "CAPABILITIES",
    "LEASE_WAIT_MAX",
    "TASK_MAX_ATTEMPTS",
    "agent_of",
    "bye",
    "complete_task",
    "create_agent_key",
    "fail_task",
    "heartbeat",
    "hello",
    "is_online",
    "lease",
    "notify",
    "online_agents",
    "require_agent",
    "register_seal_statements",
    "run_on_agent",
    "sealing_key_for",
    "load_keyset",
    "task_payload",
]

CAPABILITIES = ("predict", "evaluate", "custom", "he_infer", "gateway")
LEASE_WAIT_MAX = 20.0
"""Longest a ``POST /v1/agent/lease`` waits for work before answering 204."""
TASK_MAX_ATTEMPTS = 2
_POLL = 0.25


# -- in-process wake-ups ------------------------------------------------------------------


class _Bell:
    """A condition variable with a generation counter: waiters wake on any ring."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._gen = 0

    def ring(self) -> None:
        with self._cv:
            self._gen += 1
            self._cv.notify_all()

    def generation(self) -> int:
        with self._cv:
            return self._gen

    def wait(self, gen: int, timeout: float) -> None:
        with self._cv:
            if self._gen == gen:
                self._cv.wait(timeout)


def _bell(rt: Runtime, name: str) -> _Bell:
    key = f"agents.bell.{name}"
    bell = rt.extras.get(key)
    if bell is None:
        bell = rt.extras.setdefault(key, _Bell())
    return bell  # type: ignore[no-any-return]


def notify(rt: Runtime, name: str = "work") -> None:
    """Wake waiters: ``work`` (agents and workers waiting for work) or ``done`` (result waiters)."""
    _bell(rt, name).ring()


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
            raise NotFound(f"offering {oid} not found", denied=oid if off is not None else None)
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
        s, org_id=p.org_id, roles=["provider"], name=name or "agent", ttl_days=ttl_days,
        kind="agent", offering_ids=ids, created_by=p.key_id,
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
    from crypto.errors import KeyMaterialError
    from crypto.sealing import SealPublicKey

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
            org_id=p.org_id, key_id=p.key_id, name=name[:200], offering_ids=ids,
            seal_public=seal_public, capabilities=sorted(set(capabilities)),
        )
        s.add(agent)
        s.flush()
        audit.emit(s, who, "agent.connect", target=agent.id, detail={"offerings": ids, "name": agent.name})
    notify(rt)
    return agent


def _extend(s: Session, model: Any, owner: str, ids: list[str], until: datetime) -> list[str]:
    """Extend the leases ``owner`` holds on ``ids``; returns the ids it no longer holds."""
    if not ids:
        return []
    held = set(
        s.scalars(select(model.id).where(model.id.in_(ids), model.lease_owner == owner, _active(model)))
    )
    if held:
        s.execute(update(model).where(model.id.in_(held)).values(lease_expires_at=until))
    return [i for i in ids if i not in held]


def _active(model: Any) -> Any:
    return model.status == ("running" if model.__tablename__ == "jobs" else "leased")


def heartbeat(rt: Runtime, p: Principal, agent_id: str, *, holding: list[str], now: datetime | None = None) -> dict[str, Any]:
    """Mark the agent alive and extend its leases. Returns ``{"lost": [ids it must drop]}``."""
    from marketplace.db.models_jobs import Job

    require_agent(p)
    now = now or utcnow()
    until = now + timedelta(seconds=rt.settings.agent_lease_seconds)
    with rt.tx() as s:
        agent = agent_of(s, p, agent_id)
        agent.last_seen_at = now
        agent.stopped_at = None
        lost = _extend(s, Job, agent.id, [h for h in holding if h.startswith("job_")], until)
        lost += _extend(s, AgentTask, agent.id, [h for h in holding if h.startswith("tsk_")], until)
    return {"lost": lost, "lease_seconds": rt.settings.agent_lease_seconds}


def bye(rt: Runtime, p: Principal, agent_id: str, who: audit.Actor) -> None:
    require_agent(p)
    with rt.tx() as s:
        agent = agent_of(s, p, agent_id)
        agent.stopped_at = utcnow()
        audit.emit(s, who, "agent.disconnect", target=agent.id)


def _online_clause(rt: Runtime, now: datetime) -> Any:
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
    rt: Runtime, p: Principal, agent_id: str, statements: list[dict[str, Any]], *, who: audit.Actor,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Store the provider's signed ``som.seal-key/v1`` statements vouching for the agent's key.

    Each must name one of the agent's offerings and exactly its ``seal_public``, verify under the
    key it carries, not be expired and, if the offering already has offers, be signed by a key
    that signed one of them (a wrong key file on the agent is reported here, not by consumers).
    The marketplace cannot forge them; consumers verify them against their contract's provider
    key before sealing. Raises Invalid (422) with the first problem.
    """
    from crypto.errors import InvalidSignature
    from marketplace.agent.sealkey import SealKeyStatement, verify_seal_key
    from marketplace.db.models_contracts import OfferRow

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
                raise Invalid(f"statements[{i}]: vouches for {st.seal_public}, but this agent registered {agent.seal_public}")
            try:
                verify_seal_key(st, provider_key=st.provider_key, offering_id=st.offering_id,
                                seal_public=agent.seal_public, now=now)
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
        audit.emit(s, who, "agent.seal_key", target=agent.id, detail={
            "offerings": sorted(stored), "seal_public": agent.seal_public,
            "provider_keys": sorted({v["provider_key"] for v in stored.values()}),
        })
    notify(rt)
    return {"id": agent_id, "offering_ids": sorted(stored)}


def _statement_for(agent: Agent, offering_id: str, now: datetime) -> dict[str, Any] | None:
    from marketplace.agent.sealkey import SealKeyStatement

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


# -- the queue ------------------------------------------------------------------------------


def _reap_tasks(s: Session, now: datetime) -> None:
    """Expired leases go back to the queue; tasks past their deadline fail."""
    for t in s.scalars(
        select(AgentTask).where(
            or_(
                (AgentTask.status == "leased") & (AgentTask.lease_expires_at < now),
                (AgentTask.status.in_(("queued", "leased"))) & (AgentTask.deadline_at < now),
            )
        )
    ):
        if t.deadline_at < now:
            t.status, t.error = "failed", "timed out waiting for the agent"
        elif t.attempts >= TASK_MAX_ATTEMPTS:
            t.status, t.error = "failed", f"the agent lost the task {t.attempts} times"
        else:
            t.status, t.lease_owner, t.lease_expires_at = "queued", None, None


def _lease_task(rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None:
    if "he_infer" not in agent.capabilities:
        return None
    stmt = (
        select(AgentTask)
        .where(AgentTask.status == "queued", AgentTask.offering_id.in_(agent.offering_ids), AgentTask.deadline_at >= now)
        .order_by(AgentTask.created_at)
        .limit(1)
    )
    if s.bind is not None and s.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=True)
    t = s.scalar(stmt)
    if t is None:
        return None
    t.status = "leased"
    t.attempts += 1
    t.lease_owner = agent.id
    t.lease_expires_at = now + timedelta(seconds=rt.settings.agent_lease_seconds)
    return {
        "type": "task", "id": t.id, "kind": t.kind, "offering_id": t.offering_id, "meta": t.meta,
        "lease_expires_at": t.lease_expires_at.isoformat(), "attempt": t.attempts,
    }


def lease(rt: Runtime, p: Principal, agent_id: str, *, wait: float) -> dict[str, Any] | None:
    """Hand the agent one piece of work (an HE task first, then a job), waiting up to ``wait`` s."""
    from marketplace.services import jobs

    require_agent(p)
    wait = max(0.0, min(float(wait), LEASE_WAIT_MAX))
    deadline = time.monotonic() + wait
    bell = _bell(rt, "work")
    while True:
        gen = bell.generation()
        now = utcnow()
        with rt.tx() as s:
            agent = agent_of(s, p, agent_id)
            agent.last_seen_at = now
            agent.stopped_at = None
            _reap_tasks(s, now)
            item = _lease_task(rt, s, agent, now) or jobs.lease_for_agent(rt, s, agent, now)
        if item is not None:
            return item
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        bell.wait(gen, min(_POLL * 4, left))


def _held_task(s: Session, p: Principal, agent_id: str, task_id: str) -> AgentTask:
    agent = agent_of(s, p, agent_id)
    t = s.get(AgentTask, task_id)
    if t is None or t.offering_id not in (agent.offering_ids or []):
        raise NotFound(f"task {task_id} not found")
    return t


def task_payload(rt: Runtime, p: Principal, agent_id: str, task_id: str) -> bytes:
    require_agent(p)
    with rt.tx() as s:
        t = _held_task(s, p, agent_id, task_id)
        if t.status != "leased" or t.lease_owner != agent_id:
            raise Conflict(f"task {task_id} is not leased to this agent (status {t.status})")
        addr = t.payload_blob
    data: bytes = rt.blobs.get(addr)
    return data


def complete_task(rt: Runtime, p: Principal, agent_id: str, task_id: str, result: bytes) -> None:
    require_agent(p)
    addr = rt.blobs.put(result)
    with rt.tx() as s:
        t = _held_task(s, p, agent_id, task_id)
        if t.status == "done":
            return  # a duplicate post: the first answer stands
        if t.status == "failed":
            raise Conflict(f"task {task_id} already failed: {t.error}")
        t.status, t.result_blob, t.lease_owner = "done", addr, agent_id
    notify(rt, "done")


def fail_task(rt: Runtime, p: Principal, agent_id: str, task_id: str, message: str) -> None:
    require_agent(p)
    with rt.tx() as s:
        t = _held_task(s, p, agent_id, task_id)
        if t.status in ("done", "failed"):
            return
        t.status, t.error = "failed", message[:2000]
    notify(rt, "done")


# -- keysets for HE tasks -------------------------------------------------------------------


def load_keyset(rt: Runtime, p: Principal, keyset_id: str) -> bytes:
    """A consumer's public context, for an agent serving the offering it was registered for."""
    from marketplace.services import he

    require_agent(p)
    data: bytes = he.keyset_content(rt, p, keyset_id)
    return data


# -- run_on_agent ---------------------------------------------------------------------------


def run_on_agent(
    rt: Runtime, *, offering_id: str, kind: str = "he_infer", payload: bytes, meta: dict[str, Any], timeout: float
) -> bytes:
    """Enqueue ``payload`` for an online agent of ``offering_id`` and wait for its answer.

    Raises Unavailable (503) if no agent is online, if the agent reports a failure, or if no
    answer comes within ``timeout`` seconds; Invalid for an unknown ``kind``. The payload and
    the answer pass through the blob store and are deleted afterwards.
    """
    if kind not in ("he_infer",):
        raise Invalid(f"kind must be 'he_infer', got {kind!r}")
    if not isinstance(payload, bytes):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    addr = rt.blobs.put(payload)
    now = utcnow()
    with rt.tx() as s:
        if not is_online(rt, s, offering_id, now=now):
            raise Unavailable(f"no agent is online for offering {offering_id}; try again later")
        task = AgentTask(
            id=new_id("tsk"), offering_id=offering_id, kind=kind, payload_blob=addr, meta=dict(meta),
            deadline_at=now + timedelta(seconds=timeout),
        )
        s.add(task)
        task_id = task.id
    notify(rt)
    bell = _bell(rt, "done")
    end = time.monotonic() + timeout
    delay = 0.005
    try:
        while True:
            gen = bell.generation()
            with rt.tx() as s:
                t = s.get(AgentTask, task_id)
                status, result_addr, error = (t.status, t.result_blob, t.error) if t else ("failed", None, "lost")
                if status in ("queued", "leased") and time.monotonic() >= end:
                    if t is not None:
                        t.status, t.error = "failed", "timed out"
                    status, error = "failed", None
            if status == "done" and result_addr:
                out: bytes = rt.blobs.get(result_addr)
                rt.blobs.delete(result_addr)
                return out
            if status == "failed":
                if error is None:
                    raise Unavailable(f"the agent did not answer within {timeout:g} s")
                raise Unavailable(f"the agent could not compute this: {error}")
            bell.wait(gen, min(delay, max(0.0, end - time.monotonic()) + 0.001))
            delay = min(delay * 2, _POLL)
    finally:
        rt.blobs.delete(addr)
        with rt.tx() as s:
            s.execute(update(AgentTask).where(AgentTask.id == task_id).values(result_blob=None))
