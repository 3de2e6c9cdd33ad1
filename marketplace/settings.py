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
    from marketplace.compute.jail import JailConfig

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
    kek: SecretStr | None = Field(default=None, description="Base64 32-byte key-encryption key when key_provider=env.")
    max_request_bytes: int = Field(default=1 << 20, description="Largest JSON request body.")
    max_upload_bytes: int = Field(default=64 << 20, description="Largest model artifact upload.")
    max_ciphertext_bytes: int = Field(default=256 << 20, description="Largest HE request or key set.")
    max_sealed_bytes: int = Field(default=64 << 20, description="Largest sealed job payload.")
    max_decompressed_bytes: int = Field(
        default=256 << 20,
        ge=1,
        description="Largest total an .npz upload or job input may declare uncompressed "
        "(checked before decompressing).",
    )
    max_compression_ratio: float = Field(
        default=100.0,
        ge=1.0,
        description="Largest uncompressed/compressed size ratio of an .npz (zip bombs).",
    )
    page_size_max: int = Field(default=200, description="Largest page a list endpoint returns.")
    log_origin: str = Field(default="som.example/ledger", description="Origin line of the ledger's signed checkpoints.")
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
        default=0.01,
        ge=0,
        le=1,
        description="Tolerance of a re-computed declared metric when the provider states none.",
    )
    validation_tolerance_max: float = Field(
        default=0.05, ge=0, le=1, description="Largest tolerance a provider may state for its declared metrics."
    )
    validation_he_agreement_default: float = Field(
        default=0.99,
        ge=0,
        le=1,
        description="HE-vs-plaintext label agreement a compiled version must reach by default.",
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
    oidc_issuer: str | None = Field(
        default=None,
        description="OpenID Provider issuer URL for SSO (docs/sso.md); unset: no SSO, API keys only.",
    )
    oidc_client_id: str | None = Field(default=None, description="OIDC client id of som at the OpenID Provider.")
    oidc_client_secret: SecretStr | None = Field(
        default=None, description="OIDC client secret of som (client_secret_basic at the token endpoint)."
    )
    oidc_groups_claim: str = Field(
        default="groups", description="The ID token (or userinfo) claim that lists the user's IdP groups."
    )
    oidc_group_map: Path | None = Field(
        default=None,
        description="JSON or TOML file mapping IdP groups to organisation, teams and roles (docs/sso.md); "
        "re-read when it changes, applied at every login.",
    )
    oidc_redirect_uri: str | None = Field(
        default=None,
        description="The callback URL registered at the OP; default <the request's origin>/v1/auth/callback.",
    )
    oidc_scopes: str = Field(default="openid email profile", description="Scopes som asks the OP for.")
    session_ttl_seconds: int = Field(default=8 * 3600, description="Lifetime of a web session (SSO sign-in).")
    oidc_personal_key_max_days: int = Field(
        default=30, description="Longest lifetime of a personal API key a signed-in user mints."
    )
    oidc_jwks_refetch_seconds: float = Field(
        default=30.0, description="At most one JWKS refetch per this many seconds on an unknown key id."
    )
    admission_control: bool = Field(
        default=True,
        description="Shed compute requests (HE infer, gateway predict, job submission) beyond the limits "
        "below with 503 + Retry-After, so admitted ones and reads stay fast (docs/deployment.md).",
    )
    admission_compute_concurrency: int = Field(
        default=4, description="Compute requests in flight at once per server process (admission control)."
    )
    admission_queue: int = Field(
        default=8, description="Compute requests that may wait for a slot per process; more are shed at once."
    )
    admission_queue_timeout_seconds: float = Field(
        default=2.0, description="Longest wait for a compute slot before a request is shed (503)."
    )
    admission_retry_after_seconds: int = Field(default=1, description="The Retry-After of a shed request, in seconds.")

    def jail_config(self) -> JailConfig:
        """The jail settings as a :class:`marketplace.compute.jail.JailConfig`."""
        # lazy import: settings are read everywhere, the jail module only where jobs run
        from marketplace.compute.jail import JailConfig

        return JailConfig(
            bwrap=self.jail_bwrap, max_pids=self.jail_max_pids, unsafe_unjailed=self.unsafe_unjailed_custom_jobs
        )

    metrics_token: SecretStr | None = Field(
        default=None,
        description="Bearer token for GET /metrics; unset: /metrics answers loopback clients only.",
    )
    monitoring_flush_seconds: float = Field(
        default=5.0, description="How often a process writes its per-minute latency aggregates to the DB."
    )
    gateway_batch_window_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="Gateway micro-batching: stack concurrent calls on one version arriving within this many ms "
        "into one model run (0 = off).",
    )
    gateway_batch_max_rows: int = Field(
        default=4096, ge=1, description="Rows at which a gateway micro-batch closes early."
    )
    gateway_max_rows: int = Field(
        default=10_000, ge=1, description="Most rows one gateway call may carry (the contract's max_batch applies too)."
    )
    gateway_cache_seconds: float = Field(
        default=2.0,
        ge=0,
        description="How long a gateway API process caches an offering's version and artifact pointers.",
    )
    gateway_model_cache: int = Field(
        default=8, ge=1, description="Warm ONNX Runtime sessions kept per gateway worker (LRU)."
    )
    gateway_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads per gateway worker (0 = cores / workers)."
    )
    gateway_compute_timeout_seconds: float = Field(
        default=30.0, gt=0, description="Longest a gateway model run may take."
    )
    gateway_agent_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Longest a gateway call waits for a provider's agent before 503 + Retry-After."
    )

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'som.db').resolve()}"

    def check_secrets(self) -> None:
        """Raise :class:`SettingsError` if a secret is a placeholder."""
        if self.oidc_issuer:
            secret = self.oidc_client_secret.get_secret_value() if self.oidc_client_secret else ""
            if not self.oidc_client_id or secret.strip().lower() in PLACEHOLDER_SECRETS:
                raise SettingsError(
                    "SOM_OIDC_ISSUER is set: SOM_OIDC_CLIENT_ID and a real SOM_OIDC_CLIENT_SECRET are needed"
                )
            if self.oidc_group_map is None:
                raise SettingsError("SOM_OIDC_ISSUER is set: SOM_OIDC_GROUP_MAP (the group mapping file) is needed")
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
                    "(loopback-only scrapes) or set a random one "
                    "(python -c 'import secrets;print(secrets.token_urlsafe(32))')"
                )
