"""Settings read from environment variables; each service extends `RuntimeSettings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    """What every service needs. Variable names are the field names in upper case."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    fleet_env: Literal["development", "production"] = Field(
        "development",
        description="production: refuse to start on development secrets or default addresses.",
    )
    auth_jwt_secret: SecretStr | None = Field(
        None,
        description="HS256 secret of the bearer tokens; unset in development: the one under "
        "FLEET_HOME/secrets/jwt.key (what `fleet token` signs with).",
    )
    auth_jwks_url: str | None = Field(
        None, description="Verify RS256/ES256 tokens with the keys published here instead."
    )
    auth_issuer: str | None = Field(None, description="Required `iss` of tokens, when set.")
    auth_audience: str | None = Field(None, description="Required `aud` of tokens, when set.")
    nats_url: str = "nats://127.0.0.1:4222"
    nats_user: str | None = Field(
        None, description="The service's NATS user (its permissions: the event catalog's)."
    )
    nats_password: SecretStr | None = None
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_user: str | None = Field(
        None,
        description="The login role of the service's sessions; defaults to `<service>_app`, "
        "which migrations create when they may (rights on the service's own schema only).",
    )
    db_password: SecretStr | None = Field(
        None, description="Its password, when DATABASE_URL does not carry it."
    )
    migrate_on_start: bool = Field(
        True,
        description="Apply migrations at start with DATABASE_URL's credentials (an "
        "administrator or the schema owner); off where a migration job does it.",
    )
    db_pool_size: int = Field(
        10,
        ge=3,
        description="Connections at most; each consumer keeps one and the outbox relay listens "
        "on one, so at least their number plus one.",
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=0, le=65535)
    log_level: str = "INFO"
    heartbeat_interval_s: float = Field(1.0, gt=0)
    consumer_max_deliver: int = Field(
        5,
        ge=1,
        description="Tries of a failing message before it is dead-lettered (redeliveries while "
        "PostgreSQL or NATS was unavailable do not count).",
    )
    consumer_ack_wait_s: float = Field(
        30.0,
        gt=0,
        description="Seconds before a message not acknowledged (nor reported in progress) is "
        "redelivered.",
    )
    outbox_ack_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Seconds to wait for JetStream's PubAck before an outbox row goes back to "
        "the relay, which publishes it again with the same Nats-Msg-Id.",
    )
    outbox_poll_interval_s: float = Field(
        0.5, gt=0, description="Fallback poll of the outbox when no notification arrives."
    )
