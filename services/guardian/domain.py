"""Pure decisions of guardian: is a service up or down (hysteresis), one incident per outage
(a flapping service stays in one incident, with reminders), when to restart (cooldown and
capped exponential backoff, forgotten after a healthy window), when to stop restarting and
escalate, what a new leader takes over, the overall health, and the incident report.

No I/O: every clock reading comes in as `now`, every observation as a method call, and each
call returns the actions the imperative shell (watcher.py) carries out, in order.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from services.runtime.faults import backoff_seconds

Mode = Literal["supervise", "observe"]
"""supervise: guardian asks `fleet up` to restart processes; observe: an orchestrator
(compose, Kubernetes) restarts them and guardian counts, escalates and reports."""

Status = Literal["unknown", "up", "down"]


@dataclass(frozen=True)
class Policy:
    """Thresholds of watching and healing (GuardianSettings documents each)."""

    mode: Mode = "supervise"
    heartbeat_timeout_s: float = 2.5
    failures_to_down: int = 3
    successes_to_up: int = 2
    startup_grace_s: float = 30.0
    hung_after_s: float = 3.0
    stable_after_s: float = 5.0
    restart_timeout_s: float = 30.0
    restart_cooldown_s: float = 30.0
    restart_backoff_max_s: float = 300.0
    healthy_window_s: float = 600.0
    max_failed_restarts: int = 3
    reminder_interval_s: float = 300.0


def restart_delay(policy: Policy, restarts_recently: int) -> float:
    """Seconds to wait after the previous attempt before the next one: none for the first,
    then the cooldown doubling per recent restart up to the cap (Kubernetes' back-off)."""
    if restarts_recently <= 0:
        return 0.0
    return backoff_seconds(
        restarts_recently, policy.restart_cooldown_s, policy.restart_backoff_max_s
    )


# --- state -------------------------------------------------------------------------------


@dataclass
class Instance:
    instance: str
    started_at: datetime
    last_seen_at: datetime
    ready: bool
    http_url: str | None


@dataclass
class Attempt:
    number: int
    at: datetime
    by: Literal["guardian", "orchestrator"]
    reason: str
    outcome: str | None = None  # None while it is in progress
    succeeded: bool | None = None
    came_up_at: datetime | None = None  # ready again (not yet stable)


@dataclass
class Incident:
    incident_id: uuid.UUID
    service: str
    opened_at: datetime
    reason: str
    last_seen_at: datetime | None
    attempts: list[Attempt] = field(default_factory=list)
    flaps: int = 0
    reminders: int = 0
    reminded_at: datetime | None = None
    escalated: bool = False

    @property
    def current(self) -> Attempt | None:
        last = self.attempts[-1] if self.attempts else None
        return last if last is not None and last.outcome is None else None

    @property
    def failed(self) -> int:
        return sum(1 for a in self.attempts if a.succeeded is False)


@dataclass
class ServiceState:
    name: str
    status: Status = "unknown"
    reason: str = ""
    instances: dict[str, Instance] = field(default_factory=dict)
    last_seen_at: datetime | None = None  # newest heartbeat of any instance
    failures: int = 0  # consecutive failed readiness samples
    successes: int = 0  # consecutive good ones
    changed_at: datetime | None = None  # of the status
    exited: str | None = None  # "exited with code N": the process is gone (fleet up said)
    incident: Incident | None = None
    held: bool = False  # escalated: not restarted until an operator resets it
    recent_restarts: int = 0  # for the backoff; forgotten after a healthy window
    last_attempt_at: datetime | None = None
    restarts: int = 0  # since guardian started watching, by anyone

    def silence(self, now: datetime, since: datetime) -> float:
        """Seconds without a heartbeat, counted at most from `since` (watching began) and
        from the last restart (a new process needs a moment before its first beat)."""
        latest = max(t for t in (self.last_seen_at, self.last_attempt_at, since) if t)
        return (now - latest).total_seconds()


# --- actions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    service: str
    at: datetime
    incident_id: uuid.UUID | None

    @property
    def kind(self) -> str:
        return type(self).__name__

    def detail(self) -> dict[str, Any]:
        """What the transition row keeps besides service, kind, time and incident."""
        skip = {"service", "at", "incident_id"}
        return {k: _plain(v) for k, v in self.__dict__.items() if k not in skip}


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Attempt):
        return {k: _plain(v) for k, v in value.__dict__.items()}
    return value


