"""guardian's pure decisions: hysteresis, incidents, restarts with backoff, escalation,
taking over as leader, overall health and the incident report."""

from __future__ import annotations

import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.guardian.domain import (
    SMOKE,
    Action,
    Attempt,
    AttemptFinished,
    CameUp,
    CanaryWatch,
    Escalated,
    Flapped,
    Policy,
    Recovered,
    Reminded,
    Reset,
    RestartObserved,
    RestartRequested,
    SmokeStep,
    Status,
    StoredIncident,
    Watch,
    WentDown,
    human_duration,
    overall_status,
    render_report,
    report_name,
    restart_delay,
    smoke_verdict,
    trace_ids,
)

T0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)
POLICY = Policy(
    heartbeat_timeout_s=2.5,
    failures_to_down=3,
    successes_to_up=2,
    startup_grace_s=10.0,
    hung_after_s=3.0,
    stable_after_s=5.0,
    restart_timeout_s=20.0,
    restart_cooldown_s=4.0,
    restart_backoff_max_s=10.0,
    healthy_window_s=60.0,
    max_failed_restarts=3,
    reminder_interval_s=100.0,
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def kinds(actions: list[Action]) -> list[str]:
    return [a.kind for a in actions]


def of(actions: list[Action], kind: type[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


class Clock:
    """Drives a Watch the way the shell does: heartbeats every second, samples every 0.5 s,
    ticks every 0.1 s; collects every action."""

    def __init__(self, watch: Watch, start: float = 0.0) -> None:
        self.watch = watch
        self.t = start
        self.actions: list[Action] = []
        self.instance = {name: f"{name}-1" for name in watch.services}

    def beat(self, service: str, ready: bool = True) -> None:
        self.actions += self.watch.heartbeat(
            service, self.instance[service], at(self.t), ready, "http://x", at(self.t)
        )

    def run(
        self, seconds: float, beating: set[str], ready: set[str] | None = None, step: float = 0.1
    ) -> list[Action]:
        """Advance `seconds`; services in `beating` send heartbeats, those in `ready` (default:
        the beating ones) pass readiness samples, the others fail them."""
        ready = beating if ready is None else ready
        start = len(self.actions)
        end = self.t + seconds
        while self.t < end - 1e-9:
            self.t = round(self.t + step, 6)
            ticks = round(self.t * 10)
            for name in self.watch.services:
                if ticks % 10 == 0 and name in beating:
                    self.beat(name, name in ready)
                if ticks % 5 == 0:
                    self.actions += self.watch.sample(name, name in ready, "refused", at(self.t))
            self.actions += self.watch.tick(at(self.t))
        return self.actions[start:]

    def exit(self, service: str, code: int = 1) -> list[Action]:
        got = self.watch.exited(service, code, at(self.t))
        self.actions += got
        return got


def leader(services: tuple[str, ...] = ("stats",), policy: Policy = POLICY) -> Clock:
    watch = Watch(services, policy, T0)
    watch.take_over([], [], T0)
    clock = Clock(watch)
    clock.run(3, set(services))
    assert watch.services[services[0]].status == "up"
    return clock


# --- backoff -------------------------------------------------------------------------------


def test_the_first_restart_is_immediate_then_the_cooldown_doubles_up_to_the_cap() -> None:
    assert [restart_delay(POLICY, n) for n in range(6)] == [0.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert restart_delay(POLICY, 10**9) == 10.0  # no overflow on a huge count


# --- hysteresis and incidents ----------------------------------------------------------------


def test_a_silent_service_goes_down_once_with_its_last_beat() -> None:
    clock = leader()
    last_beat = at(clock.t)  # beats came on whole seconds; t = 3.0
    got = clock.run(5, beating=set())
    downs = of(got, WentDown)
    assert len(downs) == 1
    down = downs[0]
    assert isinstance(down, WentDown)
    assert down.last_seen_at == last_beat
    # samples fail too (3 of them, 0.5 s apart) but silence or probes: it is one transition
    assert 1.4 <= (down.at - last_beat).total_seconds() <= 2.6


def test_fewer_failed_samples_than_the_threshold_change_nothing() -> None:
    clock = leader()
    w = clock.watch
    for i in range(POLICY.failures_to_down - 1):
        assert w.sample("stats", False, "timeout", at(4 + i)) == []
    assert w.sample("stats", True, "", at(6)) == []
    assert w.sample("stats", False, "timeout", at(7)) == []  # the count started again
    assert w.services["stats"].status == "up"
    got = w.sample("stats", False, "timeout", at(8)) + w.sample("stats", False, "timeout", at(9))
    assert kinds(got) == ["WentDown"]
    assert "3 failed readiness checks: timeout" in got[0].detail()["reason"]


def test_up_needs_consecutive_successes_and_recovery_needs_the_stable_window() -> None:
    clock = leader()
    clock.run(3, beating={"stats"}, ready=set())  # alive, not ready: down by samples
    assert clock.watch.services["stats"].status == "down"
    w = clock.watch
    t = clock.t
    assert w.sample("stats", True, "", at(t + 0.5)) == []
    assert w.sample("stats", False, "x", at(t + 1.0)) == []
    assert w.sample("stats", True, "", at(t + 1.5)) == []
    assert kinds(w.sample("stats", True, "", at(t + 2.0))) == ["CameUp"]
    clock.t = t + 2.0
    clock.beat("stats")
    got = clock.run(6, beating={"stats"})
    recovered = of(got, Recovered)
    assert len(recovered) == 1
    r = recovered[0]
    assert isinstance(r, Recovered)
    assert r.restarts == 0
    assert r.downtime_s == pytest.approx((at(t + 2.0) - r.down_since).total_seconds())
    assert (r.at - at(t + 2.0)).total_seconds() >= POLICY.stable_after_s


def test_a_flapping_service_is_one_incident_with_reminders() -> None:
    policy = Policy(**{**POLICY.__dict__, "reminder_interval_s": 20.0})
    clock = leader(policy=policy)
    for _ in range(15):  # a minute: ready 2 s, not ready 2 s
        clock.run(2, beating={"stats"}, ready=set())
        clock.run(2, beating={"stats"})
    got = clock.actions
    assert len(of(got, WentDown)) == 1
    assert len(of(got, Flapped)) >= 10
    assert len(of(got, CameUp)) >= 10
    assert of(got, Recovered) == []
    assert 1 <= len(of(got, Reminded)) <= 3
    assert of(got, RestartRequested) == []  # it beats: alive, so not restarted
    ids = {a.incident_id for a in got if not isinstance(a, Recovered)}
    assert len(ids) == 1
    clock.run(8, beating={"stats"})  # steady at last
    assert len(of(clock.actions, Recovered)) == 1


def test_start_up_grace_keeps_a_starting_service_unknown_then_down() -> None:
    watch = Watch(["stats"], POLICY, T0)
    watch.take_over([], [], T0)
    clock = Clock(watch)
    got = clock.run(9, beating=set())
    assert got == [] and watch.services["stats"].status == "unknown"
    got = clock.run(2, beating=set())
    assert kinds(got)[:1] == ["WentDown"]
    assert "never seen" in str(got[0].detail()["reason"]) or "readiness" in str(
        got[0].detail()["reason"]
    )


# --- healing under fleet up ------------------------------------------------------------------


def test_an_exited_process_is_down_at_once_and_restarted_at_the_next_tick() -> None:
    clock = leader()
    got = clock.exit("stats", -9)
    assert kinds(got) == ["WentDown"]
    assert got[0].detail()["reason"] == "process exited with code -9"
    got = clock.watch.tick(at(clock.t + 0.1))
    assert kinds(got) == ["RestartRequested"]
    assert isinstance(got[0], RestartRequested) and got[0].attempt == 1


def test_a_restarted_service_recovers_with_its_restart_counted() -> None:
    clock = leader()
    clock.exit("stats")
    clock.run(0.1, beating=set())
    clock.instance["stats"] = "stats-2"
    got = clock.run(8, beating={"stats"})
    assert kinds(got) == ["CameUp", "AttemptFinished", "Recovered"]
    finished, recovered = got[1], got[2]
    assert isinstance(finished, AttemptFinished) and finished.succeeded
    assert isinstance(recovered, Recovered) and recovered.restarts == 1
    assert clock.watch.services["stats"].restarts == 1


def crash_loop(clock: Clock, seconds: float) -> None:
    """Every process started dies 0.5 s later."""
    for _ in range(round(seconds / 0.5)):
        started = of(clock.run(0.5, beating=set()), RestartRequested)
        if started:
            clock.run(0.5, beating=set())
            clock.exit("stats")


def test_a_crash_loop_gets_exactly_three_restarts_with_backoff_then_one_escalation() -> None:
    clock = leader()
    clock.exit("stats")
    crash_loop(clock, 60)
    restarts = of(clock.actions, RestartRequested)
    assert [r.detail()["attempt"] for r in restarts] == [1, 2, 3]
    gaps = [(b.at - a.at).total_seconds() for a, b in itertools.pairwise(restarts)]
    assert gaps[0] >= restart_delay(POLICY, 1) and gaps[1] >= restart_delay(POLICY, 2)
    escalations = of(clock.actions, Escalated)
    assert len(escalations) == 1
    esc = escalations[0]
    assert isinstance(esc, Escalated)
    assert [a.succeeded for a in esc.attempts] == [False, False, False]
    assert "3 failed restarts in a row" in esc.reason
    assert "exited with code 1" in esc.reason
    assert len(of(clock.actions, WentDown)) == 1
    assert clock.actions.index(esc) == clock.actions.index(restarts[-1]) + 2  # at its failure
    crash_loop(clock, 100)
    assert len(of(clock.actions, RestartRequested)) == 3  # held: no fourth


def test_an_operator_reset_resumes_restarts() -> None:
    test_clock = leader()
    test_clock.exit("stats")
    crash_loop(test_clock, 60)
    assert len(of(test_clock.actions, Escalated)) == 1
    got = test_clock.watch.reset("stats", "operator", at(test_clock.t))
    assert kinds(got) == ["Reset"] and isinstance(got[0], Reset)
    got = test_clock.run(0.2, beating=set())
    assert kinds(got) == ["RestartRequested"]
    assert got[0].detail()["attempt"] == 4


def test_a_hung_process_is_down_by_probes_and_restarted_only_after_the_silence() -> None:
    clock = leader()
    stopped_at = clock.t
    got = clock.run(2.9, beating=set(), ready=set())  # SIGSTOP: no beats, probes time out
    assert kinds(got) == ["WentDown"]
    got = clock.run(1.0, beating=set(), ready=set())
    restarts = of(got, RestartRequested)
    assert len(restarts) == 1
    silence = (restarts[0].at - at(stopped_at)).total_seconds()
    assert POLICY.hung_after_s <= silence <= POLICY.hung_after_s + 1.1
    assert "hung" in str(restarts[0].detail()["reason"])


def test_an_alive_service_that_is_not_ready_is_not_restarted() -> None:
    clock = leader()
    got = clock.run(60, beating={"stats"}, ready=set())  # e.g. its database is away
    assert kinds(got)[:1] == ["WentDown"]
    assert of(got, RestartRequested) == []


def test_silence_proves_nothing_while_guardian_itself_lost_nats() -> None:
    clock = leader()
    w = clock.watch
    got: list[Action] = []
    for i in range(1, 60):
        got += w.tick(at(clock.t + i * 0.5), heartbeats_trusted=False)
    assert got == []


def test_a_restart_not_ready_in_time_fails_and_the_next_one_kills_it() -> None:
    clock = leader()
    clock.exit("stats")
    clock.run(0.1, beating=set())
    got = clock.run(POLICY.restart_timeout_s + 1, beating=set())
    finished = of(got, AttemptFinished)
    assert len(finished) == 1
    assert "not ready 20s after the restart" in finished[0].detail()["outcome"]
    assert len(of(got, RestartRequested)) == 1  # the second, after the cooldown


def test_backoff_is_forgotten_after_a_healthy_window() -> None:
    clock = leader()
    for _ in range(2):
        clock.exit("stats")
        clock.run(10, beating={"stats"})
    stats = clock.watch.services["stats"]
    assert stats.recent_restarts == 2
    clock.run(POLICY.healthy_window_s + 1, beating={"stats"})
    assert stats.recent_restarts == 0
    clock.exit("stats")
    assert kinds(clock.watch.tick(at(clock.t + 0.1))) == ["RestartRequested"]


# --- observing an orchestrator ----------------------------------------------------------------


def test_under_an_orchestrator_guardian_counts_new_instances_and_escalates_a_crash_loop() -> None:
    policy = Policy(**{**POLICY.__dict__, "mode": "observe"})
    clock = leader(policy=policy)
    for n in range(2, 7):  # the orchestrator restarts it; each instance dies after a beat
        clock.run(4, beating=set())
        clock.instance["stats"] = f"stats-{n}"
        clock.beat("stats", ready=False)
    got = clock.actions
    assert of(got, RestartRequested) == []
    assert len(of(got, RestartObserved)) == 3
    assert len(of(got, Escalated)) == 1
    assert clock.watch.services["stats"].restarts == 5  # every restart is counted


# --- leadership --------------------------------------------------------------------------------


def test_a_replica_that_is_not_acting_tracks_status_but_acts_on_nothing() -> None:
    watch = Watch(["stats"], POLICY, T0)
    clock = Clock(watch)
    clock.run(3, beating={"stats"})
    clock.exit("stats")
    got = clock.run(30, beating=set())
    assert clock.actions == [] and got == []
    assert watch.services["stats"].status == "down"
    got = watch.take_over([], [], at(clock.t))
    assert kinds(got) == ["WentDown"]


def test_a_new_leader_carries_on_a_stored_incident_without_restarting_twice() -> None:
    watch = Watch(["stats"], POLICY, T0)
    clock = Clock(watch)
    clock.run(3, beating={"stats"})
    clock.exit("stats")
    clock.run(1, beating=set())
    in_progress = Attempt(1, at(3.5), "guardian", "process exited with code 1")
    stored = StoredIncident(
        uuid.uuid4(), "stats", at(3.2), "process exited", at(3.0), (in_progress,), 0, 0, False
    )
    assert watch.take_over([stored], [], at(clock.t)) == []
    got = clock.run(5, beating=set())
    assert of(got, RestartRequested) == []  # the old leader's attempt is still in progress
    assert of(got, WentDown) == []
    clock.instance["stats"] = "stats-2"
    got = clock.run(8, beating={"stats"})
    assert kinds(got) == ["CameUp", "AttemptFinished", "Recovered"]
    assert all(a.incident_id == stored.incident_id for a in got)


def test_a_new_leader_keeps_an_escalated_service_held() -> None:
    watch = Watch(["stats"], POLICY, T0)
    clock = Clock(watch)
    clock.run(3, beating={"stats"})
    clock.exit("stats")
    failed = tuple(
        Attempt(n, at(n), "guardian", "exited", "exited again", False) for n in (1, 2, 3)
    )
    stored = StoredIncident(uuid.uuid4(), "stats", at(1), "exited", None, failed, 0, 0, True)
    watch.take_over([stored], ["stats"], at(clock.t))
    got = clock.run(60, beating=set())
    assert of(got, RestartRequested) == [] and of(got, Escalated) == []


# --- health and the report ----------------------------------------------------------------------


def test_overall_status() -> None:
    up: dict[str, Status] = {"a": "up", "b": "up"}
    one_down: dict[str, Status] = {"a": "up", "b": "down"}
    all_down: dict[str, Status] = {"a": "down"}
    assert overall_status(up, True, True, False) == "healthy"
    assert overall_status(one_down, True, True, False) == "degraded"
    assert overall_status(up, True, True, True) == "degraded"
    assert overall_status(up, False, True, False) == "unhealthy"
    assert overall_status(up, True, False, False) == "unhealthy"
    assert overall_status(all_down, True, True, False) == "unhealthy"


def test_human_duration() -> None:
    assert human_duration(59) == "0m"
    assert human_duration(3 * 86400 + 5 * 3600 + 12 * 60 + 7) == "3d 5h 12m"
    assert human_duration(3600) == "1h 0m"


def test_the_report_holds_attempts_logs_health_dead_letters_and_trace_ids() -> None:
    lines = [json.dumps({"level": "info", "msg": f"line {i}"}) for i in range(48)]
    lines.append(json.dumps({"level": "error", "msg": "boom", "trace_id": "a" * 32}))
    lines.append("```\x00 a raw line with a fence and a NUL " + "x" * 5000)
    attempts = [
        Attempt(1, at(1), "guardian", "process exited with code 1", "exited 0.5s later", False)
    ]
    report = render_report(
        service="stats",
        at=at(10),
        reason="3 failed restarts in a row",
        incident_id=uuid.UUID(int=7),
        opened_at=at(0),
        attempts=attempts,
        log_lines=lines,
        log_source="/x/logs/stats.log",
        health={"services": {"stats": {"status": "down"}}, "nats": {"status": "ok"}},
        dead_letters=[{"subject": "deadletter.subtask.completed", "seq": 4, "reason": "x|y"}],
    )
    assert report_name(at(10)) == "BUG-20260402-1200.md"
    assert "line 0" in report and "line 47" in report and "boom" in report
    assert "a" * 32 in report.split("## Restart attempts")[0]
    assert "| 1 | 2026-04-02T12:00:01+00:00 | guardian |" in report
    assert "exited 0.5s later" in report
    assert "\x00" not in report
    assert "x" * 2001 not in report  # one huge line is cut
    assert "````" in report  # the fence outgrows the backticks inside
    assert '"nats"' in report and "deadletter.subtask.completed" in report and "x\\|y" in report


def test_trace_ids_are_those_of_error_lines_newest_first() -> None:
    lines = [
        json.dumps({"level": "error", "trace_id": "1" * 32}),
        json.dumps({"level": "info", "trace_id": "2" * 32}),
        "not json",
        json.dumps(["a list"]),
        json.dumps({"level": "error", "trace_id": "3" * 32}),
        json.dumps({"level": "error", "trace_id": "1" * 32}),
    ]
    assert trace_ids(lines) == ["1" * 32, "3" * 32]


# --- the smoke canary ----------------------------------------------------------------------


def test_a_failed_canary_opens_one_incident_and_the_next_pass_closes_it() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ok_steps = [SmokeStep("catalog", "sync", True, 0.01), SmokeStep("counted", "stats", True, 0.2)]
    assert smoke_verdict(ok_steps) == (True, "")
    bad = [ok_steps[0], SmokeStep("counted", "stats", False, 20.0, "not done in 20s")]
    ok, reason = smoke_verdict(bad)
    assert not ok and reason == "smoke test failed: counted (stats): not done in 20s"
    assert smoke_verdict([])[0] is False

    canary = CanaryWatch()
    assert canary.result(False, reason, t0) == []  # a standby opens nothing
    canary.take_over([])
    (down,) = canary.result(False, reason, t0)
    assert isinstance(down, WentDown) and down.service == SMOKE and down.reason == reason
    assert canary.result(False, reason, t0 + timedelta(minutes=5)) == []  # the same incident
    (up,) = canary.result(True, "", t0 + timedelta(minutes=10))
    assert isinstance(up, Recovered) and up.incident_id == down.incident_id
    assert up.downtime_s == 600 and up.restarts == 0
    assert canary.result(True, "", t0 + timedelta(minutes=15)) == []

    # a new leader carries on the stored incident
    assert down.incident_id is not None
    stored = StoredIncident(down.incident_id, SMOKE, t0, reason, None, (), 0, 0, False)
    other = CanaryWatch()
    other.take_over([stored])
    (closed,) = other.result(True, "", t0 + timedelta(minutes=1))
    assert isinstance(closed, Recovered) and closed.incident_id == down.incident_id
