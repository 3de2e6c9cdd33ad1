"""The job state machine (:mod:`marketplace.services.jobs.states`): the table, and random walks."""

from __future__ import annotations

from collections import deque
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from marketplace.db.base import utcnow
from marketplace.db.models_jobs import Job
from marketplace.services import audit
from marketplace.services.jobs import FINAL, TRANSITIONS, IllegalTransition, JobStatus, finish, move
from marketplace.services.jobs.states import Settlement

S = JobStatus
NOW = utcnow()


class _Session:
    """Stands for the caller's transaction: records what :func:`finish` audits into it."""

    def __init__(self) -> None:
        self.added: list[str] = []


def _audit(s: _Session, who: Any, action: str, **kw: Any) -> None:
    s.added.append(action)


def _job(status: JobStatus = S.CREATED) -> Job:
    return Job(
        id="job_test",
        status=status,
        input_blob="sha256:in",
        result_blob=None,
        reservation={"usage_id": "u"},
        finishing=False,
        charged=False,
        attempts=0,
        lease_owner=None,
        lease_expires_at=None,
        updated_at=NOW,
        deadline_at=NOW + timedelta(hours=1),
    )


def _end(s: _Session, job: Job, to: JobStatus) -> Settlement:
    with mock.patch.object(audit, "emit", _audit):
        return finish(s, job, to, now=NOW, event=f"job.{to}", error="e", reason="r", release="why")  # type: ignore[arg-type]


def _go(s: _Session, job: Job, to: JobStatus) -> Settlement | None:
    if to in FINAL:
        return _end(s, job, to)
    move(job, to, now=NOW)
    return None


def _reachable() -> set[JobStatus]:
    seen, todo = {S.CREATED}, deque([S.CREATED])
    while todo:
        for nxt in TRANSITIONS[todo.popleft()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_table_names_every_state_and_finals_have_no_way_out() -> None:
    assert set(TRANSITIONS) == set(JobStatus)
    assert _reachable() == set(JobStatus)
    for st in FINAL:
        assert TRANSITIONS[st] == frozenset()
    for st in set(JobStatus) - FINAL:
        assert TRANSITIONS[st] & FINAL, f"{st} cannot end"


@pytest.mark.parametrize("frm", list(JobStatus))
@pytest.mark.parametrize("to", list(JobStatus))
def test_every_allowed_move_works_and_every_other_is_refused(frm: JobStatus, to: JobStatus) -> None:
    s, job = _Session(), _job(frm)
    if to in TRANSITIONS[frm]:
        done = _go(s, job, to)
        assert job.status == to
        if to in FINAL:
            assert done is not None and done.purge == ["sha256:in"] and job.input_blob == ""
            assert job.finished_at == NOW and job.lease_owner is None
            assert job.charged == (to is S.SUCCEEDED)
            assert done.release == (None if to is S.SUCCEEDED else {"usage_id": "u"})
            assert s.added == [f"job.{to}"]
        return
    with pytest.raises(IllegalTransition) as e:
        _go(s, job, to)
    assert job.status == frm and job.input_blob == "sha256:in" and not s.added
    assert f"from {frm} to {to}" in e.value.message
    if frm in FINAL:
        assert "it is final" in e.value.message


def test_move_refuses_final_states_and_finish_refuses_live_ones() -> None:
    with pytest.raises(IllegalTransition, match="end a job with finish"):
        move(_job(S.RUNNING), S.SUCCEEDED)
    with pytest.raises(IllegalTransition, match="not final"):
        _end(_Session(), _job(S.RUNNING), S.QUEUED)
    with pytest.raises(ValueError):
        move(_job(), "lost")


EVENTS = list(JobStatus)


@settings(max_examples=300, deadline=None)
@given(hs.lists(hs.sampled_from(EVENTS), max_size=30))
def test_random_walks_stay_in_the_table_and_charge_at_most_once(events: list[JobStatus]) -> None:
    s, job = _Session(), _job()
    reachable = _reachable()
    charges = ends = 0
    for to in events:
        before = job.status
        allowed = to in TRANSITIONS[JobStatus(before)]
        try:
            _go(s, job, to)
        except IllegalTransition:
            assert not allowed and job.status == before
            continue
        assert allowed
        if to is S.SUCCEEDED:
            charges += 1
        if to in FINAL:
            ends += 1
        assert job.status in reachable
    assert charges <= 1 and ends <= 1
    assert job.charged == (job.status == S.SUCCEEDED)
    if job.status in FINAL:
        assert job.input_blob == "" and job.lease_owner is None