@dataclass(frozen=True)
class WentDown(Action):
    """An incident opens: `service.down`."""

    reason: str
    last_seen_at: datetime | None


@dataclass(frozen=True)
class CameUp(Action):
    """Ready again (M good samples); the incident closes once it stays up."""


@dataclass(frozen=True)
class Flapped(Action):
    """Down again before it was stable: the same incident, no second `service.down`."""

    reason: str


@dataclass(frozen=True)
class Reminded(Action):
    """Still down (or flapping) after another reminder interval."""

    down_for_s: float
    flaps: int


@dataclass(frozen=True)
class Recovered(Action):
    """Up for the stable window: the incident closes, `service.recovered`."""

    down_since: datetime
    downtime_s: float
    restarts: int


@dataclass(frozen=True)
class RestartRequested(Action):
    """Ask `fleet up` to kill (if alive) and start the service."""

    attempt: int
    reason: str


@dataclass(frozen=True)
class RestartObserved(Action):
    """The orchestrator replaced the instance (a new one beats)."""

    attempt: int
    instance: str


@dataclass(frozen=True)
class AttemptFinished(Action):
    attempt: int
    succeeded: bool
    outcome: str


@dataclass(frozen=True)
class Escalated(Action):
    """Too many failed restarts in a row: stop restarting, write the report."""

    reason: str
    attempts: tuple[Attempt, ...]


@dataclass(frozen=True)
class Reset(Action):
    """An operator released an escalated service."""

    by: str


# --- taking over from the database -------------------------------------------------------


@dataclass(frozen=True)
class StoredIncident:
    """An open incident as the database keeps it, for a new leader to carry on."""

    incident_id: uuid.UUID
    service: str
    opened_at: datetime
    reason: str
    last_seen_at: datetime | None
    attempts: tuple[Attempt, ...]
    flaps: int
    reminders: int
    escalated: bool


# --- the machine -------------------------------------------------------------------------


