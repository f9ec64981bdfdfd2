"""Each user sees and acts on their own records only, through every API that holds them;
another user's object answers 404, as one that does not exist; operator-only routes answer
403 to a user and 401 to no one."""

from __future__ import annotations

import uuid

from nats.js import JetStreamContext

from contracts.events import SubtaskCompleted
from services.planner.app import build as build_planner
from services.stats.app import build as build_stats
from services.stats.config import StatsSettings
from services.sync.app import build as build_sync
from services.sync.config import SyncSettings
from tests.conftest import Infra, bearer, eventually, running
from tests.integration.test_planner_flow import plan_body, settings, subtask

ALICE, BOB = bearer("alice", "user"), bearer("bob", "user")
OPERATOR = bearer("ops", "operator")


async def test_a_plan_and_its_approvals_are_their_owners_alone(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with running(build_planner(settings(infra, database_url))) as (_, client):
        body = plan_body(subtask("a", requires_approval=True), subtask("b", "a"))
        r = await client.post("/v1/plans", json=body, headers=ALICE)
        assert r.status_code == 201, r.text
        plan_id = r.json()["plan_id"]

        async def approval_asked() -> bool:
            found = await client.get("/v1/approvals", headers=ALICE)
            return bool(found.json())

        await eventually(approval_asked, what="the approval request")
        [approval] = (await client.get("/v1/approvals", headers=ALICE)).json()

        # bob finds nothing of alice's, and cannot act on it
        for path in (f"/v1/plans/{plan_id}", f"/v1/plans/{plan_id}/metrics"):
            assert (await client.get(path, headers=BOB)).status_code == 404
            assert (await client.get(path, headers=ALICE)).status_code == 200
        assert (await client.get("/v1/plans", headers=BOB)).json() == []
        assert (await client.get("/v1/plans?user_id=alice", headers=BOB)).json() == []
        assert (await client.get("/v1/approvals", headers=BOB)).json() == []
        approval_url = f"/v1/approvals/{approval['approval_id']}"
        assert (await client.get(approval_url, headers=BOB)).status_code == 404
        decision = {"decision": "approved"}
        assert (await client.post(approval_url, json=decision, headers=BOB)).status_code == 404
        cancel = f"/v1/plans/{plan_id}/cancel"
        assert (await client.post(cancel, headers=BOB)).status_code == 404
        assign = f"/v1/plans/{plan_id}/subtasks/b/assign"
        assert (await client.post(assign, json={"agent": "x"}, headers=BOB)).status_code == 404
        # nor create plans in her name
        forged = plan_body(subtask("a"))  # user_id alice
        assert (await client.post("/v1/plans", json=forged, headers=BOB)).status_code == 403

        # what bob tried changed nothing; alice herself may act
        plan = (await client.get(f"/v1/plans/{plan_id}", headers=ALICE)).json()
        assert plan["status"] == "running"
        assert plan["subtasks"][1]["agent"] == "openai/gpt-4o"
        r = await client.post(approval_url, json=decision, headers=ALICE)
        assert r.status_code == 200, r.text

        # an operator sees everyone's
        listed = (await client.get("/v1/plans", headers=OPERATOR)).json()
        assert [p["plan_id"] for p in listed] == [plan_id]
        assert (await client.get(f"/v1/plans/{plan_id}", headers=OPERATOR)).status_code == 200


async def test_a_users_stats_are_theirs_alone(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    spec = build_stats(StatsSettings(nats_url=infra.nats_url, database_url=database_url))
    async with running(spec) as (_, client):
        for user in ("alice", "bob"):
            event = SubtaskCompleted(
                plan_id="p",
                subtask_id=f"s-{user}",
                model_id="openai/gpt-4o",
                user_id=user,
                session_id="chat",
                prompt_tokens=10 if user == "alice" else 99,
            )
            await js.publish(event.subject, event.model_dump_json().encode())

        url = "/v1/models/openai/gpt-4o/stats"

        async def both_counted() -> bool:
            a = await client.get(url, headers=ALICE)
            b = await client.get(url, headers=BOB)
            return a.status_code == b.status_code == 200

        await eventually(both_counted, what="both users' records")
        alice = (await client.get(url, headers=ALICE)).json()
        assert (alice["user_id"], alice["prompt_tokens"]) == ("alice", 10)
        assert "E" not in alice["cost_usd"]  # a plain decimal ("0"), never "0E-12"
        # asking for another user's record by query changes nothing
        again = (await client.get(url, params={"user_id": "bob"}, headers=ALICE)).json()
        assert (again["user_id"], again["prompt_tokens"]) == ("alice", 10)
        carol = await client.get(url, headers=bearer("carol", "user"))
        assert carol.status_code == 404


async def test_catalog_operations_need_the_operator_role(infra: Infra, database_url: str) -> None:
    spec = build_sync(
        SyncSettings(
            nats_url=infra.nats_url,
            database_url=database_url,
            openrouter_base_url=f"http://127.0.0.1:9/{uuid.uuid4().hex}",
        )
    )
    async with running(spec) as (_, client):
        assert (await client.get("/v1/models", headers=ALICE)).status_code == 200
        for path in ("/v1/sync/run", "/v1/discovery/run"):
            assert (await client.post(path, headers=ALICE)).status_code == 403, path
            assert (await client.post(path, headers={"Authorization": ""})).status_code == 401, path
