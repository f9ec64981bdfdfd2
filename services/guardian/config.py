from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from services.guardian.domain import Policy
from services.runtime.config import RuntimeSettings


def parse_urls(text: str) -> dict[str, str]:
    """`sync=http://sync:8101,stats=http://stats:8105` → {service: base URL}."""
    urls: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, url = (s.strip() for s in item.partition("="))
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"GUARDIAN_PROBE_URLS: expected name=http://host:port, got {item!r}")
        urls[name] = url.rstrip("/")
    return urls


class GuardianSettings(RuntimeSettings):
    """Thresholds are tighter than the seed's 30 s check: heartbeats are cheap, and the
    target is a dead service seen within a second, a hung one within three."""

    http_port: int = 8104

    guardian_services: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sync", "benchmark", "planner", "stats"],
        description="Services watched, comma separated (guardian replicas watch each other "
        "through the leader lock, not here).",
    )
    guardian_mode: Literal["auto", "supervise", "observe"] = Field(
        "auto",
        description="supervise: ask `fleet up` to restart processes; observe: an orchestrator "
        "(compose, Kubernetes) restarts them, guardian counts, escalates and reports; auto: "
        "supervise when GUARDIAN_SUPERVISOR_SOCKET is set (fleet up sets it), else observe.",
    )
    guardian_supervisor_socket: Path | None = Field(
        None, description="fleet up's restart channel (a Unix socket); set by fleet up."
    )
    guardian_supervisor_token_file: Path | None = Field(
        None, description="File holding the channel's bearer token; set by fleet up."
    )
    fleet_home: Path = Field(
        Path(".fleet"),
        description="Where reports go (reports/BUG-*.md), where fleet up writes logs (logs/) "
        "and whose disk /api/health reports.",
    )
    guardian_probe_urls: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        description="Base URL of each service's /health/ready, name=URL comma separated; a "
        "service not named is probed at the URL its heartbeats announce.",
    )
    guardian_probe_interval_s: float = Field(0.5, gt=0, description="Between readiness probes.")
    guardian_probe_timeout_s: float = Field(0.5, gt=0, description="A slower probe failed.")
    guardian_tick_s: float = Field(0.1, gt=0, description="How often silence is checked.")
    guardian_heartbeat_timeout_s: float = Field(
        2.5, gt=0, description="Down after this long without a heartbeat (beats come every 1 s)."
    )
    guardian_failures_to_down: int = Field(3, ge=1, description="Failed probes in a row: down.")
    guardian_successes_to_up: int = Field(2, ge=1, description="Good probes in a row: up.")
    guardian_startup_grace_s: float = Field(
        30.0, ge=0, description="A service not yet seen is not called down before this."
    )
    guardian_hung_after_s: float = Field(
        3.0,
        gt=0,
        description="A down service whose process is alive is killed and restarted once it "
        "has sent no heartbeat for this long (alive but beating: not restarted).",
    )
    guardian_stable_after_s: float = Field(
        5.0, ge=0, description="Up this long: the incident closes (service.recovered)."
    )
    guardian_restart_timeout_s: float = Field(
        30.0, gt=0, description="A restart not ready by then failed."
    )
    guardian_restart_cooldown_s: float = Field(
        30.0, ge=0, description="Seed: 30 s between attempts; doubles per recent restart."
    )
    guardian_restart_backoff_max_s: float = Field(300.0, ge=0, description="The backoff's cap.")
    guardian_healthy_window_s: float = Field(
        600.0, ge=0, description="Up this long: the backoff is forgotten (Kubernetes: 10 min)."
    )
    guardian_max_failed_restarts: int = Field(
        3, ge=1, description="Failed restarts in a row before escalation (seed: 3)."
    )
    guardian_reminder_interval_s: float = Field(
        300.0, gt=0, description="A reminder of a still open incident this often."
    )
    guardian_leader_poll_s: float = Field(
        0.5, gt=0, description="A standby tries the leader lock this often."
    )
    guardian_min_free_disk_bytes: int = Field(
        1 << 30, ge=0, description="Less free on the data disk: degraded."
    )
    guardian_log_lines: int = Field(50, ge=1, le=10_000, description="Log lines in a report.")

    guardian_smoke_interval_s: float = Field(
        300.0,
        ge=0,
        description="The leader runs the smoke canary this often (0: only on request). The "
        "seed's 6 hours would leave a broken pipeline unseen for hours; a run costs a few "
        "requests and one event.",
    )
    guardian_smoke_timeout_s: float = Field(
        20.0, gt=0, description="A step not done by then failed (each step has its own)."
    )
    guardian_smoke_token: SecretStr | None = Field(
        None,
        description="The canary's bearer token (a user token whose sub starts with "
        "`canary:`), for an identity provider guardian cannot sign for (AUTH_JWKS_URL). "
        "Without it guardian signs a short-lived one with AUTH_JWT_SECRET.",
    )
    guardian_grafana_url: str | None = Field(
        "http://localhost:3000",
        description="Where the status page links to Grafana (empty: no link).",
    )

    @field_validator("guardian_services", mode="before")
    @classmethod
    def _services_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [s.strip() for s in value.split(",") if s.strip()]
        return value

    @field_validator("guardian_probe_urls", mode="before")
    @classmethod
    def _urls_from_text(cls, value: Any) -> Any:
        return parse_urls(value) if isinstance(value, str) else value

    @property
    def mode(self) -> Literal["supervise", "observe"]:
        if self.guardian_mode != "auto":
            return self.guardian_mode
        return "supervise" if self.guardian_supervisor_socket else "observe"

    def policy(self) -> Policy:
        return Policy(
            mode=self.mode,
            heartbeat_timeout_s=self.guardian_heartbeat_timeout_s,
            failures_to_down=self.guardian_failures_to_down,
            successes_to_up=self.guardian_successes_to_up,
            startup_grace_s=self.guardian_startup_grace_s,
            hung_after_s=self.guardian_hung_after_s,
            stable_after_s=self.guardian_stable_after_s,
            restart_timeout_s=self.guardian_restart_timeout_s,
            restart_cooldown_s=self.guardian_restart_cooldown_s,
            restart_backoff_max_s=self.guardian_restart_backoff_max_s,
            healthy_window_s=self.guardian_healthy_window_s,
            max_failed_restarts=self.guardian_max_failed_restarts,
            reminder_interval_s=self.guardian_reminder_interval_s,
        )
