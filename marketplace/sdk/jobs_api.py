"""SDK mixin: remote-execution jobs (sealed end to end) and agent keys.

``submit_job`` creates the job, seals the input to the compute site's key (HPKE, with a fresh
reply key unless one is given) and uploads it; keep the returned reply key to open the result
(``job_result``). The server only ever sees sealed bytes.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass
from typing import Any

from crypto.sealing import SealKeyPair
from marketplace.agent.payload import JobInput, JobResult, code_digest, open_result, seal_input
from marketplace.sdk.base import BaseClient

__all__ = ["JobsAPI", "SubmittedJob", "count_rows"]

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
        for k, v in (("code", code), ("limits", limits), ("timeout_seconds", timeout_seconds), ("contract_id", contract_id)):
            if v is not None:
                body[k] = v
        key = idempotency_key or str(uuid.uuid4())
        out: dict[str, Any] = self.post_json("/v1/jobs", body, headers={"Idempotency-Key": key})
        return out

    def upload_job_payload(self, job_id: str, sealed: bytes) -> dict[str, Any]:
        r = self.request(
            "POST", f"/v1/jobs/{job_id}/payload", content=sealed, headers={"Content-Type": "application/octet-stream"}
        )
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
    ) -> SubmittedJob:
        """Create, seal and submit a job. ``units`` defaults to the rows in ``data``."""
        if units is None:
            units = count_rows(data, format) if kind != "custom" else 1
        reply = reply_key or SealKeyPair.generate()
        job = self.create_job(
            offering_id, kind, units=units, code=code, limits=limits, timeout_seconds=timeout_seconds,
            contract_id=contract_id, idempotency_key=idempotency_key,
        )
        inp = JobInput(
            job_id=job["id"], kind=kind, reply_public=reply.public_text(), data=data, format=format,
            code=code, params=params or {},
        )
        job = self.upload_job_payload(job["id"], seal_input(job["seal_public"], inp))
        return SubmittedJob(job=job, reply_key=reply)

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
        out: dict[str, Any] = self.post_json(f"/v1/jobs/{job_id}/reject", {"code_digest": code_digest, "reason": reason})
        return out

    def create_agent_key(self, offering_ids: list[str], *, name: str = "agent", ttl_days: int = 365) -> dict[str, Any]:
        out: dict[str, Any] = self.post_json("/v1/agents/keys", {"offering_ids": offering_ids, "name": name, "ttl_days": ttl_days})
        return out

    def agents(self, *, offering_id: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = self.get_json("/v1/agents", offering_id=offering_id)
        return out

    @staticmethod
    def code_digest(code: str) -> str:
        return code_digest(code)
