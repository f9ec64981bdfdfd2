"""planner on real NATS and PostgreSQL, driven by a fake agent pool that listens for
`subtask.ready` and answers with raw JetStream publishes of started/completed/failed."""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.events import (
    Event,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
    utcnow,
)
from services.planner.app import build
from services.planner.config import PlannerSettings
from tests.conftest import Infra, eventually, running

# --- the fake agent pool -----------------------------------------------------------------

# what an agent does with one attempt: finish it, fail it, start it and go silent (a dead
# agent), or never even start it
COMPLETE, FAIL, HANG, SILENT = "complete", "fail", "hang", "silent"


@dataclass
class FakeAgents:
    """Answers every subtask.ready by its script: `script[subtask_id]` lists what happens to
    attempt 1, 2, ...; anything unscripted completes."""

    js: JetStreamContext
    script: dict[str, list[str]] = field(default_factory=dict)
    received: list[SubtaskReady] = field(default_factory=list)

    async def __aenter__(self) -> FakeAgents:
        self.sub = await self.js.subscribe("subtask.ready", ordered_consumer=True, cb=self._on)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.sub.unsubscribe()

    def attempts(self, subtask_id: str) -> list[int]:
        return [r.attempt for r in self.received if r.subtask_id == subtask_id]

    def order(self) -> list[str]:
        return [r.subtask_id for r in self.received]

    async def _on(self, msg: Msg) -> None:
        ready = SubtaskReady.model_validate_json(msg.data)
        self.received.append(ready)
        plan = self.script.get(ready.subtask_id, [])
        action = plan[ready.attempt - 1] if ready.attempt <= len(plan) else COMPLETE
        if action == SILENT:
            return
        await publish(self.js, started(ready))
        if action == COMPLETE:
            await publish(self.js, completed(ready))
        elif action == FAIL:
            await publish(self.js, failed(ready))


def started(ready: SubtaskReady) -> SubtaskStarted:
    return SubtaskStarted(
        plan_id=ready.plan_id, subtask_id=ready.subtask_id, agent=ready.agent, attempt=ready.attempt
    )


def completed(ready: SubtaskReady, **fields: Any) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id=ready.plan_id,
        subtask_id=ready.subtask_id,
        model_id=ready.agent,
        user_id=ready.user_id,
        session_id=ready.session_id,
        agent=ready.agent,
        attempt=ready.attempt,
        result=f"result of {ready.subtask_id}",
        **fields,
    )


def failed(ready: SubtaskReady) -> SubtaskFailed:
    return SubtaskFailed(
        plan_id=ready.plan_id,
        subtask_id=ready.subtask_id,
        agent=ready.agent,
        attempt=ready.attempt,
        error=f"attempt {ready.attempt} broke",
    )


async def publish(js: JetStreamContext, event: Event) -> None:
    await js.publish(event.subject, event.model_dump_json().encode())


@dataclass
class Recorder:
    """Every event the planner publishes on the given subjects, parsed."""

    js: JetStreamContext
    subjects: tuple[str, ...] = (
        "plan.created",
        "plan.completed",
        "approval.requested",
        "approval.resolved",
    )
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))

    async def __aenter__(self) -> Recorder:
        self.subs = [
            await self.js.subscribe(s, ordered_consumer=True, cb=self._on) for s in self.subjects
        ]
        return self

    async def __aexit__(self, *_: object) -> None:
        for sub in self.subs:
            await sub.unsubscribe()

    async def _on(self, msg: Msg) -> None:
        self.events[msg.subject].append(json.loads(msg.data))

    async def wait(self, subject: str, n: int = 1, timeout: float = 10) -> list[dict[str, Any]]:
        async def arrived() -> bool:
            return len(self.events[subject]) >= n

        await eventually(arrived, timeout=timeout, what=f"{n} {subject}")
        return self.events[subject]


# --- the service -------------------------------------------------------------------------


def settings(infra: Infra, database_url: str, **overrides: Any) -> PlannerSettings:
    fields: dict[str, Any] = dict(
        nats_url=infra.nats_url,
        database_url=database_url,
        http_port=0,
        outbox_poll_interval_s=0.1,
        planner_tick_s=0.05,
        planner_retry_base_s=0.05,
        planner_retry_max_s=0.2,
        planner_default_timeout_s=30,
        planner_approval_timeout_s=30,
    )
    return PlannerSettings(**{**fields, **overrides})


@asynccontextmanager
async def planner(
    infra: Infra, database_url: str, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with running(build(settings(infra, database_url, **overrides))) as (_, client):
        yield client


@asynccontextmanager
async def driven(
    infra: Infra, database_url: str, js: JetStreamContext, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Recorder, FakeAgents]]:
    """planner, a recorder of its events and the fake agent pool: what most tests drive."""
    async with (
        planner(infra, database_url, **overrides) as client,
        Recorder(js) as events,
        FakeAgents(js) as agents,
    ):
        yield client, events, agents


def subtask(sid: str, *deps: str, **fields: Any) -> dict[str, Any]:
    return {"subtask_id": sid, "description": f"do {sid}", "agent": "openai/gpt-4o",
            "depends_on": list(deps), **fields}  # fmt: skip


