"""Provider review of custom-job code with syft-job's folder workflow (``som agent review``).

For: the provider's approval step of ``custom`` jobs. For each of the provider's jobs awaiting
approval, :class:`SyftReviewBridge` writes a syft-job code request into a plain local folder with
syft-job's own storage API and layout
(``<dir>/<provider email>/app_data/job/inbox/<consumer email>/v1/<job id>/{code/main.py, run.sh,
config.yaml}`` and ``review/.../state.yaml``). The provider reviews it with syft-job's tooling
(``syft_job.get_client(dir, email).jobs``, ``job.code``, ``job.job_headers``) and decides with
``job.approve()`` / ``job.reject(reason)``. The bridge forwards the decision to the marketplace
(``approve_job(job_id, code_digest)`` / ``reject_job``) with the SHA-256 digest of the code file
it reads back, and only if that digest is the job's digest at the marketplace: code changed in
the folder after mirroring is never approved (an error is logged, nothing is sent). The
marketplace commits the decision with its audit event and ``som.job-approval/v1`` ledger leaf.

The folder holds the code, its digest, the job id, kind, units, limits and the consumer's
organisation, never the consumer's inputs: they are sealed to the compute site and the bridge
does not fetch them. Final job states are reflected back into ``state.yaml`` (done, failed,
rejected) without outputs: results go to the consumer sealed, through the marketplace.

Not for: running anything. The bridge never calls syft-job's runner (``process_approved_jobs``):
approved jobs run only in the compute site's jail (``run_isolated``: bubblewrap namespaces,
an unprivileged uid, no network, cgroup limits; docs/jobs.md, "The jail"). The ``run.sh`` it writes refuses to run, so a
syft-job runner pointed at the folder by mistake executes nothing of the consumer's.
The marketplace DB stays the only source of truth; the folder is a review view of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx

from marketplace.compute.payload import code_digest
from marketplace.sdk.base import SomAPIError

__all__ = [
    "EMAIL_DOMAIN",
    "ENTRYPOINT",
    "REFUSING_RUN_SH",
    "ReviewAPI",
    "SyftReviewBridge",
    "SyncReport",
    "consumer_email",
    "provider_email",
]

log = logging.getLogger("som.agent.syft_review")

EMAIL_DOMAIN = "som.invalid"  # syft-job keys folders by e-mail; ours are pseudonyms of org ids
ENTRYPOINT = "main.py"
REFUSING_RUN_SH = """#!/bin/sh
# som: this code request is a review copy. After approval the job runs only in the
# marketplace's sandbox (run_isolated), with the consumer's sealed inputs. Do not run it here.
echo "som: refusing to run; approved jobs run in the som sandbox, not in syft-job's runner" >&2
exit 64
"""
_FINAL = ("succeeded", "failed", "cancelled", "expired")


class ReviewAPI(Protocol):
    """The SDK calls the bridge needs (``marketplace.sdk.jobs_api.JobsAPI`` with a provider key)."""

    def jobs(self, *, role: str = ..., status: str | None = ..., offering_id: str | None = ...) -> list[Any]: ...
    def job(self, job_id: str) -> dict[str, Any]: ...
    def approve_job(self, job_id: str, code_digest: str) -> dict[str, Any]: ...
    def reject_job(self, job_id: str, code_digest: str, reason: str = ...) -> dict[str, Any]: ...


def _pseudo_email(org_id: str) -> str:
    local = re.sub(r"[^A-Za-z0-9._%+-]", "_", org_id) or "org"
    return f"{local}@{EMAIL_DOMAIN}"


def provider_email(org_id: str) -> str:
    """The syft-job datasite owner for the provider organisation ``org_id``."""
    return _pseudo_email(org_id)


def consumer_email(org_id: str) -> str:
    """The syft-job submitter for the consumer organisation ``org_id``."""
    return _pseudo_email(org_id)


def _file_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class SyncReport:
    """What one :meth:`SyftReviewBridge.sync` pass did (job ids)."""

    mirrored: list[str] = field(default_factory=list)
    approved: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # approval not forwarded: code changed in the folder
    reflected: list[str] = field(default_factory=list)  # final marketplace state written to state.yaml


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """syft-job prints progress to stdout; keep it out of the CLI's (JSON) output."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        yield
    if buf.getvalue().strip():
        log.debug("syft-job: %s", buf.getvalue().strip())


