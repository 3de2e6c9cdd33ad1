"""Agent work dispatch: hand a provider's agent its work, and take its results.

For: the agent protocol's work routes. An agent long-polls :func:`lease` (an HE task first, then
a job), fetches the work's input (:func:`payload`), and posts a result (:func:`post_result`) or a
failure (:func:`post_failure`). Two kinds of work exist, told apart once by the id's prefix
(:func:`_queue_of`), each behind the same :class:`_Queue` face:

    +--------+------------+-----------------------------+-------------------------------------+
    | prefix | table      | input                       | result                              |
    +--------+------------+-----------------------------+-------------------------------------+
    | job_   | jobs       | the consumer's sealed input | sealed result: charged once (jobs)  |
    | tsk_   | agent_tasks| an HE request (run_on_agent)| the HE answer, awaited by a request |
    +--------+------------+-----------------------------+-------------------------------------+

Leases (taking, extending, reaping) are :mod:`marketplace.services.leases`; a task is an HE
evaluation that an API request enqueues with :func:`run_on_agent` and waits for.
Not for: agent keys, presence and sealing statements (:mod:`marketplace.services.agents`) or
the job lifecycle (:mod:`marketplace.services.jobs`).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from marketplace.db.base import new_id, utcnow
from marketplace.db.models_jobs import Agent, AgentTask, Job
from marketplace.errors import Conflict, Invalid, NotFound, Unavailable
from marketplace.runtime import Runtime
from marketplace.services import jobs, keysets, leases
from marketplace.services.agents import agent_of, is_online, require_agent
from marketplace.services.identity import Principal

__all__ = [
    "LEASE_WAIT_MAX",
    "TASK_MAX_ATTEMPTS",
    "lease",
    "load_keyset",
    "payload",
    "post_failure",
    "post_result",
    "run_on_agent",
]

LEASE_WAIT_MAX = 20.0
"""Longest a ``POST /v1/agent/lease`` waits for work before answering 204."""
TASK_MAX_ATTEMPTS = 2
_POLL = 0.25


class _Queue(Protocol):
    """One kind of agent work."""

    def take(self, rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None: ...
    def payload(self, rt: Runtime, p: Principal, agent_id: str, work_id: str) -> bytes: ...
    def result(self, rt: Runtime, p: Principal, agent_id: str, work_id: str, data: bytes) -> dict[str, Any]: ...
    def failure(
        self, rt: Runtime, p: Principal, agent_id: str, work_id: str, reason: str, message: str
    ) -> dict[str, Any]: ...


# -- jobs ---------------------------------------------------------------------------------------


def _job_may_post(p: Principal, agent_id: str) -> jobs.MayPost:
    def check(s: Session, job: Job) -> None:
        agent = agent_of(s, p, agent_id)
        if job.offering_id not in agent.offering_ids or job.hosting != "provider":
            raise NotFound(f"job {job.id} not found")

    return check


class _Jobs:
    def take(self, rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None:
        return jobs.lease_for_agent(rt, s, agent, now)

    def payload(self, rt: Runtime, p: Principal, agent_id: str, work_id: str) -> bytes:
        with rt.tx() as s:
            agent = agent_of(s, p, agent_id)
            job = s.get(Job, work_id)
            if job is None or job.offering_id not in agent.offering_ids or job.hosting != "provider":
                raise NotFound(f"job {work_id} not found")
            if job.status != Job.HELD or job.lease_owner != agent.id:
                raise Conflict(f"job {work_id} is not leased to this agent ({job.status})")
            addr = job.input_blob
        data: bytes = rt.blobs.get(addr)
        return data

    def result(self, rt: Runtime, p: Principal, agent_id: str, work_id: str, data: bytes) -> dict[str, Any]:
        job = jobs.complete(rt, work_id, owner=agent_id, result=data, may_post=_job_may_post(p, agent_id))
        return {"id": work_id, "status": job.status, "charged": job.charged}

    def failure(
        self, rt: Runtime, p: Principal, agent_id: str, work_id: str, reason: str, message: str
    ) -> dict[str, Any]:
        job = jobs.fail(
            rt, work_id, owner=agent_id, reason=reason, message=message, may_post=_job_may_post(p, agent_id)
        )
        return {"id": work_id, "status": job.status}


# -- tasks --------------------------------------------------------------------------------------


def _task_to(t: AgentTask, status: str) -> None:
    """The one place a task's status changes: queued -> leased -> done | failed (or back to queued)."""
    t.status = status


def _reap_tasks(s: Session, now: datetime) -> None:
    """Expired leases go back to the queue (or fail after too many); tasks past their deadline fail."""
    for t in s.scalars(
        select(AgentTask).where(AgentTask.status.in_((AgentTask.QUEUED, AgentTask.HELD)), AgentTask.deadline_at < now)
    ):
        _task_to(t, "failed")
        t.error = "timed out waiting for the agent"

    def give_up(t: AgentTask) -> None:
        _task_to(t, "failed")
        t.error = f"the agent lost the task {t.attempts} times"

    leases.reap(s, AgentTask, now, max_attempts=lambda t: TASK_MAX_ATTEMPTS, move=_task_to, give_up=give_up)


def _held_task(s: Session, p: Principal, agent_id: str, task_id: str) -> AgentTask:
    agent = agent_of(s, p, agent_id)
    t = s.get(AgentTask, task_id)
    if t is None or t.offering_id not in (agent.offering_ids or []):
        raise NotFound(f"task {task_id} not found")
    return t


