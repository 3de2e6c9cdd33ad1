"""SDK mixin: remote-execution jobs (sealed end to end) and agent keys.

``submit_job`` creates the job, seals the input to the compute site's key (HPKE, with a fresh
reply key unless one is given) and uploads it; keep the returned reply key to open the result
(``job_result``). The server only ever sees sealed bytes.

For a provider-hosted offering the compute site's key must be vouched for by the provider: before
sealing, ``submit_job`` checks the job's ``som.seal-key/v1`` statement
(:mod:`marketplace.agent.sealkey`) against the provider key of the consumer's own contract
(whose signatures it verifies locally), or against ``provider_key=`` when pinned, and raises
:class:`SealKeyRefused` otherwise. The operator could otherwise name its own key and read the input.
"""

from __future__ import annotations

import contextlib
import io
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from crypto.errors import CryptoError
from crypto.sealing import SealKeyPair
from marketplace.agent.sealkey import verify_seal_key
from marketplace.compute.payload import JobInput, JobResult, code_digest, open_result, seal_input
from marketplace.sdk.base import BaseClient, SomAPIError
from marketplace.sdk.retry import send_with_retries

__all__ = ["JobsAPI", "SealKeyRefused", "SubmittedJob", "count_rows"]


class SealKeyRefused(ValueError):
    """The compute site's sealing key is not vouched for by the provider key you trust: nothing
    was sealed or sent (the created job is cancelled)."""


FINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class SubmittedJob:
    job: dict[str, Any]
    reply_key: SealKeyPair

    @property
    def id(self) -> str:
        return str(self.job["id"])


def count_rows(data: bytes, fmt: str) -> int:
    """Rows in a CSV (without a header line) or the first axis of an .npy / npz ``x``."""
    # lazy import: start-up cost of numpy, only when rows are counted
    import numpy as np

    if fmt == "csv":
        lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        if lines and any(c.isalpha() and c not in "eE" for c in lines[0].replace("nan", "")):
            lines = lines[1:]
        return max(1, len(lines))
    if fmt == "npy":
        return max(1, int(np.load(io.BytesIO(data), allow_pickle=False).shape[0]))
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        return max(1, int(f["x"].shape[0]))