def plan_body(*subtasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {
        "task_id": f"task-{uuid.uuid4()}",
        "user_id": "alice",
        "session_id": "chat-1",
        "original_task": "write a report",
        "subtasks": list(subtasks),
        **fields,
    }


async def create(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/v1/plans", json=body)
    assert r.status_code == 201, r.text
    plan: dict[str, Any] = r.json()
    return plan


async def get_plan(client: httpx.AsyncClient, plan_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/plans/{plan_id}")
    r.raise_for_status()
    plan: dict[str, Any] = r.json()
    return plan


async def until_plan(
    client: httpx.AsyncClient, plan_id: str, status: str, timeout: float = 10
) -> dict[str, Any]:
    async def reached() -> bool:
        return bool((await get_plan(client, plan_id))["status"] == status)

    await eventually(reached, timeout=timeout, what=f"plan {plan_id} {status}")
    return await get_plan(client, plan_id)


async def until_subtask(
    client: httpx.AsyncClient, plan_id: str, subtask_id: str, **expected: Any
) -> dict[str, Any]:
    async def reached() -> bool:
        s = subtasks_of(await get_plan(client, plan_id))[subtask_id]
        return all(s[k] == v for k, v in expected.items())

    await eventually(reached, what=f"subtask {subtask_id} with {expected}")
    return subtasks_of(await get_plan(client, plan_id))[subtask_id]


async def until_applied(js: JetStreamContext, stream: str, durable: str) -> None:
    """Wait until the planner's consumer has applied and acknowledged all it was sent."""

    async def drained() -> bool:
        info = await js.consumer_info(stream, durable)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await eventually(drained, what=f"{durable} caught up")


def subtasks_of(plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["subtask_id"]: s for s in plan["subtasks"]}


# --- the lifecycle -----------------------------------------------------------------------


async def test_a_diamond_runs_each_subtask_once_its_dependencies_completed(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        agents.script["c"] = [HANG]  # c waits for this test to complete it
        body = plan_body(
            subtask("a", estimated_time="1m"),
            subtask("b", "a", agent="local/llama", estimated_time="30s"),
            subtask("c", "a"),
            subtask("d", "b", "c", estimated_time="2 minutes"),
        )
        plan = await create(client, body)
        assert plan["status"] == "running" and plan["subtask_count"] == 4
        # a went out in the transaction that created the plan; d cannot go before c
        by_id = subtasks_of(await get_plan(client, plan["plan_id"]))
        assert by_id["a"]["attempt"] == 1 and by_id["a"]["status"] != "pending"
        assert (by_id["d"]["status"], by_id["d"]["attempt"]) == ("pending", 0)

        await until_subtask(client, plan["plan_id"], "b", status="completed")
        # b's completion is applied: d must still wait for c
        d = subtasks_of(await get_plan(client, plan["plan_id"]))["d"]
        assert (d["status"], d["attempt"]) == ("pending", 0) and "d" not in agents.order()
        await until_subtask(client, plan["plan_id"], "c", status="running")
        (ready_c,) = [r for r in agents.received if r.subtask_id == "c"]
        await publish(js, completed(ready_c))
        done = await until_plan(client, plan["plan_id"], "completed")

        order = agents.order()
        assert order[0] == "a" and set(order[1:3]) == {"b", "c"} and order[3] == "d"
        assert len(order) == 4
        assert {r.agent for r in agents.received if r.subtask_id == "b"} == {"local/llama"}
        for s in done["subtasks"]:
            assert s["status"] == "completed" and s["attempt"] == 1
            assert s["result"] == f"result of {s['subtask_id']}"
            assert s["started_at"] is not None and s["duration_seconds"] is not None
        assert done["is_complete"] and done["completed_at"] is not None

        (created,) = await events.wait("plan.created")
        assert created["task_id"] == body["task_id"] and created["subtask_count"] == 4
        assert [s["depends_on"] for s in created["subtasks"]] == [[], ["a"], ["a"], ["b", "c"]]
        (finished,) = await events.wait("plan.completed")
        assert finished["status"] == "completed"
        metrics = finished["metrics"]
        assert metrics["by_status"] == {"completed": 4}
        assert metrics["per_agent"]["local/llama"]["subtasks"] == 1
        assert metrics["estimated_vs_actual"]["estimated_seconds"] == 210
        assert metrics["critical_path"]["subtask_ids"][0] == "a"
        assert metrics["critical_path"]["subtask_ids"][-1] == "d"

        r = await client.get(f"/v1/plans/{plan['plan_id']}/metrics")
        assert r.status_code == 200
        assert r.json()["by_status"] == {"completed": 4}
        exposed = (await client.get("/metrics")).text
        for name in (
            "planner_dispatch_latency_seconds_count",
            'planner_subtasks_total{status="completed"}',
            'planner_plans_total{status="completed"}',
        ):
            line = next(x for x in exposed.splitlines() if x.startswith(name))
            assert float(line.split()[-1]) > 0, line
        listed = await client.get("/v1/plans", params={"status": "completed"})
        assert [p["plan_id"] for p in listed.json()] == [plan["plan_id"]]
        assert (await client.get("/v1/plans", params={"status": "running"})).json() == []


async def test_a_failed_subtask_is_retried_and_its_dependents_wait(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client, FakeAgents(js) as agents:
        agents.script["a"] = [FAIL, FAIL, COMPLETE]
        plan = await create(client, plan_body(subtask("a", max_attempts=3), subtask("b", "a")))
        done = await until_plan(client, plan["plan_id"], "completed")
        assert agents.attempts("a") == [1, 2, 3]
        assert agents.order()[-1] == "b" and agents.attempts("b") == [1]
        a = subtasks_of(done)["a"]
        assert (a["status"], a["attempt"], a["error"]) == ("completed", 3, None)
        r = await client.get(f"/v1/plans/{plan['plan_id']}/metrics")
        assert r.json()["retries"] == 2


async def test_exhausted_retries_fail_the_plan_and_skip_dependents_only(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        agents.script["a"] = [FAIL, FAIL]
        plan = await create(
            client,
            plan_body(
                subtask("a", max_attempts=2),
                subtask("b", "a"),
                subtask("c", "b"),
                subtask("other"),
            ),
        )
        done = await until_plan(client, plan["plan_id"], "failed")
        by_id = subtasks_of(done)
        assert by_id["a"]["status"] == "failed" and by_id["a"]["attempt"] == 2
        assert by_id["a"]["error"] == "attempt 2 broke"
        assert by_id["b"]["status"] == by_id["c"]["status"] == "skipped"
        assert by_id["c"]["error"] == "skipped: depends on a, which failed"
        assert by_id["other"]["status"] == "completed"
        assert agents.attempts("a") == [1, 2] and "b" not in agents.order()
        (finished,) = await events.wait("plan.completed")
        assert finished["status"] == "failed"
        assert finished["metrics"]["by_status"] == {"completed": 1, "failed": 1, "skipped": 2}


async def test_an_attempt_past_its_timeout_counts_as_failed(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client, FakeAgents(js) as agents:
        # never started, then done; started and then silent, with no attempt left. The
        # exact deadlines are the unit tests' (on a clock they set); here, on a busy
        # machine, a later attempt may time out too, and "dead" may time out before its
        # start is applied: what must hold is that both end and nothing waits forever.
        agents.script["lost"] = [SILENT]  # the attempts after it complete
        agents.script["dead"] = [HANG]
        plan = await create(
            client,
            plan_body(
                subtask("lost", timeout_s=0.3, max_attempts=5),
                subtask("dead", timeout_s=0.3, max_attempts=1),
                subtask("after", "dead"),
            ),
        )
        done = await until_plan(client, plan["plan_id"], "failed")
        by_id = subtasks_of(done)
        assert by_id["lost"]["status"] == "completed" and by_id["lost"]["attempt"] >= 2
        assert agents.attempts("lost")[:2] == [1, 2]
        assert by_id["dead"]["status"] == "failed"
        assert re.fullmatch(
            r"timed out: (running|dispatched and not started) for more than 0.3s \(attempt 1\)",
            by_id["dead"]["error"],
        )
        assert by_id["after"]["status"] == "skipped"
        assert by_id["after"]["error"] == "skipped: depends on dead, which failed"


async def test_duplicates_and_reordering_come_out_right(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client, FakeAgents(js) as agents:
        agents.script["a"] = [SILENT]  # this test answers for a itself
        plan = await create(client, plan_body(subtask("a"), subtask("b", "a")))
        plan_id = plan["plan_id"]

        async def a_dispatched() -> bool:
            return agents.attempts("a") == [1]

        await eventually(a_dispatched, what="a dispatched")
        (ready,) = agents.received
        t0 = utcnow()
        done = completed(ready, started_at=None, completed_at=t0)
        await publish(js, done)  # completed before started
        await publish(js, done)  # the same message twice
        await publish(js, completed(ready, completed_at=t0))  # the same report, another id
        finished = await until_plan(client, plan_id, "completed")
        # Reports of one subtask travel on different subjects, so they are only ordered
        # once one has been applied: these two come after the completion, whatever comes.
        await publish(js, failed(ready))  # too late: a completed
        late_start = started(ready).model_copy(update={"started_at": t0.replace(microsecond=0)})
        await publish(js, late_start)

        async def start_filled_in() -> bool:
            return subtasks_of(await get_plan(client, plan_id))["a"]["started_at"] is not None

        await eventually(start_filled_in, what="the late start recorded")
        a = subtasks_of(await get_plan(client, plan_id))["a"]
        assert a["status"] == "completed" and a["error"] is None and a["attempt"] == 1
        assert datetime.fromisoformat(a["started_at"]) == late_start.started_at
        assert a["duration_seconds"] == (t0 - late_start.started_at).total_seconds()
        assert agents.attempts("b") == [1]  # dispatched once, whatever the duplicates
        assert subtasks_of(finished)["b"]["status"] == "completed"