class _Tasks:
    def take(self, rt: Runtime, s: Session, agent: Agent, now: datetime) -> dict[str, Any] | None:
        if "he_infer" not in agent.capabilities:
            return None
        t = leases.take(
            s,
            AgentTask,
            agent.id,
            now,
            rt.settings.agent_lease_seconds,
            AgentTask.offering_id.in_(agent.offering_ids),
            AgentTask.deadline_at >= now,
            move=_task_to,
        )
        if t is None or t.lease_expires_at is None:
            return None
        return {
            "type": "task",
            "id": t.id,
            "kind": t.kind,
            "offering_id": t.offering_id,
            "meta": t.meta,
            "lease_expires_at": t.lease_expires_at.isoformat(),
            "attempt": t.attempts,
        }

    def payload(self, rt: Runtime, p: Principal, agent_id: str, work_id: str) -> bytes:
        with rt.tx() as s:
            t = _held_task(s, p, agent_id, work_id)
            if t.status != AgentTask.HELD or t.lease_owner != agent_id:
                raise Conflict(f"task {work_id} is not leased to this agent (status {t.status})")
            addr = t.payload_blob
        data: bytes = rt.blobs.get(addr)
        return data

    def result(self, rt: Runtime, p: Principal, agent_id: str, work_id: str, data: bytes) -> dict[str, Any]:
        addr = rt.blobs.put(data)
        with rt.tx() as s:
            t = _held_task(s, p, agent_id, work_id)
            if t.status == "failed":
                raise Conflict(f"task {work_id} already failed: {t.error}")
            if t.status != "done":  # a duplicate post: the first answer stands
                _task_to(t, "done")
                t.result_blob, t.lease_owner = addr, agent_id
        leases.notify(rt, "done")
        return {"id": work_id, "status": "done"}

    def failure(
        self, rt: Runtime, p: Principal, agent_id: str, work_id: str, reason: str, message: str
    ) -> dict[str, Any]:
        with rt.tx() as s:
            t = _held_task(s, p, agent_id, work_id)
            if t.status not in ("done", "failed"):
                _task_to(t, "failed")
                t.error = f"{reason}: {message}"[:2000]
        leases.notify(rt, "done")
        return {"id": work_id, "status": "failed"}


_TASKS, _JOBS = _Tasks(), _Jobs()
_QUEUES: tuple[_Queue, ...] = (_TASKS, _JOBS)
"""In the order :func:`lease` offers them (an HE request is waiting on the line)."""


def _queue_of(work_id: str) -> _Queue:
    """The one place job vs task is decided (by the id's prefix). Raises NotFound."""
    if work_id.startswith("job_"):
        return _JOBS
    if work_id.startswith("tsk_"):
        return _TASKS
    raise NotFound(f"work {work_id} not found")


# -- the agent protocol -------------------------------------------------------------------------


def lease(rt: Runtime, p: Principal, agent_id: str, *, wait: float) -> dict[str, Any] | None:
    """Hand the agent one piece of work (an HE task first, then a job), waiting up to ``wait`` s."""
    require_agent(p)
    wait = max(0.0, min(float(wait), LEASE_WAIT_MAX))
    deadline = time.monotonic() + wait
    bell = leases.bell(rt, "work")
    while True:
        gen = bell.generation()
        now = utcnow()
        with rt.tx() as s:
            agent = agent_of(s, p, agent_id)
            agent.last_seen_at = now
            agent.stopped_at = None
            _reap_tasks(s, now)
            item = None
            for q in _QUEUES:
                item = q.take(rt, s, agent, now)
                if item is not None:
                    break
        if item is not None:
            return item
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        bell.wait(gen, min(_POLL * 4, left))


def payload(rt: Runtime, p: Principal, agent_id: str, work_id: str) -> bytes:
    """The input of work leased to this agent (Conflict if it does not hold the lease)."""
    require_agent(p)
    return _queue_of(work_id).payload(rt, p, agent_id, work_id)


def post_result(rt: Runtime, p: Principal, agent_id: str, work_id: str, data: bytes) -> dict[str, Any]:
    """The agent's result: a job's sealed result (charged once) or a task's answer."""
    require_agent(p)
    return _queue_of(work_id).result(rt, p, agent_id, work_id, data)


def post_failure(
    rt: Runtime, p: Principal, agent_id: str, work_id: str, *, reason: str, message: str
) -> dict[str, Any]:
    """The agent cannot do the work (the reason goes to the consumer)."""
    require_agent(p)
    return _queue_of(work_id).failure(rt, p, agent_id, work_id, reason, message)


def load_keyset(rt: Runtime, p: Principal, keyset_id: str) -> bytes:
    """A consumer's public HE context, for an agent serving the offering it was registered for."""
    require_agent(p)
    data: bytes = keysets.keyset_content(rt, p, keyset_id)
    return data


# -- run_on_agent -------------------------------------------------------------------------------


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
            id=new_id("tsk"),
            offering_id=offering_id,
            kind=kind,
            payload_blob=addr,
            meta=dict(meta),
            deadline_at=now + timedelta(seconds=timeout),
        )
        s.add(task)
        task_id = task.id
    leases.notify(rt)
    bell = leases.bell(rt, "done")
    end = time.monotonic() + timeout
    delay = 0.005
    try:
        while True:
            gen = bell.generation()
            with rt.tx() as s:
                t = s.get(AgentTask, task_id)
                status, result_addr, error = (t.status, t.result_blob, t.error) if t else ("failed", None, "lost")
                if status in (AgentTask.QUEUED, AgentTask.HELD) and time.monotonic() >= end:
                    if t is not None:
                        _task_to(t, "failed")
                        t.error = "timed out"
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
