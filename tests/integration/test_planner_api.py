"""planner's HTTP API on real NATS and PostgreSQL: validation, repeated posts, approvals,
cancel, and models dismissed from a session."""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext

from contracts.events import ModelDismissed
from tests.conftest import Infra
from tests.integration.test_planner_flow import (
    SILENT,
    FakeAgents,
    Recorder,
    completed,
    create,
    driven,
    get_plan,
    plan_body,
    planner,
    publish,
    subtask,
    subtasks_of,
    until_applied,
    until_plan,
    until_subtask,
)

# --- creating plans ----------------------------------------------------------------------


async def test_invalid_plans_are_refused_naming_the_offending_ids(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client:
        r = await client.post(
            "/v1/plans",
            json=plan_body(
                subtask("a"),
                subtask("a"),
                subtask("b", "ghost"),
                subtask("c", "d"),
                subtask("d", "c"),
            ),
        )
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["code"] == "invalid_plan"
        assert "duplicate subtask ids: a" in error["message"]
        assert "subtask b depends on unknown ghost" in error["message"]
        assert "dependency cycle: c -> d -> c" in error["message"]
        assert [(f["loc"], f["value_prefix"]) for f in error["fields"]] == [
            (["body", "subtasks", 0, "subtask_id"], "a"),
            (["body", "subtasks", 2, "subtask_id"], "b"),
            (["body", "subtasks", 3, "subtask_id"], "c"),
        ]
        r = await client.post("/v1/plans", json=plan_body())
        assert r.status_code == 422  # no subtasks
        assert (await client.get("/v1/plans")).json() == []


async def test_posting_the_same_task_again_returns_its_plan_and_a_different_one_conflicts(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client, Recorder(js) as events:
        body = plan_body(subtask("a"), subtask("b", "a"))
        first = await create(client, body)
        again = await client.post("/v1/plans", json=body)
        assert again.status_code == 200
        assert again.json()["plan_id"] == first["plan_id"]
        other = {**body, "subtasks": [subtask("a")]}
        conflict = await client.post("/v1/plans", json=other)
        assert conflict.status_code == 409
        assert first["plan_id"] in conflict.json()["error"]["message"]
        assert [p["plan_id"] for p in (await client.get("/v1/plans")).json()] == [first["plan_id"]]
        (created,) = await events.wait("plan.created")
        assert created["plan_id"] == first["plan_id"]
        assert (await client.get("/v1/plans/nope")).status_code == 404


# --- approvals ---------------------------------------------------------------------------


async def test_an_approved_subtask_is_dispatched_and_an_answer_counts_once(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        plan = await create(
            client, plan_body(subtask("a"), subtask("tool", "a", requires_approval=True))
        )
        (asked,) = await events.wait("approval.requested")
        assert (asked["type"], asked["subtask_id"], asked["user_id"]) == ("tool", "tool", "alice")
        assert "tool" not in agents.order()
        await until_subtask(client, plan["plan_id"], "tool", status="awaiting_approval")
        pending = (await client.get("/v1/approvals", params={"status": "pending"})).json()
        assert [a["approval_id"] for a in pending] == [asked["approval_id"]]

        r = await client.post(
            f"/v1/approvals/{asked['approval_id']}", json={"decision": "approved", "comment": "ok"}
        )
        assert r.status_code == 200 and r.json()["status"] == "approved"
        await until_plan(client, plan["plan_id"], "completed")
        assert agents.attempts("tool") == [1]
        (resolved,) = await events.wait("approval.resolved")
        assert (resolved["status"], resolved["decision"]) == ("approved", "ok")

        again = await client.post(
            f"/v1/approvals/{asked['approval_id']}", json={"decision": "rejected"}
        )
        assert again.status_code == 409
        unknown = await client.post(f"/v1/approvals/{uuid.uuid4()}", json={"decision": "approved"})
        assert unknown.status_code == 404
        assert (await client.get("/v1/approvals", params={"status": "pending"})).json() == []


async def test_a_rejected_subtask_skips_its_dependents(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        plan = await create(
            client,
            plan_body(
                subtask("risky", requires_approval=True),
                subtask("after", "risky"),
                subtask("independent"),
            ),
        )
        (asked,) = await events.wait("approval.requested")
        r = await client.post(
            f"/v1/approvals/{asked['approval_id']}",
            json={"decision": "rejected", "comment": "too risky"},
        )
        assert r.status_code == 200
        done = await until_plan(client, plan["plan_id"], "failed")
        by_id = subtasks_of(done)
        assert by_id["risky"]["status"] == "rejected"
        assert by_id["risky"]["error"] == "approval rejected: too risky"
        assert by_id["after"]["status"] == "skipped"
        assert by_id["independent"]["status"] == "completed"
        assert agents.order() == ["independent"]
        (resolved,) = await events.wait("approval.resolved")
        assert (resolved["status"], resolved["decision"]) == ("rejected", "too risky")


async def test_an_unanswered_approval_times_out_and_skips_its_dependents(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js, planner_approval_timeout_s=0.3) as (
        client,
        events,
        agents,
    ):
        plan = await create(
            client, plan_body(subtask("a", requires_approval=True), subtask("b", "a"))
        )
        done = await until_plan(client, plan["plan_id"], "failed")
        assert [s["status"] for s in done["subtasks"]] == ["rejected", "skipped"]
        (approval,) = done["approvals"]
        assert approval["status"] == "timeout" and approval["resolved_at"] is not None
        (resolved,) = await events.wait("approval.resolved")
        assert resolved["status"] == "timeout"
        assert agents.received == []


async def test_a_plan_that_needs_approval_waits_for_it_as_a_whole(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        plan = await create(
            client, plan_body(subtask("a"), subtask("b", "a"), requires_approval=True)
        )
        assert plan["status"] == "awaiting_approval"
        (asked,) = await events.wait("approval.requested")
        assert (asked["type"], asked["subtask_id"]) == ("plan", None)
        assert agents.received == []
        r = await client.post(
            f"/v1/approvals/{asked['approval_id']}", json={"decision": "approved"}
        )
        assert r.status_code == 200
        await until_plan(client, plan["plan_id"], "completed")
        assert agents.order() == ["a", "b"]


# --- cancel ------------------------------------------------------------------------------


async def test_cancel_stops_a_plan_and_late_reports_change_nothing(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with driven(infra, database_url, js) as (client, events, agents):
        agents.script["slow"] = [SILENT]
        plan = await create(
            client,
            plan_body(
                subtask("slow"), subtask("next", "slow"), subtask("ask", requires_approval=True)
            ),
        )
        plan_id = plan["plan_id"]
        await events.wait("approval.requested")
        r = await client.post(f"/v1/plans/{plan_id}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert (await client.post(f"/v1/plans/{plan_id}/cancel")).status_code == 200
        (finished,) = await events.wait("plan.completed")
        assert finished["status"] == "cancelled"
        (resolved,) = await events.wait("approval.resolved")
        assert (resolved["status"], resolved["decision"]) == ("rejected", "plan cancelled")

        (ready,) = agents.received
        await publish(js, completed(ready))  # the agent finishes after all
        await until_applied(js, "PLANS", "planner-subtask-completed")
        after = await get_plan(client, plan_id)
        assert [s["status"] for s in after["subtasks"]] == ["cancelled"] * 3
        assert agents.order() == ["slow"]
        assert (await client.post("/v1/plans/nope/cancel")).status_code == 404

        done = await create(client, plan_body(subtask("quick")))
        await until_plan(client, done["plan_id"], "completed")
        assert (await client.post(f"/v1/plans/{done['plan_id']}/cancel")).status_code == 409


# --- dismissed models --------------------------------------------------------------------


async def test_a_dismissed_model_gets_no_more_work_in_that_session_the_fallback_does(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with (
        planner(infra, database_url, planner_fallback_agent="fallback/model") as client,
        FakeAgents(js) as agents,
    ):
        agents.script["first"] = [SILENT]
        plan = await create(
            client,
            plan_body(
                subtask("first"),
                subtask("second", "first", agent="bad/model"),
                subtask("third", "first", agent="good/model"),
            ),
        )
        plan_id = plan["plan_id"]
        await publish(
            js, ModelDismissed(user_id="alice", session_id="chat-1", model_id="bad/model")
        )
        await until_subtask(client, plan_id, "second", agent="fallback/model", status="pending")

        (ready,) = agents.received
        await publish(js, completed(ready))
        await until_plan(client, plan_id, "completed")
        agents_of = {r.subtask_id: r.agent for r in agents.received}
        assert agents_of == {
            "first": "openai/gpt-4o",
            "second": "fallback/model",
            "third": "good/model",
        }

        # a new plan of the same session: routed around the model from the start
        later = await create(client, plan_body(subtask("fresh", agent="bad/model")))
        await until_plan(client, later["plan_id"], "completed")
        assert [r.agent for r in agents.received if r.subtask_id == "fresh"] == ["fallback/model"]
        # another session still uses it
        other = await create(
            client, plan_body(subtask("elsewhere", agent="bad/model"), session_id="chat-2")
        )
        await until_plan(client, other["plan_id"], "completed")
        assert [r.agent for r in agents.received if r.subtask_id == "elsewhere"] == ["bad/model"]


async def test_without_a_fallback_the_subtasks_of_a_dismissed_model_are_held_visibly(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with planner(infra, database_url) as client, FakeAgents(js) as agents:
        await publish(
            js, ModelDismissed(user_id="alice", session_id="chat-1", model_id="bad/model")
        )
        await until_applied(js, "FEEDBACK", "planner-model-dismissed")
        plan = await create(
            client, plan_body(subtask("a"), subtask("b", "a", agent="bad/model"), subtask("c", "b"))
        )
        plan_id = plan["plan_id"]
        b = await until_subtask(client, plan_id, "b", status="held")
        assert "bad/model was dismissed" in b["error"]
        assert (await get_plan(client, plan_id))["status"] == "running"  # held, not lost

        r = await client.post(
            f"/v1/plans/{plan_id}/subtasks/b/assign", json={"agent": "good/model"}
        )
        assert r.status_code == 200 and r.json()["status"] == "ready"
        await until_plan(client, plan_id, "completed")
        assert [r.agent for r in agents.received if r.subtask_id == "b"] == ["good/model"]
        again = await client.post(
            f"/v1/plans/{plan_id}/subtasks/b/assign", json={"agent": "good/model"}
        )
        assert again.status_code == 409