class JobsAPI(BaseClient):
    # -- consumer ---------------------------------------------------------------------------

    def create_job(
        self,
        offering_id: str,
        kind: str,
        *,
        units: int = 1,
        code: str | None = None,
        limits: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
        contract_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"offering_id": offering_id, "kind": kind, "units": units}
        for k, v in (
            ("code", code),
            ("limits", limits),
            ("timeout_seconds", timeout_seconds),
            ("contract_id", contract_id),
        ):
            if v is not None:
                body[k] = v
        key = idempotency_key or str(uuid.uuid4())  # made once: every retry below carries it
        out: dict[str, Any] = self.request_idempotent("POST", "/v1/jobs", key, json=body).json()
        return out

    def upload_job_payload(self, job_id: str, sealed: bytes) -> dict[str, Any]:
        # idempotent by its bytes (the same sealed payload again returns the job): safe to retry
        r = send_with_retries(
            lambda: self._http.request(
                "POST",
                f"/v1/jobs/{job_id}/payload",
                content=sealed,
                headers={"Content-Type": "application/octet-stream"},
            ),
            self.retry,
        )
        self._raise(r)
        out: dict[str, Any] = r.json()
        return out

    def submit_job(
        self,
        offering_id: str,
        kind: str,
        data: bytes,
        *,
        format: str = "csv",
        code: str | None = None,
        units: int | None = None,
        limits: dict[str, Any] | None = None,
        timeout_seconds: float | None = None,
        contract_id: str | None = None,
        params: dict[str, Any] | None = None,
        reply_key: SealKeyPair | None = None,
        idempotency_key: str | None = None,
        provider_key: str | None = None,
        consumer_key: str | None = None,
        now: datetime | None = None,
    ) -> SubmittedJob:
        """Create, seal and submit a job. ``units`` defaults to the rows in ``data``.

        Provider-hosted offerings (and any job when ``provider_key`` is pinned): the sealing key
        must carry a valid statement signed by ``provider_key`` if given, else by the provider key
        of your contract for the offering (``contract_id``, else your single live one), whose
        signatures are verified here (``consumer_key`` pins your own acceptance key too). Raises
        :class:`SealKeyRefused` before anything is sealed; SomAPIError for server refusals.
        """
        if units is None:
            units = count_rows(data, format) if kind != "custom" else 1
        reply = reply_key or SealKeyPair.generate()
        job = self.create_job(
            offering_id,
            kind,
            units=units,
            code=code,
            limits=limits,
            timeout_seconds=timeout_seconds,
            contract_id=contract_id,
            idempotency_key=idempotency_key,
        )
        if job.get("hosting") == "provider" or provider_key is not None:
            try:
                self.verify_seal_key(
                    job, provider_key=provider_key, consumer_key=consumer_key, contract_id=contract_id, now=now
                )
            except (SealKeyRefused, SomAPIError):
                with contextlib.suppress(SomAPIError):
                    self.cancel_job(str(job["id"]))
                raise
        inp = JobInput(
            job_id=job["id"],
            kind=kind,
            reply_public=reply.public_text(),
            data=data,
            format=format,
            code=code,
            params=params or {},
        )
        job = self.upload_job_payload(job["id"], seal_input(job["seal_public"], inp))
        return SubmittedJob(job=job, reply_key=reply)

    def verify_seal_key(
        self,
        job: dict[str, Any],
        *,
        provider_key: str | None = None,
        consumer_key: str | None = None,
        contract_id: str | None = None,
        now: datetime | None = None,
    ) -> str:
        """Check that ``job['seal_public']`` is vouched for by the provider; returns the provider
        key it was checked against. Raises :class:`SealKeyRefused` (with what to do next)."""
        offering_id = str(job["offering_id"])
        anchor = provider_key or self._contract_provider_key(
            offering_id, contract_id or job.get("contract_id"), consumer_key=consumer_key
        )
        if not job.get("seal_statement"):
            raise SealKeyRefused(
                f"refusing to seal job {job['id']}: the marketplace names sealing key {job['seal_public']} for "
                f"offering {offering_id} without a statement signed by the provider ({anchor}); the provider's "
                f"agent must run with its signing key (som agent --signing-key)"
            )
        try:
            verify_seal_key(
                job["seal_statement"],
                provider_key=anchor,
                offering_id=offering_id,
                seal_public=str(job["seal_public"]),
                now=now,
            )
        except CryptoError as e:
            raise SealKeyRefused(
                f"refusing to seal job {job['id']}: sealing key {job['seal_public']} is not vouched for by the "
                f"provider key {anchor} of your contract (wrong, expired or substituted statement); "
                f"nothing was sent"
            ) from e
        return anchor

    def _contract_provider_key(self, offering_id: str, contract_id: str | None, *, consumer_key: str | None) -> str:
        """The provider key of the caller's contract for ``offering_id``, after verifying the
        contract's signatures locally (not trusting the server's word for the key)."""
        # lazy import: start-up cost, only when a provider key is checked
        from contracts.offer import Contract, verify_contract

        if contract_id:
            rows = [self.get_json(f"/v1/contracts/{contract_id}")]
        else:
            rows = [
                c
                for c in self.paginate("/v1/contracts", role="consumer", offering_id=offering_id)
                if c.get("status") != "terminated"
            ]
            if len(rows) > 1:
                rows = [c for c in rows if c.get("status") == "active"]
        if len(rows) != 1:
            raise SealKeyRefused(
                f"cannot tell which provider key to trust for offering {offering_id}: you have {len(rows)} live "
                f"contracts for it; pass contract_id= (or pin provider_key=)"
            )
        try:
            contract = Contract.from_dict(rows[0]["contract"])
            verify_contract(contract, consumer_key=consumer_key)
        except (CryptoError, ValueError, KeyError, TypeError) as e:
            raise SealKeyRefused(f"contract {rows[0].get('id')} does not verify: {e}") from e
        if contract.offer.offering_id != offering_id:
            raise SealKeyRefused(
                f"contract {rows[0].get('id')} is for offering {contract.offer.offering_id}, not {offering_id}"
            )
        return contract.offer.provider_key

    def job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get_json(f"/v1/jobs/{job_id}")
        return out

    def jobs(self, *, role: str = "consumer", status: str | None = None, offering_id: str | None = None) -> list[Any]:
        return self.paginate("/v1/jobs", role=role, status=status, offering_id=offering_id)

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self.post_json(f"/v1/jobs/{job_id}/cancel")
        return out

    def wait_job(self, job_id: str, *, timeout: float = 300.0, poll: float = 0.2) -> dict[str, Any]:
        """Poll until the job is final (or ``timeout`` passes; then the last state)."""
        end = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in FINAL or time.monotonic() >= end:
                return job
            time.sleep(poll)

    def job_result_sealed(self, job_id: str) -> tuple[bytes, dict[str, str]]:
        r = self.request("GET", f"/v1/jobs/{job_id}/result")
        return r.content, dict(r.headers)

    def job_result(self, job_id: str, reply_key: SealKeyPair) -> JobResult:
        """Fetch and open the result with the reply key given at submission."""
        blob, _ = self.job_result_sealed(job_id)
        return open_result(reply_key, job_id, blob)

    # -- provider ---------------------------------------------------------------------------

    def approve_job(self, job_id: str, code_digest: str) -> dict[str, Any]:
        out: dict[str, Any] = self.post_json(f"/v1/jobs/{job_id}/approve", {"code_digest": code_digest})
        return out

    def reject_job(self, job_id: str, code_digest: str, reason: str = "") -> dict[str, Any]:
        out: dict[str, Any] = self.post_json(
            f"/v1/jobs/{job_id}/reject", {"code_digest": code_digest, "reason": reason}
        )
        return out

    def create_agent_key(self, offering_ids: list[str], *, name: str = "agent", ttl_days: int = 365) -> dict[str, Any]:
        out: dict[str, Any] = self.post_json(
            "/v1/agents/keys", {"offering_ids": offering_ids, "name": name, "ttl_days": ttl_days}
        )
        return out

    def agents(self, *, offering_id: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.get_json("/v1/agents", offering_id=offering_id)
        return out

    @staticmethod
    def code_digest(code: str) -> str:
        return code_digest(code)