class Watch:
    """Every watched service's state. Observations come in from heartbeats, readiness
    samples (probes), process exits and the clock; actions go out only while `acting`
    (the leader, not paused). A replica that is not acting keeps the statuses current,
    so it can take over at once, but opens no incidents: those are the leader's."""

    def __init__(self, services: Iterable[str], policy: Policy, now: datetime) -> None:
        self.policy = policy
        self.services = {name: ServiceState(name) for name in services}
        self.started_at = now
        self.acting = False

    # --- observations --------------------------------------------------------------

    def heartbeat(
        self,
        service: str,
        instance: str,
        started_at: datetime,
        ready: bool,
        http_url: str | None,
        now: datetime,
    ) -> list[Action]:
        s = self.services.get(service)
        if s is None:
            return []
        new = instance not in s.instances
        seen_before = s.last_seen_at is not None
        s.instances[instance] = Instance(instance, started_at, now, ready, http_url)
        s.last_seen_at = now
        # forget instances silent for long: a restarted process is a new instance
        horizon = now - timedelta(seconds=max(60.0, self.policy.heartbeat_timeout_s * 4))
        for name in [n for n, i in s.instances.items() if i.last_seen_at < horizon]:
            del s.instances[name]
        if not new:
            return []
        s.exited = None  # a process beats again (started by us or by an orchestrator)
        if self.policy.mode == "observe" and seen_before and self._replaced(s, instance, now):
            s.restarts += 1
            return self._orchestrator_restart(s, instance, now)
        return []

    def _replaced(self, s: ServiceState, instance: str, now: datetime) -> bool:
        """Under an orchestrator a new instance is a restart when the service was down or
        another instance had gone silent (scaling out adds instances without anyone dying)."""
        timeout = timedelta(seconds=self.policy.heartbeat_timeout_s)
        others_silent = any(
            i.last_seen_at < now - timeout for n, i in s.instances.items() if n != instance
        )
        return s.status == "down" or others_silent

    def _orchestrator_restart(self, s: ServiceState, instance: str, now: datetime) -> list[Action]:
        inc = s.incident
        if not self.acting or inc is None or s.held:
            return []
        actions: list[Action] = []
        if inc.current is not None:
            actions += self._finish(s, False, f"replaced by {instance} before it was stable", now)
        if s.held:
            return actions  # that failure escalated it
        number = len(inc.attempts) + 1
        inc.attempts.append(Attempt(number, now, "orchestrator", f"new instance {instance}"))
        s.last_attempt_at = now
        return [*actions, RestartObserved(s.name, now, inc.incident_id, number, instance)]

    def sample(self, service: str, ok: bool, detail: str, now: datetime) -> list[Action]:
        """One readiness sample: a probe of /health/ready, or the heartbeats' ready flag
        where no probe URL is known."""
        s = self.services.get(service)
        if s is None:
            return []
        if ok:
            s.successes += 1
            s.failures = 0
            if s.status != "up" and s.successes >= self.policy.successes_to_up:
                return self._up(s, now)
            return []
        s.failures += 1
        s.successes = 0
        starting = (now - self.started_at).total_seconds() < self.policy.startup_grace_s
        if s.status == "unknown" and starting:
            return []  # not up yet since guardian started: give it the start-up grace
        if s.status != "down" and s.failures >= self.policy.failures_to_down:
            return self._down(s, f"{s.failures} failed readiness checks: {detail}", now)
        return []

    def exited(self, service: str, code: int | None, now: datetime) -> list[Action]:
        """`fleet up` saw the process end: down at once, no hysteresis needed."""
        s = self.services.get(service)
        if s is None:
            return []
        s.exited = f"process exited with code {code}"
        s.successes = 0
        s.instances.clear()
        actions: list[Action] = []
        if s.incident is not None and s.incident.current is not None:
            attempt = s.incident.current
            outcome = f"{s.exited} {(now - attempt.at).total_seconds():.1f}s after the restart"
            if attempt.came_up_at is not None:
                ready = (attempt.came_up_at - attempt.at).total_seconds()
                outcome += f" (it was ready after {ready:.1f}s)"
            actions += self._finish(s, False, outcome, now)
        return actions + self._down(s, s.exited, now)

    def restart_failed(
        self, service: str, attempt: int, detail: str, now: datetime
    ) -> list[Action]:
        """The restart request itself failed (fleet up refused or did not answer)."""
        s = self.services.get(service)
        if s is None or s.incident is None or s.incident.current is None:
            return []
        if s.incident.current.number != attempt:
            return []
        return self._finish(s, False, f"restart request failed: {detail}", now)

    # --- the clock -----------------------------------------------------------------

    def tick(self, now: datetime, heartbeats_trusted: bool = True) -> list[Action]:
        """Silence, restarts, escalation, reminders, stability. `heartbeats_trusted` is False
        while guardian's own NATS connection is down: silence then proves nothing."""
        actions: list[Action] = []
        p = self.policy
        for s in self.services.values():
            silence = s.silence(now, self.started_at)
            if s.status != "down" and heartbeats_trusted:
                if s.last_seen_at is not None and silence > p.heartbeat_timeout_s:
                    actions += self._down(s, f"no heartbeat for {silence:.1f}s", now)
                elif s.last_seen_at is None and silence > p.startup_grace_s:
                    actions += self._down(s, f"never seen in {silence:.0f}s", now)
            if not self.acting or s.incident is None:
                up_for = (now - s.changed_at).total_seconds() if s.changed_at else 0.0
                if s.status == "up" and s.incident is None and up_for >= p.healthy_window_s:
                    s.recent_restarts = 0
                continue
            inc = s.incident
            if s.status == "up":
                assert s.changed_at is not None
                if (now - s.changed_at).total_seconds() >= p.stable_after_s:
                    actions += self._recover(s, now)
                continue
            # down, with an incident
            current = inc.current
            if current is not None and (now - current.at).total_seconds() >= p.restart_timeout_s:
                actions += self._finish(
                    s, False, f"not ready {p.restart_timeout_s:.0f}s after the restart", now
                )
                current = None
            if current is None and not s.held and inc.failed >= p.max_failed_restarts:
                actions += self._escalate(s, now)
            elif current is None and not s.held and p.mode == "supervise":
                gone = s.exited is not None
                hung = heartbeats_trusted and silence >= p.hung_after_s
                due = s.last_attempt_at is None or (
                    now - s.last_attempt_at
                ).total_seconds() >= restart_delay(p, s.recent_restarts)
                if (gone or hung) and due:
                    actions += self._restart(s, s.exited or f"hung: {s.reason}", now)
            remind_from = inc.reminded_at or inc.opened_at
            if (now - remind_from).total_seconds() >= p.reminder_interval_s:
                inc.reminders += 1
                inc.reminded_at = now
                down_for = (now - inc.opened_at).total_seconds()
                actions.append(Reminded(s.name, now, inc.incident_id, down_for, inc.flaps))
        return actions

    # --- operator and leadership ---------------------------------------------------

    def reset(self, service: str, by: str, now: datetime) -> list[Action]:
        """Release an escalated service: restarts resume with a fresh count and backoff."""
        s = self.services[service]
        was_held = s.held
        s.held = False
        s.recent_restarts = 0
        s.last_attempt_at = None
        if s.incident is None:
            return [Reset(service, now, None, by)] if was_held else []
        inc = s.incident
        inc.escalated = False
        # the failed attempts stay in the record; the count towards escalation starts again
        for a in inc.attempts:
            if a.succeeded is False:
                a.succeeded = None
        return [Reset(service, now, inc.incident_id, by)]

    def take_over(
        self,
        stored: Sequence[StoredIncident],
        held: Iterable[str],
        now: datetime,
    ) -> list[Action]:
        """Start acting (new leader, or resumed): carry on the incidents the database has
        open, open one for each service down without one, close those that are up."""
        self.acting = True
        held_set = set(held)
        by_service = {i.service: i for i in stored}
        actions: list[Action] = []
        for s in self.services.values():
            s.held = s.name in held_set
            row = by_service.get(s.name)
            if row is not None:
                s.incident = Incident(
                    row.incident_id,
                    s.name,
                    row.opened_at,
                    row.reason,
                    row.last_seen_at,
                    list(row.attempts),
                    row.flaps,
                    row.reminders,
                    None,
                    row.escalated,
                )
                if row.attempts:
                    last = row.attempts[-1].at
                    s.last_attempt_at = max(s.last_attempt_at or last, last)
                    s.recent_restarts = max(s.recent_restarts, len(row.attempts))
            else:
                s.incident = None
                if s.status == "down":
                    actions += self._open(s, s.reason, now)
        return actions

    def step_down(self) -> None:
        """Stop acting (leadership lost, or paused); incidents stay in the database."""
        self.acting = False
        for s in self.services.values():
            s.incident = None

    # --- transitions ----------------------------------------------------------------

    def _down(self, s: ServiceState, reason: str, now: datetime) -> list[Action]:
        if s.status == "down":
            return []
        s.status, s.reason, s.changed_at = "down", reason, now
        s.failures = max(s.failures, self.policy.failures_to_down)
        s.successes = 0
        if not self.acting:
            return []
        inc = s.incident
        if inc is None:
            return self._open(s, reason, now)
        inc.flaps += 1
        actions: list[Action] = [Flapped(s.name, now, inc.incident_id, reason)]
        current = inc.current
        if current is not None and current.came_up_at is not None and s.exited is None:
            up_for = (now - current.came_up_at).total_seconds()
            actions += self._finish(s, False, f"ready, then down again after {up_for:.1f}s", now)
        return actions

    def _open(self, s: ServiceState, reason: str, now: datetime) -> list[Action]:
        inc = s.incident = Incident(uuid.uuid4(), s.name, now, reason, s.last_seen_at)
        return [WentDown(s.name, now, inc.incident_id, reason, s.last_seen_at)]

    def _up(self, s: ServiceState, now: datetime) -> list[Action]:
        s.status, s.reason, s.changed_at = "up", "", now
        if not self.acting or s.incident is None:
            return []
        inc = s.incident
        if inc.current is not None:
            inc.current.came_up_at = now
        return [CameUp(s.name, now, inc.incident_id)]

    def _recover(self, s: ServiceState, now: datetime) -> list[Action]:
        inc = s.incident
        assert inc is not None and s.changed_at is not None
        actions: list[Action] = []
        current = inc.current
        if current is not None:
            took = ((current.came_up_at or now) - current.at).total_seconds()
            actions += self._finish(s, True, f"ready after {took:.1f}s", now)
        downtime = (s.changed_at - inc.opened_at).total_seconds()
        restarts = len(inc.attempts)
        s.incident = None
        return [
            *actions,
            Recovered(s.name, now, inc.incident_id, inc.opened_at, max(downtime, 0.0), restarts),
        ]

    def _restart(self, s: ServiceState, reason: str, now: datetime) -> list[Action]:
        inc = s.incident
        assert inc is not None
        number = len(inc.attempts) + 1
        inc.attempts.append(Attempt(number, now, "guardian", reason))
        s.recent_restarts += 1
        s.last_attempt_at = now
        s.restarts += 1
        s.exited = None  # fleet up starts a new process; its own exit would be news again
        s.instances.clear()
        return [RestartRequested(s.name, now, inc.incident_id, number, reason)]

    def _finish(self, s: ServiceState, ok: bool, outcome: str, now: datetime) -> list[Action]:
        inc = s.incident
        assert inc is not None
        current = inc.current
        if current is None:
            return []
        current.outcome, current.succeeded = outcome, ok
        finished: list[Action] = [
            AttemptFinished(s.name, now, inc.incident_id, current.number, ok, outcome)
        ]
        if not ok and not s.held and inc.failed >= self.policy.max_failed_restarts:
            finished += self._escalate(s, now)
        return finished

    def _escalate(self, s: ServiceState, now: datetime) -> list[Action]:
        inc = s.incident
        assert inc is not None
        s.held = True
        inc.escalated = True
        failed = [a for a in inc.attempts if a.succeeded is False]
        last = failed[-1].outcome if failed else s.reason
        reason = f"{len(failed)} failed restarts in a row; last: {last}"
        return [Escalated(s.name, now, inc.incident_id, reason, tuple(inc.attempts))]


