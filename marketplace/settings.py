"""Validated settings for the marketplace service (pydantic-settings, prefix ``SOM_``).

For: every tunable of the service, read from the environment (or passed explicitly in tests).
Not for: secrets with defaults: there are none, and :meth:`Settings.check_secrets` refuses
placeholder values so a server never starts with one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from marketplace.services.jail import JailConfig

__all__ = ["PLACEHOLDER_SECRETS", "Settings", "SettingsError"]

PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "placeholder", "secret", "password", "test", "xxx", "todo", "default"}
)


class SettingsError(ValueError):
    """The settings cannot run a server (a placeholder secret, an unusable path)."""


class Settings(BaseSettings):
    """All settings. Environment variables use the ``SOM_`` prefix (``DATABASE_URL`` too)."""

    model_config = SettingsConfigDict(env_prefix="SOM_", extra="ignore")

    data_dir: Path = Field(default=Path(".som"), description="Data directory: DB, blobs, logs (no keys).")
    key_dir: Path | None = Field(
        default=None,
        description=(
            "Directory of the secret keys (KEK keyring, job sealing key, task-message key, ledger "
            "key), outside the data dir; default $XDG_CONFIG_HOME/som/keys/<data dir's instance id> "
            "(~/.config/som/keys/...), created 0700 on first start."
        ),
    )
    unsafe_keys_in_data_dir: bool = Field(
        default=False,
        description=(
            "Development only: keep the keys in <data_dir>/keys, beside what they protect (a copy of "
            "the data dir then reveals every model and job input). Logged as a warning at start."
        ),
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "SOM_DATABASE_URL"),
        description="SQLAlchemy URL; default sqlite:///<data_dir>/som.db (WAL mode).",
    )
    host: str = Field(default="127.0.0.1", description="Bind address of `som serve`.")
    port: int = Field(default=8600, description="Port of `som serve`.")
    key_provider: Literal["local", "env"] = Field(
        default="local",
        description="Key-encryption-key provider: 'local' (0600 keyring in the key dir) or 'env' (SOM_KEK).",
    )
    kek: SecretStr | None = Field(
        default=None, description="Base64 32-byte key-encryption key when key_provider=env."
    )
    max_request_bytes: int = Field(default=1 << 20, description="Largest JSON request body.")
    max_upload_bytes: int = Field(default=64 << 20, description="Largest model artifact upload.")
    max_ciphertext_bytes: int = Field(default=256 << 20, description="Largest HE request or key set.")
    max_sealed_bytes: int = Field(default=64 << 20, description="Largest sealed job payload.")
    max_decompressed_bytes: int = Field(
        default=256 << 20, ge=1,
        description="Largest total an .npz upload or job input may declare uncompressed (checked before decompressing).",
    )
    max_compression_ratio: float = Field(
        default=100.0, ge=1.0, description="Largest uncompressed/compressed size ratio of an .npz (zip bombs).",
    )
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
    jail_bwrap: str = Field(
        default="/usr/bin/bwrap", description="The bubblewrap binary that jails custom-job code (docs/jobs.md)."
    )
    jail_max_pids: int = Field(default=64, description="Most processes one custom job may have at once.")
    unsafe_unjailed_custom_jobs: bool = Field(
        default=False,
        description="UNSAFE: run custom-job code without the jail where it cannot be set up "
        "(logs a warning on every job). Off: such jobs are refused with 503.",
    )

    auth_fail_max_per_client: int = Field(
        default=20, ge=1, description="Failed authentications one client address may make per window before 429."
    )
    auth_fail_max_per_prefix: int = Field(
        default=10, ge=1, description="Failed authentications naming one key prefix per window before 429."
    )
    auth_fail_window_seconds: float = Field(
        default=300.0, gt=0, description="Window of the failed-authentication throttle (per process)."
    )
    validation_tolerance_default: float = Field(
        default=0.01, ge=0, le=1, description="Tolerance of a re-computed declared metric when the provider states none."
    )
    validation_tolerance_max: float = Field(
        default=0.05, ge=0, le=1, description="Largest tolerance a provider may state for its declared metrics."
    )
    validation_he_agreement_default: float = Field(
        default=0.99, ge=0, le=1, description="HE-vs-plaintext label agreement a compiled version must reach by default."
    )
    validation_he_agreement_floor: float = Field(
        default=0.95, ge=0, le=1, description="Lowest HE agreement threshold a provider may set."
    )
    validation_eval_max_rows: int = Field(
        default=10000, ge=1, description="Most rows of a provider-supplied evaluation set."
    )
    org_storage_quota_mb: int = Field(
        default=1024,
        ge=0,
        description="Storage quota per organisation in MiB (model versions + stored job payloads); 0: none.",
    )
    auth_failure_window_seconds: float = Field(
        default=60.0,
        gt=0,
        description="Failed authentications are summarised in one audit event per client per window.",
    )

    def jail_config(self) -> JailConfig:
        """The jail settings as a :class:`marketplace.services.jail.JailConfig`."""
        from marketplace.services.jail import JailConfig

        return JailConfig(
            bwrap=self.jail_bwrap, max_pids=self.jail_max_pids, unsafe_unjailed=self.unsafe_unjailed_custom_jobs
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
