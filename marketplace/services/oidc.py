"""The OpenID Connect relying party: discovery, the authorization URL, the code exchange, ID tokens.

For: the authorization code flow with PKCE (S256), state and nonce, through Authlib (its httpx
``OAuth2Client`` builds the authorization request and exchanges the code; its ``CodeIDToken``
claims class validates iss, aud, azp, exp, iat, nonce and at_hash) with keys from the issuer's
JWKS (joserfc, Authlib's JOSE layer). A token signed with a key id the cached JWKS does not have
triggers one refetch, at most once per ``SOM_OIDC_JWKS_REFETCH_SECONDS``: a key rotated at the OP is
picked up without a restart, and a flood of tokens with made-up key ids cannot make som hammer
the OP. Not for: users, sessions or roles (:mod:`marketplace.services.sso`).

Every failure is a :class:`LoginRefused` with a short machine-readable reason, which the callback
audits and shows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from authlib.integrations.base_client.errors import OAuthError
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
)
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

__all__ = ["LEEWAY_SECONDS", "MAX_TOKEN_AGE_SECONDS", "LoginRefused", "OidcClient"]

LEEWAY_SECONDS = 60  # clock skew tolerated on exp / iat
MAX_TOKEN_AGE_SECONDS = 600  # an ID token from a code exchange is fresh; an older iat is a replay
METADATA_MAX_AGE = 3600.0  # discovery and JWKS are refreshed at least this often
HTTP_TIMEOUT = 10.0


class LoginRefused(Exception):
    """A sign-in that must not succeed; ``reason`` is audited and shown."""

    def __init__(self, reason: str, message: str, status: int = 401, *, presented_nonce: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status
        self.presented_nonce = presented_nonce  # the nonce an ID token carried, when it was not this login's


@dataclass
class _Cache:
    metadata: dict[str, Any] | None = None
    metadata_at: float = 0.0
    jwks: dict[str, Any] | None = None
    jwks_at: float = 0.0
    last_refetch: float = float("-inf")
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class OidcClient:
    """One OP (issuer) and som's client registration at it."""

    def __init__(
        self,
        issuer: str,
        client_id: str,
        client_secret: str,
        *,
        scopes: str = "openid email profile",
        refetch_seconds: float = 30.0,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self._secret = client_secret
        self.scopes = scopes
        self.refetch_seconds = refetch_seconds
        self._c = _Cache()

    # -- discovery and keys -------------------------------------------------------------------

    def _get_json(self, url: str) -> dict[str, Any]:
        try:
            r = httpx.get(url, timeout=HTTP_TIMEOUT, follow_redirects=False)
            r.raise_for_status()
            data = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise LoginRefused("op_unreachable", f"the OpenID Provider did not answer {url}: {e}", 502) from e
        if not isinstance(data, dict):
            raise LoginRefused("op_unreachable", f"{url} did not return a JSON object", 502)
        return data

    def metadata(self) -> dict[str, Any]:
        """The issuer's discovery document (cached); its ``issuer`` must be the configured one."""
        with self._c.lock:
            if self._c.metadata is not None and time.monotonic() - self._c.metadata_at < METADATA_MAX_AGE:
                return self._c.metadata
        md = self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if md.get("issuer") != self.issuer:
            raise LoginRefused("wrong_issuer", f"the discovery document names issuer {md.get('issuer')!r}", 502)
        for k in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(md.get(k), str):
                raise LoginRefused("op_unreachable", f"the discovery document has no {k}", 502)
        with self._c.lock:
            self._c.metadata, self._c.metadata_at = md, time.monotonic()
        return md

    def _fetch_jwks(self) -> dict[str, Any]:
        jwks = self._get_json(self.metadata()["jwks_uri"])
        with self._c.lock:
            self._c.jwks, self._c.jwks_at = jwks, time.monotonic()
            self._c.fetches += 1
        return jwks

    def jwks(self) -> dict[str, Any]:
        with self._c.lock:
            cached = self._c.jwks if time.monotonic() - self._c.jwks_at < METADATA_MAX_AGE else None
        return cached if cached is not None else self._fetch_jwks()

    @property
    def jwks_fetches(self) -> int:
        """How many times the JWKS was fetched (for tests and the log)."""
        return self._c.fetches

    def _may_refetch(self) -> bool:
        now = time.monotonic()
        with self._c.lock:
            if now - self._c.last_refetch < self.refetch_seconds:
                return False
            self._c.last_refetch = now
            return True

    # -- the flow -----------------------------------------------------------------------------

    def _client(self, redirect_uri: str) -> OAuth2Client:
        return OAuth2Client(
            client_id=self.client_id,
            client_secret=self._secret,
            scope=self.scopes,
            redirect_uri=redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic",  # noqa: S106 (a method name, not a secret)
            timeout=HTTP_TIMEOUT,
        )

    def authorization_url(self, *, redirect_uri: str, state: str, nonce: str, code_verifier: str) -> str:
        with self._client(redirect_uri) as c:
            url, _ = c.create_authorization_url(
                self.metadata()["authorization_endpoint"], state=state, code_verifier=code_verifier, nonce=nonce
            )
        return str(url)

    def exchange(self, *, code: str, code_verifier: str, redirect_uri: str) -> dict[str, Any]:
        """Trade the code (and the PKCE verifier) for tokens at the token endpoint."""
        try:
            with self._client(redirect_uri) as c:
                token = c.fetch_token(self.metadata()["token_endpoint"], code=code, code_verifier=code_verifier)
        except OAuthError as e:
            raise LoginRefused("token_exchange_failed", f"the OP refused the code: {e.error}") from e
        except (httpx.HTTPError, ValueError) as e:
            raise LoginRefused("token_exchange_failed", f"the token endpoint failed: {e}", 502) from e
        if not isinstance(token.get("id_token"), str):
            raise LoginRefused("bad_token", "the token response has no ID token")
        return dict(token)

    def userinfo(self, access_token: str) -> dict[str, Any]:
        url = self.metadata().get("userinfo_endpoint")
        if not isinstance(url, str) or not access_token:
            return {}
        try:
            r = httpx.get(url, headers={"Authorization": f"Bearer {access_token}"}, timeout=HTTP_TIMEOUT)
            r.raise_for_status()
            data = r.json()
        except (httpx.HTTPError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # -- the ID token -------------------------------------------------------------------------

    def _decode(self, id_token: str) -> Any:
        algs = self.metadata().get("id_token_signing_alg_values_supported") or ["RS256"]
        algs = [a for a in algs if a != "none"]
        registry = JWSRegistry(algorithms=algs, strict_check_header=False)
        try:
            try:
                return jwt.decode(id_token, key=KeySet.import_key_set(cast(Any, self.jwks())), registry=registry)
            except InvalidKeyIdError:
                if not self._may_refetch():
                    raise
                return jwt.decode(id_token, key=KeySet.import_key_set(cast(Any, self._fetch_jwks())), registry=registry)
        except InvalidKeyIdError as e:
            raise LoginRefused("unknown_key", "the ID token is signed with a key the issuer does not publish") from e
        except BadSignatureError as e:
            raise LoginRefused("bad_signature", "the ID token's signature does not verify") from e
        except (JoseError, ValueError, TypeError) as e:
            raise LoginRefused("bad_token", f"the ID token cannot be decoded: {e}") from e

    def verify_id_token(self, id_token: str, *, nonce: str, access_token: str | None) -> dict[str, Any]:
        """Verify signature, iss, aud (and azp), exp, iat, nonce and at_hash; return the claims."""
        token = self._decode(id_token)
        params: dict[str, Any] = {"nonce": nonce, "client_id": self.client_id}
        if access_token:
            params["access_token"] = access_token
        options: dict[str, Any] = {
            "iss": {"essential": True, "value": self.issuer},
            "aud": {"essential": True, "value": self.client_id},
        }
        claims = CodeIDToken(token.claims, token.header, options, params)
        if claims.get("nonce") != nonce:
            presented = claims.get("nonce")
            raise LoginRefused(
                "nonce_mismatch",
                "the ID token's nonce is not this login's",
                presented_nonce=presented if isinstance(presented, str) else None,
            )
        try:
            claims.validate(leeway=LEEWAY_SECONDS)
        except ExpiredTokenError as e:
            raise LoginRefused("expired", "the ID token has expired") from e
        except ClaimError as e:
            reason = {"aud": "wrong_audience", "azp": "wrong_audience", "iss": "wrong_issuer"}.get(
                e.claim, "bad_claims"
            )
            raise LoginRefused(reason, f"the ID token's {e.claim} claim is not acceptable: {e.description}") from e
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or iat < time.time() - MAX_TOKEN_AGE_SECONDS:
            raise LoginRefused("stale_token", "the ID token was issued too long ago for this login")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise LoginRefused("bad_claims", "the ID token has no subject")
        return dict(claims)
