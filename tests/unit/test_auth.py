"""Bearer tokens: what is accepted, what is refused, and the production guard."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.runtime.auth import (
    InvalidToken,
    Verifier,
    development_secret,
    mint,
    verifier_for,
)
from services.runtime.config import RuntimeSettings

SECRET = "s" * 40
# placeholders for expiry times, filled in when a test runs (not when the module is imported)
LATER, EARLIER = "+60", "-120"


def timed(claims: dict[str, Any]) -> dict[str, Any]:
    return {k: time.time() + float(v) if k == "exp" else v for k, v in claims.items()}


async def test_a_token_minted_for_a_user_names_them_and_their_role() -> None:
    verifier = Verifier(secret=SECRET)
    who = await verifier.verify(mint(SECRET, "alice"))
    assert (who.user_id, who.role, who.is_operator) == ("alice", "user", False)
    boss = await verifier.verify(mint(SECRET, "bob", "operator"))
    assert (boss.user_id, boss.is_operator) == ("bob", True)


@pytest.mark.parametrize(
    ("claims", "key", "algorithm", "why"),
    [
        ({"sub": "a", "exp": EARLIER}, SECRET, "HS256", "expired"),
        ({"sub": "a", "exp": LATER}, "another" * 6, "HS256", "(?i)signature"),
        ({"sub": "a"}, SECRET, "HS256", "exp"),
        ({"exp": LATER}, SECRET, "HS256", "sub"),
        ({"sub": "a", "exp": LATER, "role": "admin"}, SECRET, "HS256", "role"),
        ({"sub": "a\x00b", "exp": LATER}, SECRET, "HS256", "sub"),
        ({"sub": "x" * 300, "exp": LATER}, SECRET, "HS256", "sub"),
        ({"sub": 7, "exp": LATER}, SECRET, "HS256", "(?i)sub"),
    ],
)
async def test_a_bad_token_is_refused(
    claims: dict[str, Any], key: str, algorithm: str, why: str
) -> None:
    token = jwt.encode(timed(claims), key, algorithm=algorithm)
    with pytest.raises(InvalidToken, match=why):
        await Verifier(secret=SECRET).verify(token)


async def test_an_unsigned_token_is_refused() -> None:
    token = jwt.encode(timed({"sub": "a", "exp": LATER}), "", algorithm="none")
    with pytest.raises(InvalidToken):
        await Verifier(secret=SECRET).verify(token)


async def test_issuer_and_audience_are_checked_when_set() -> None:
    verifier = Verifier(secret=SECRET, issuer="https://id.example", audience="fleet")
    good = mint(SECRET, "a", issuer="https://id.example", audience="fleet")
    assert (await verifier.verify(good)).user_id == "a"
    for bad in (
        mint(SECRET, "a", issuer="https://evil.example", audience="fleet"),
        mint(SECRET, "a", issuer="https://id.example", audience="other"),
        mint(SECRET, "a"),
    ):
        with pytest.raises(InvalidToken):
            await verifier.verify(bad)


class JwksServer:
    """A local identity provider's key set endpoint, as `/.well-known/jwks.json` serves it."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests += 1
                body = json.dumps({"keys": owner.keys}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, kid: str, public_key: Any, algorithm: str) -> None:
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm].to_jwk(public_key))
        self.keys.append({**jwk, "kid": kid, "use": "sig", "alg": algorithm})


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.server.shutdown()


def claims(user: str = "alice") -> dict[str, Any]:
    return timed({"sub": user, "exp": LATER, "role": "user"})


async def test_rs256_and_es256_tokens_are_verified_with_the_published_keys(
    jwks: JwksServer,
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwks.publish("r1", rsa_key.public_key(), "RS256")
    jwks.publish("e1", ec_key.public_key(), "ES256")
    verifier = Verifier(jwks_url=jwks.url)
    rs = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "r1"})
    es = jwt.encode(claims("bob"), ec_key, algorithm="ES256", headers={"kid": "e1"})
    assert (await verifier.verify(rs)).user_id == "alice"
    assert (await verifier.verify(es)).user_id == "bob"
    assert jwks.requests == 1  # cached

    # a key rotated in later is fetched when a token names it
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.publish("r2", new_key.public_key(), "RS256")
    verifier._fetched_at -= 60  # the refetch of an unknown key is rate-limited to every 30 s
    rotated = jwt.encode(claims(), new_key, algorithm="RS256", headers={"kid": "r2"})
    assert (await verifier.verify(rotated)).user_id == "alice"


async def test_a_token_signed_with_a_key_not_published_is_refused(jwks: JwksServer) -> None:
    published = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks.publish("r1", published.public_key(), "RS256")
    verifier = Verifier(jwks_url=jwks.url)
    forged = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="Signature"):
        await verifier.verify(
            jwt.encode(claims(), forged, algorithm="RS256", headers={"kid": "r1"})
        )
    with pytest.raises(InvalidToken, match="unknown signing key"):
        await verifier.verify(jwt.encode(claims(), forged, algorithm="RS256", headers={"kid": "x"}))
    # only asymmetric algorithms are accepted with a key set: an HS256 token is refused
    hs = jwt.encode(claims(), SECRET, algorithm="HS256", headers={"kid": "r1"})
    with pytest.raises(InvalidToken):
        await verifier.verify(hs)


def test_production_refuses_development_secrets_and_defaults(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="AUTH_JWKS_URL"):
        verifier_for(
            RuntimeSettings(
                fleet_env="production", auth_jwt_secret=None, database_url="postgresql://x/y"
            )
        )
    with pytest.raises(RuntimeError, match="32 characters"):
        verifier_for(
            RuntimeSettings(
                fleet_env="production", auth_jwt_secret="short", database_url="postgresql://x/y"
            )
        )
    with pytest.raises(RuntimeError, match="DATABASE_URL"):
        verifier_for(RuntimeSettings(fleet_env="production", auth_jwt_secret=SECRET))
    ready = verifier_for(
        RuntimeSettings(
            fleet_env="production", auth_jwt_secret=SECRET, database_url="postgresql://x/y"
        )
    )
    assert ready.secret == SECRET


def test_the_development_secret_is_made_once_and_private(tmp_path: Path) -> None:
    first = development_secret(tmp_path)
    assert first == development_secret(tmp_path) and len(first) >= 32
    path = tmp_path / "secrets" / "jwt.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