class SyftReviewBridge:
    """Mirror custom jobs awaiting approval into a syft-job folder and forward the decisions.

    ``api``: an SDK client with the provider's (user, not agent) key. ``syft_dir``: the folder
    (created if missing; a plain local folder, no SyftBox sync needed). ``email``: the provider's
    syft-job identity (default: a pseudonym of ``org_id``). ``offering_ids``: only these offerings
    (default: all of the provider's).
    """

    def __init__(
        self,
        api: ReviewAPI,
        syft_dir: Path,
        *,
        email: str,
        offering_ids: Sequence[str] = (),
    ) -> None:
        # start-up cost: syft-job (and syft) take over a second to import
        from syft_job import JobClient, SyftJobConfig

        os.environ.setdefault("UV_PYTHON_DOWNLOADS", "never")  # belt and braces: we never run jobs
        self.api = api
        self.dir = Path(syft_dir).expanduser().resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.email = email
        self.offering_ids = tuple(offering_ids)
        with _quiet():
            self.owner = JobClient(SyftJobConfig(syftbox_folder=self.dir, current_user_email=email, has_do_role=True))
        self._refused: set[tuple[str, str]] = set()

    # -- paths -------------------------------------------------------------------------------

    def _refs(self) -> dict[str, Any]:
        """job id -> syft-job JobRef of every code request in the provider's inbox."""
        return {ref.job_name: ref for ref in self.owner.manager.iter_submission_refs(self.email)}

    def code_path(self, job_id: str) -> Path | None:
        """The mirrored code file of ``job_id`` (what the provider reviews), if mirrored."""
        ref = self._refs().get(job_id)
        return None if ref is None else Path(self.owner.manager.submission_dir(ref)) / "code" / ENTRYPOINT

    # -- mirroring ---------------------------------------------------------------------------

    def mirror(self, job: dict[str, Any]) -> bool:
        """Write ``job`` (an API job view awaiting approval) as a syft-job code request with a
        fresh ``pending`` state. Returns False if it is already mirrored or cannot be."""
        # start-up cost: syft-job (and syft) take over a second to import
        from syft_job import JobClient, SyftJobConfig
        from syft_job.models import JobSubmissionMetadata  # start-up cost

        job_id, code, digest = str(job["id"]), job.get("code"), job.get("code_digest")
        if job.get("kind") != "custom" or not isinstance(code, str) or not digest:
            return False
        if code_digest(code) != digest:
            log.error(
                "job %s: the marketplace sent code whose digest is not the job's %s; not mirrored", job_id, digest
            )
            return False
        if job_id in self._refs():
            return False
        submitter = consumer_email(str(job["org_id"]))
        with _quiet():
            ds = JobClient(
                SyftJobConfig(syftbox_folder=self.dir, current_user_email=submitter),
                target_datasite_owner_email=self.email,
            )
            ref = ds.manager.new_submission_ref(self.email, job_id)
            job_dir = Path(ds.manager.submission_dir(ref))
            (job_dir / "code").mkdir(parents=True, exist_ok=True)
            (job_dir / "code" / ENTRYPOINT).write_bytes(code.encode("utf-8"))
            run_sh = job_dir / "run.sh"
            run_sh.write_text(REFUSING_RUN_SH)
            run_sh.chmod(0o755)
            meta = JobSubmissionMetadata(
                name=job_id,
                type="python",
                submitted_by=submitter,
                datasite_email=self.email,
                submitted_at=_when(job.get("created_at")),
                entrypoint=ENTRYPOINT,
                dependencies=[],
                files=[ENTRYPOINT],
                is_folder_submission=False,
                headers={
                    "som_job_id": job_id,
                    "som_offering_id": job.get("offering_id"),
                    "som_kind": "custom",
                    "som_code_digest": digest,
                    "som_units": job.get("units"),
                    "som_limits": job.get("limits") or {},
                    "som_consumer_org": job.get("org_id"),
                    "som_contract_id": job.get("contract_id"),
                    "som_hosting": job.get("hosting"),
                    "som_deadline_at": str(job.get("deadline_at") or ""),
                    "som_note": "review code/main.py; approve() or reject(reason) here and `som agent review` "
                    "forwards it to the marketplace. Do not run process_approved_jobs: approved jobs run only "
                    "in the som sandbox. Inputs are sealed and never in this folder.",
                },
            )
            ds.manager.write_submission(ref, meta)  # config.yaml last: the request is complete
            self.owner.receive_job(ref.ds_email, ref.job_name, ref.protocol_version)  # state: pending (fresh)
        log.info("job %s mirrored for review (%s) at %s", job_id, digest, job_dir)
        return True

    # -- decisions ---------------------------------------------------------------------------

    def _approve(self, job: dict[str, Any], ref: Any, report: SyncReport) -> None:
        job_id, want = str(job["id"]), str(job["code_digest"])
        sub_dir = Path(self.owner.manager.submission_dir(ref))
        code_dir = sub_dir / "code"
        problems: list[str] = []
        try:
            got = _file_digest((code_dir / ENTRYPOINT).read_bytes())
        except OSError as e:
            got = f"unreadable ({e.strerror or e})"
        if got != want:
            problems.append(f"{code_dir / ENTRYPOINT} has digest {got}, the job's code has {want}")
        extra = (
            sorted(p.name for p in code_dir.iterdir() if p.name not in (ENTRYPOINT, "syft.pub.yaml"))
            if code_dir.is_dir()
            else []
        )
        if extra:
            problems.append(f"{code_dir} holds files that are not the job's code: {extra}")
        try:
            recorded = self.owner.manager.read_submission(ref).headers.get("som_code_digest")
        except Exception as e:  # noqa: BLE001 - any unreadable or invalid config.yaml is a refusal
            recorded = f"unreadable ({type(e).__name__})"
        if recorded != want:
            problems.append(f"config.yaml records digest {recorded}, the job's code has {want}")
        if problems:
            report.refused.append(job_id)
            if (job_id, got) not in self._refused:
                self._refused.add((job_id, got))
                log.error(
                    "refusing to approve job %s: the code in the review folder is not the code the consumer "
                    "submitted (%s). Nothing was sent; the job still awaits approval. Delete %s and its review "
                    "folder to have it mirrored again, or reject it.",
                    job_id,
                    "; ".join(problems),
                    sub_dir,
                )
            return
        self.api.approve_job(job_id, got)
        report.approved.append(job_id)
        log.info("job %s approved at the marketplace (%s)", job_id, got)

    def _reject(self, job: dict[str, Any], state: Any, report: SyncReport) -> None:
        job_id = str(job["id"])
        reason = (state.review_reason or "rejected in the syft-job review")[:500]
        self.api.reject_job(job_id, str(job["code_digest"]), reason=reason)
        report.rejected.append(job_id)
        log.info("job %s rejected at the marketplace: %s", job_id, reason)

    def _reflect(self, ref: Any, state: Any, report: SyncReport) -> None:
        """Write the marketplace's final state of a mirrored job into its state.yaml."""
        # start-up cost: syft-job (and syft) take over a second to import
        from syft_job.models import JobStatus

        job_id = str(ref.job_name)
        try:
            job = self.api.job(job_id)
        except SomAPIError as e:
            if e.status != 404:
                raise
            job = {"status": "failed", "error_reason": "not_found", "error": "not found at the marketplace"}
        status = job["status"]
        if status not in _FINAL:
            return
        now = _when(job.get("finished_at"))
        if status == "succeeded":
            state.status, state.completed_at, state.return_code = JobStatus.DONE, now, 0
        elif job.get("error_reason") == "rejected":
            state.status, state.rejected_at = JobStatus.REJECTED, state.rejected_at or now
            state.rejected_by = state.rejected_by or "marketplace"
            state.review_reason = state.review_reason or job.get("error")
        else:
            state.status, state.completed_at = JobStatus.FAILED, now
            state.review_reason = f"{status}: {job.get('error_reason') or ''} {job.get('error') or ''}".strip()[:500]
        with _quiet():
            self.owner.manager.write_state(ref, state)
        report.reflected.append(job_id)

    # -- the loop ----------------------------------------------------------------------------

    def _awaiting(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for oid in self.offering_ids or (None,):
            for j in self.api.jobs(role="provider", status="awaiting_approval", offering_id=oid):
                if j.get("kind") == "custom":
                    out[str(j["id"])] = j
        return out

    def sync(self) -> SyncReport:
        """One pass: mirror new jobs awaiting approval, forward the provider's syft-job decisions,
        reflect final marketplace states. Raises SomAPIError / httpx errors from the API."""
        # start-up cost: syft-job (and syft) take over a second to import
        from syft_job.job_ref import JobStateNotFoundError
        from syft_job.models import JobStatus  # start-up cost

        report = SyncReport()
        awaiting = self._awaiting()
        for pending in awaiting.values():
            if self.mirror(pending):
                report.mirrored.append(str(pending["id"]))
        for job_id, ref in self._refs().items():
            try:
                state = self.owner.manager.read_state(ref)
            except JobStateNotFoundError:
                continue  # a request we did not finish writing (or not ours): never decided
            job = awaiting.get(job_id)
            try:
                if job is not None:
                    if state.status == JobStatus.APPROVED:
                        self._approve(job, ref, report)
                    elif state.status == JobStatus.REJECTED:
                        self._reject(job, state, report)
                elif state.status in (JobStatus.PENDING, JobStatus.APPROVED, JobStatus.RUNNING):
                    self._reflect(ref, state, report)
            except SomAPIError as e:
                if e.status not in (404, 409):
                    raise
                log.warning("job %s: the marketplace refused the decision: %s", job_id, e.message)
        return report

    def run(self, stop: threading.Event | None = None, *, interval: float = 2.0, once: bool = False) -> None:
        """Sync every ``interval`` seconds until ``stop`` is set (API outages are retried)."""
        stop = stop or threading.Event()
        while True:
            try:
                self.sync()
            except (httpx.TransportError, SomAPIError) as e:
                if isinstance(e, SomAPIError) and e.status in (401, 403):
                    log.error("the API refused the key (%s): use a provider key, not an agent key", e)
                    raise
                log.warning("syft review: %s; retrying", e)
            if once or stop.wait(interval):
                return


def _when(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        with contextlib.suppress(ValueError):
            d = datetime.fromisoformat(value)
            return d if d.tzinfo else d.replace(tzinfo=UTC)
    return datetime.now(UTC)