# --- the smoke canary --------------------------------------------------------------------

SMOKE = "smoke"
"""The pseudo-service whose incidents are the canary's: a failed run opens one as a crash
does (`service.down` with service `smoke`), the next passing run closes it."""


@dataclass(frozen=True)
class SmokeStep:
    """One step of a canary run: which service it went through, and how it went."""

    step: str
    service: str
    ok: bool
    seconds: float
    detail: str = ""


def smoke_verdict(steps: Sequence[SmokeStep]) -> tuple[bool, str]:
    """A run passes when every step did; else the reason names each failed step."""
    failed = [f"{s.step} ({s.service}): {s.detail}" for s in steps if not s.ok]
    if not steps:
        return False, "smoke test ran no step"
    return not failed, ("smoke test failed: " + "; ".join(failed))[:1000] if failed else ""


@dataclass
class CanaryWatch:
    """The canary's incident: opened by the first failed run, kept (one incident, however
    many runs fail), closed by the first passing run. Only the leader acts, as in `Watch`."""

    incident: Incident | None = None
    acting: bool = False

    def result(self, ok: bool, reason: str, now: datetime) -> list[Action]:
        if not self.acting:
            return []
        inc = self.incident
        if not ok and inc is None:
            inc = self.incident = Incident(uuid.uuid4(), SMOKE, now, reason, None)
            return [WentDown(SMOKE, now, inc.incident_id, reason, None)]
        if ok and inc is not None:
            self.incident = None
            downtime = max((now - inc.opened_at).total_seconds(), 0.0)
            return [Recovered(SMOKE, now, inc.incident_id, inc.opened_at, downtime, 0)]
        return []

    def take_over(self, stored: Sequence[StoredIncident]) -> None:
        self.acting = True
        row = next((i for i in stored if i.service == SMOKE), None)
        self.incident = (
            None
            if row is None
            else Incident(row.incident_id, SMOKE, row.opened_at, row.reason, row.last_seen_at)
        )

    def step_down(self) -> None:
        self.acting = False
        self.incident = None


