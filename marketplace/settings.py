"""Validated settings for the marketplace service (pydantic-settings, prefix ``SOM_``).

For: every tunable of the service, read from the environment (or passed explicitly in tests).
Not for: secrets with defaults: there are none, and :meth:`Settings.check_secrets` refuses
placeholder values so a server never starts with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["PLACEHOLDER_SECRETS", "Settings", "SettingsError"]

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "placeholder", "secret", "password", "test", "xxx", "todo", "default"}
)


class SettingsError(ValueError):
    """The settings cannot run a server (a placeholder secret, an unusable path)."""


class Settings(BaseSettings):
    """All settings. Environment variables use the ``SOM_`` prefix (``DATABASE_URL`` too)."""

    model_config = SettingsConfigDict(env_prefix="SOM_", extra="ignore")

    data_dir: Path = Field(default=Path(".som"), description="Data directory: DB, blobs, keys, logs.")
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "SOM_DATABASE_URL"),
        description="SQLAlchemy URL; default sqlite:///<data_dir>/som.db (WAL mode).",
    )
    host: str = Field(default="127.0.0.1", description="Bind address of `som serve`.")
    port: int = Field(default=8600, description="Port of `som serve`.")
    key_provider: Literal["local", "env"] = Field(
        default="local",
        description="Key-encryption-key provider: 'local' (0600 file in the data dir) or 'env' (SOM_KEK).",
    )
    kek: SecretStr | None = Field(
        default=None, description="Base64 32-byte key-encryption key when key_provider=env."
    )
    max_request_bytes: int = Field(default=1 << 20, description="Largest JSON request body.")
    max_upload_bytes: int = Field(default=64 << 20, description="Largest model artifact upload.")
    max_ciphertext_bytes: int = Field(default=256 << 20, description="Largest HE request or key set.")
    max_sealed_bytes: int = Field(default=64 << 20, description="Largest sealed job payload.")
    page_size_max: int = Field(default=200, description="Largest page a list endpoint returns.")
    log_origin: str = Field(
        default="som.example/ledger", description="Origin line of the ledger's signed checkpoints."
    )
    checkpoint_every: int = Field(default=256, description="Sign a checkpoint after this many leaves.")
    checkpoint_interval_seconds: float = Field(
        default=10.0, description="Sign a checkpoint at least this often when there are new leaves."
    )
    metering: bool = Field(default=True, description="Meter uses (off only for benchmarks).")
    workers: int = Field(default=2, description="Local compute worker processes.")
    job_backend: Literal["local", "celery"] = Field(
        default="local", description="Where marketplace-hosted jobs run: local pool or Celery."
    )
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="Celery broker URL.")
    agent_lease_seconds: float = Field(default=30.0, description="Lease of a job pulled by an agent.")
    agent_offline_seconds: float = Field(
        default=30.0, description="An agent with no heartbeat for this long is offline."
    )
    job_result_ttl_seconds: float = Field(default=7 * 86400, description="How long results are kept.")
    api_key_ttl_days: int = Field(default=365, description="Default API key lifetime.")
    gateway_batch_window_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="Gateway micro-batching: stack concurrent calls on one version arriving within this many ms into one model run (0 = off).",
    )
    gateway_batch_max_rows: int = Field(default=4096, ge=1, description="Rows at which a gateway micro-batch closes early.")
    gateway_max_rows: int = Field(
        default=10_000, ge=1, description="Most rows one gateway call may carry (the contract's max_batch applies too)."
    )
    gateway_cache_seconds: float = Field(
        default=2.0, ge=0, description="How long a gateway API process caches an offering's version and artifact pointers."
    )
    gateway_model_cache: int = Field(default=8, ge=1, description="Warm ONNX Runtime sessions kept per gateway worker (LRU).")
    gateway_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads per gateway worker (0 = cores / workers)."
    )
    gateway_compute_timeout_seconds: float = Field(default=30.0, gt=0, description="Longest a gateway model run may take.")
    gateway_agent_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Longest a gateway call waits for a provider's agent before 503 + Retry-After."
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'som.db').resolve()}"

    def check_secrets(self) -> None:
        """Raise :class:`SettingsError` if a secret is a placeholder."""
        if self.key_provider == "env":
            value = self.kek.get_secret_value() if self.kek else ""
            if value.strip().lower() in PLACEHOLDER_SECRETS:
                raise SettingsError(
                    "SOM_KEK is unset or a placeholder; set it to a base64 32-byte key "
                    "(python -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())')"
                )
