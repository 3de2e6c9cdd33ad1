"""Remote-execution jobs (DESIGN §4): ``from marketplace.services import jobs`` is the public API.

The package, one concern a module:

- :mod:`.states`: ``JobStatus``, ``JobKind``, the transition table, ``move`` and ``finish`` (the
  only code that changes a job's status; every end goes through ``finish``).
- :mod:`.lifecycle`: create, submit the sealed input, approve/reject custom code, cancel, fetch.
- :mod:`.leasing`: jobs on the lease mechanism (:mod:`marketplace.services.leases`).
- :mod:`.results`: a compute site's result (charged once) or failure (units released).
- :mod:`.background`: the sweeper and the local worker threads.
- :mod:`.local`: running a marketplace-hosted job here (the compute site's part).
- :mod:`.views`: the public form of a job, access by id, paginated lists.
- :mod:`.sitekey`: the marketplace's own sealing key.

Not for: handing work to provider agents and taking their results
(:mod:`marketplace.services.dispatch`) or agent presence (:mod:`marketplace.services.agents`).
"""

from __future__ import annotations

from marketplace.services.jobs.background import SWEEP_SECONDS, ensure_background, sweep
from marketplace.services.jobs.leasing import lease_for_agent, lease_local, reap_lost
from marketplace.services.jobs.lifecycle import (
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUT_SECONDS,
    FETCHED_GRACE_SECONDS,
    MAX_LIMITS,
    approve,
    cancel,
    check_jail,
    create,
    decide,
    fetch_result,
    submit_input,
)
from marketplace.services.jobs.local import run_marketplace_job
from marketplace.services.jobs.results import MayPost, charge, check_sealed, complete, fail
from marketplace.services.jobs.sitekey import marketplace_seal_key
from marketplace.services.jobs.states import (
    FINAL,
    KINDS,
    TRANSITIONS,
    IllegalTransition,
    JobKind,
    JobStatus,
    Settlement,
    finish,
    move,
)
from marketplace.services.jobs.views import get_for, list_for, own, view

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT_SECONDS",
    "FETCHED_GRACE_SECONDS",
    "FINAL",
    "KINDS",
    "MAX_LIMITS",
    "SWEEP_SECONDS",
    "TRANSITIONS",
    "IllegalTransition",
    "JobKind",
    "JobStatus",
    "MayPost",
    "Settlement",
    "approve",
    "cancel",
    "charge",
    "check_jail",
    "check_sealed",
    "complete",
    "create",
    "decide",
    "ensure_background",
    "fail",
    "fetch_result",
    "finish",
    "get_for",
    "lease_for_agent",
    "lease_local",
    "list_for",
    "marketplace_seal_key",
    "move",
    "own",
    "reap_lost",
    "run_marketplace_job",
    "submit_input",
    "sweep",
    "view",
]