# --- overall health ----------------------------------------------------------------------

Overall = Literal["healthy", "degraded", "unhealthy"]


def overall_status(
    services: Mapping[str, Status], nats_ok: bool, postgres_ok: bool, disk_low: bool
) -> Overall:
    """unhealthy: the fleet cannot work at all (NATS or PostgreSQL unreachable, or every
    watched service down); degraded: some service is not up, or the data disk runs low."""
    if not (nats_ok and postgres_ok):
        return "unhealthy"
    if services and all(s == "down" for s in services.values()):
        return "unhealthy"
    if disk_low or any(s != "up" for s in services.values()):
        return "degraded"
    return "healthy"


def human_duration(seconds: float) -> str:
    """3d 5h 12m, as the seed shows uptime."""
    minutes = int(seconds // 60)
    days, minutes = divmod(minutes, 1440)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{days}d"] if days else []
    if days or hours:
        parts.append(f"{hours}h")
    parts.append(f"{minutes}m")
    return " ".join(parts)


# --- the incident report -----------------------------------------------------------------

LOG_LINE_LIMIT = 2000  # characters of one log line kept in a report
REPORT_LIMIT = 200_000  # characters of a whole report: it travels in service.escalated


def report_name(at: datetime) -> str:
    return f"BUG-{at:%Y%m%d-%H%M}.md"


def trace_ids(log_lines: Iterable[str]) -> list[str]:
    """Trace ids of the error lines among JSON log lines, newest first, each once."""
    found: list[str] = []
    for line in reversed(list(log_lines)):
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") not in ("error", "critical"):
            continue
        trace_id = entry.get("trace_id")
        if isinstance(trace_id, str) and trace_id not in found:
            found.append(trace_id)
    return found


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside `text`."""
    longest = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    return "`" * max(3, longest + 1)


def _block(text: str, lang: str = "") -> str:
    fence = _fence(text)
    return f"{fence}{lang}\n{text}\n{fence}"


def render_report(
    *,
    service: str,
    at: datetime,
    reason: str,
    incident_id: uuid.UUID,
    opened_at: datetime,
    attempts: Sequence[Attempt],
    log_lines: Sequence[str],
    log_source: str,
    health: Mapping[str, Any],
    dead_letters: Sequence[Mapping[str, Any]],
) -> str:
    """The markdown incident report (BUG-YYYYMMDD-HHMM.md)."""
    clean = [
        (ln.replace("\x00", "\\0")[:LOG_LINE_LIMIT] + ("…" if len(ln) > LOG_LINE_LIMIT else ""))
        for ln in log_lines
    ]
    traces = trace_ids(log_lines)
    rows = [
        f"| {a.number} | {a.at.isoformat(timespec='seconds')} | {a.by} | "
        f"{_cell(a.reason)} | {_cell(a.outcome or 'in progress')} |"
        for a in attempts
    ]
    letters = [
        f"- `{_cell(str(d.get('subject', '?')))}` seq {d.get('seq')} at {d.get('time')}: "
        f"{_cell(str(d.get('reason', '')))}"
        for d in dead_letters
    ]
    parts = [
        f"# {service}: escalated after failed restarts",
        "",
        f"- **time:** {at.isoformat(timespec='seconds')}",
        f"- **service:** {service}",
        f"- **incident:** {incident_id} (down since {opened_at.isoformat(timespec='seconds')})",
        f"- **what failed:** {reason}",
        f"- **trace ids of the last errors:** {', '.join(traces[:10]) or 'none in the log'}",
        "",
        "Guardian stopped restarting this service. Reset it after the fix:",
        f'`POST /api/guardian/control {{"action": "reset", "service": "{service}"}}`.',
        "",
        "## Restart attempts",
        "",
        "| # | time | by | why | outcome |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"## Last {len(clean)} log lines ({log_source})",
        "",
        _block("\n".join(clean)) if clean else "(no log lines)",
        "",
        "## Health snapshot",
        "",
        _block(json.dumps(health, indent=2, default=str, ensure_ascii=False), "json"),
        "",
        "## Recent dead letters",
        "",
        *(letters or ["(none)"]),
        "",
    ]
    text = "\n".join(parts)
    if len(text) > REPORT_LIMIT:
        text = text[:REPORT_LIMIT] + "\n\n(report cut at 200,000 characters)\n"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("\x00", "\\0")[:500]
