"""Who is calling: JWT bearer tokens, verified with PyJWT.

Every route of every service needs a token, except `/health/*`, `/metrics` and the API docs.
The token's `sub` is the user; its `role` claim is `user` (the default) or `operator`. Two
ways to verify, chosen by settings:

- development: HS256 with a shared secret, `AUTH_JWT_SECRET`, or else the one `fleet up` and
  `fleet token` keep in `FLEET_HOME/secrets/jwt.key` (created on first use, mode 600);
- production: RS256/ES256 signed by an identity provider, keys from `AUTH_JWKS_URL`, fetched
  with httpx and cached (PyJWT's own JWKS client is synchronous), refetched for an unknown
  key id at most every 30 s.

`AUTH_ISSUER` and `AUTH_AUDIENCE`, when set, are checked too. Routes take the caller with
`Depends(caller)` and operator-only routes with `Depends(operator)`; an object of another
user answers 404, as one that does not exist, so ids reveal nothing.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jwt
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.runtime.config import RuntimeSettings

Role = Literal["user", "operator"]
ROLES: tuple[Role, ...] = ("user", "operator")
DEV_SECRET_FILE = Path("secrets") / "jwt.key"
_ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


@dataclass(frozen=True)
class Caller:
    """The verified identity of a request."""

    user_id: str
    role: Role
    claims: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_operator(self) -> bool:
        return self.role == "operator"


class InvalidToken(Exception):
    """The token is missing, malformed, expired, or not signed by a key we trust."""


def fleet_home() -> Path:
    return Path(os.environ.get("FLEET_HOME", ".fleet")).resolve()


def development_secret(home: Path | None = None) -> str:
    """The development signing secret under FLEET_HOME, created on first use."""
    path = (home or fleet_home()) / DEV_SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def mint(
    secret: str,
    user_id: str,
    role: Role = "user",
    ttl_s: float = 12 * 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token for `user_id` (what `fleet token` prints)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "role": role, "iat": now, "exp": now + int(ttl_s)}
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


class Verifier:
    """Verifies bearer tokens with a shared secret or against a JWKS URL."""

    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks_url: str | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        leeway_s: float = 30.0,
    ) -> None:
        if bool(secret) == bool(jwks_url):
            raise ValueError("give exactly one of a shared secret or a JWKS URL")
        self.secret = secret
        self.jwks_url = jwks_url
        self.issuer = issuer
        self.audience = audience
        self.leeway_s = leeway_s
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0

    async def verify(self, token: str) -> Caller:
        try:
            if self.secret:
                key: Any = self.secret
                algorithms = ["HS256"]
            else:
                key = (await self._jwk(jwt.get_unverified_header(token).get("kid"))).key
                algorithms = _ASYMMETRIC
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": self.audience is not None},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from exc
        user_id, role = claims.get("sub"), claims.get("role", "user")
        if not isinstance(user_id, str) or not 0 < len(user_id) <= 256 or "\x00" in user_id:
            raise InvalidToken("sub must be a user id of 1 to 256 characters")
        if role not in ROLES:
            raise InvalidToken(f"role must be one of {', '.join(ROLES)}")
        return Caller(user_id, role, claims)

    async def _jwk(self, kid: object) -> jwt.PyJWK:
        if not isinstance(kid, str):
            raise InvalidToken("the token names no key (kid)")
        stale = time.monotonic() - self._fetched_at
        if (kid not in self._keys and stale > 30) or stale > 300:
            await self._fetch()
        if kid not in self._keys:
            raise InvalidToken(f"unknown signing key {kid[:40]!r}")
        return self._keys[kid]

    async def _fetch(self) -> None:
        assert self.jwks_url
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                answer = await client.get(self.jwks_url)
                answer.raise_for_status()
                found = jwt.PyJWKSet.from_dict(answer.json())
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            if not self._keys:
                raise InvalidToken(f"signing keys unavailable: {exc}") from exc
            return  # keep the keys we have; try again later
        finally:
            self._fetched_at = time.monotonic()
        self._keys = {k.key_id: k for k in found.keys if k.key_id}


_bearer = HTTPBearer(auto_error=False, description="A JWT: `sub` is the user, `role` user|operator")


async def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """FastAPI dependency: the verified caller, or 401."""
    if credentials is None:
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    verifier: Verifier = request.app.state.verifier
    try:
        return await verifier.verify(credentials.credentials)
    except InvalidToken as exc:
        raise HTTPException(
            401,
            f"invalid token: {exc}",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        ) from exc


async def operator(who: Annotated[Caller, Depends(caller)]) -> Caller:
    """FastAPI dependency: the caller, who must have the operator role, or 403."""
    if not who.is_operator:
        raise HTTPException(403, "this needs the operator role")
    return who


def verifier_for(settings: RuntimeSettings) -> Verifier:
    """The verifier the settings ask for; in production, development secrets and defaults
    are refused (the service does not start)."""
    secret = settings.auth_jwt_secret.get_secret_value() if settings.auth_jwt_secret else None
    if settings.fleet_env == "production":
        problems = []
        if not settings.auth_jwks_url and (not secret or len(secret) < 32):
            problems.append("AUTH_JWKS_URL, or an AUTH_JWT_SECRET of 32 characters or more")
        if settings.database_url == RuntimeSettings.model_fields["database_url"].default:
            problems.append("a DATABASE_URL of its own")
        if problems:
            raise RuntimeError(
                "FLEET_ENV=production refuses development defaults; set " + " and ".join(problems)
            )
    elif not settings.auth_jwks_url and not secret:
        secret = development_secret()
    return Verifier(
        secret=None if settings.auth_jwks_url else secret,
        jwks_url=settings.auth_jwks_url,
        issuer=settings.auth_issuer,
        audience=settings.auth_audience,
    )


CallerDep = Annotated[Caller, Depends(caller)]
OperatorDep = Annotated[Caller, Depends(operator)]
