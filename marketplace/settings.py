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
    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for GET /metrics; unset: /metrics answers loopback clients only.",
    )
    monitoring_flush_seconds: float = Field(
        default=5.0, description="How often a process writes its per-minute latency aggregates to the DB."
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
        if self.metrics_token is not None:
            token = self.metrics_token.get_secret_value()
            if token.strip().lower() in PLACEHOLDER_SECRETS or len(token) < 16:
                raise SettingsError(
                    "SOM_METRICS_TOKEN is a placeholder or shorter than 16 characters; unset it "
                    "(loopback-only scrapes) or set a random one (python -c 'import secrets;print(secrets.token_urlsafe(32))')"
                )
