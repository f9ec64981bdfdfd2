"""The smoke canary: a synthetic user's work through the real pipeline, timed per service.

One run, as the reserved user `canary:guardian` (contracts.CANARY_USER_PREFIX: stats keeps
such users out of everyone's leaderboard):

1. sync: the catalog's providers (a read with the canary's token);
2. benchmark: the canary's jobs (a read; it has none, and starts none);
3. planner: a one-subtask plan for the agent `canary-agent`, until the subtask is ready
   (planner dispatched `subtask.ready`);
4. pipeline: guardian publishes that subtask's `subtask.completed` through its outbox, as
   the canary agent would; planner completes the plan, and stats shows the response of
   the model `canary-smoke` in the run's own session, read back through stats' API (a
   session per run, so a run never passes on an earlier run's record).

Each step has the run's timeout; a failed step fails the run, and the shell
(watcher.Guardian.run_smoke) opens an incident of `smoke` for it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx

from contracts.events import CANARY_USER_PREFIX, SubtaskCompleted
from services.guardian.config import GuardianSettings
from services.guardian.domain import SmokeStep
from services.runtime import outbox
from services.runtime.auth import mint, verifier_for
from services.runtime.service import Runtime

CANARY_USER = f"{CANARY_USER_PREFIX}guardian"
CANARY_AGENT = "canary-agent"
CANARY_MODEL = "canary-smoke"
POLL_S = 0.05


class StepFailed(Exception):
    pass


def canary_token(settings: GuardianSettings) -> str:
    """GUARDIAN_SMOKE_TOKEN, or a 10-minute user token signed with the fleet's secret."""
    if settings.guardian_smoke_token is not None:
        return settings.guardian_smoke_token.get_secret_value()
    verifier = verifier_for(settings)
    if verifier.secret is None:
        raise StepFailed("tokens come from AUTH_JWKS_URL: set GUARDIAN_SMOKE_TOKEN")
    return mint(verifier.secret, CANARY_USER, "user", ttl_s=600)


class Canary:
    def __init__(
        self,
        settings: GuardianSettings,
        runtime: Runtime,
        url_of: Callable[[str], str | None],
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.url_of = url_of
        self.timeout = settings.guardian_smoke_timeout_s

    async def run(self) -> list[SmokeStep]:
        run_id = uuid.uuid4()
        steps: list[SmokeStep] = []
        try:
            token = canary_token(self.settings)
        except StepFailed as exc:
            return [SmokeStep("credentials", "guardian", False, 0.0, str(exc))]
        async with httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"}, timeout=self.timeout
        ) as client:
            steps.append(await self.step("catalog", "sync", self.catalog(client)))
            steps.append(await self.step("jobs", "benchmark", self.jobs(client)))
            plan_id = f"canary-{run_id}"
            planned = await self.step("plan", "planner", self.plan(client, plan_id, run_id))
            steps.append(planned)
            published = time.perf_counter()
            steps.append(await self.step("publish", "guardian", self.publish(plan_id, run_id)))
            if planned.ok:
                steps.append(
                    await self.step(
                        "plan completed", "planner", self.completed(client, plan_id), published
                    )
                )
            counted = self.counted(client, f"canary-{run_id}")
            steps.append(await self.step("counted", "stats", counted, published))
        return steps

    async def step(
        self, name: str, service: str, work: Awaitable[Any], since: float | None = None
    ) -> SmokeStep:
        """Run one step under the timeout; its time counts from `since` (the publish, for
        what follows the event) or from its own start."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                await work
            ok, detail = True, ""
        except TimeoutError:
            ok, detail = False, f"not done in {self.timeout:g}s"
        except StepFailed as exc:
            ok, detail = False, str(exc)
        except httpx.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        took = time.perf_counter() - (since if since is not None else t0)
        return SmokeStep(name, service, ok, round(took, 4), detail[:300])

    def base(self, service: str) -> str:
        url = self.url_of(service)
        if url is None:
            raise StepFailed("no address known (no heartbeat, no GUARDIAN_PROBE_URLS)")
        return url

    @staticmethod
    def expect(response: httpx.Response, *statuses: int) -> Any:
        if response.status_code not in statuses:
            raise StepFailed(f"HTTP {response.status_code} from {response.request.url.path}")
        return response.json()

    async def catalog(self, client: httpx.AsyncClient) -> None:
        self.expect(await client.get(f"{self.base('sync')}/v1/providers"), 200)

    async def jobs(self, client: httpx.AsyncClient) -> None:
        found = self.expect(await client.get(f"{self.base('benchmark')}/v1/benchmarks"), 200)
        if found:
            raise StepFailed(f"the canary has {len(found)} benchmark jobs; it starts none")

    async def plan(self, client: httpx.AsyncClient, plan_id: str, run_id: uuid.UUID) -> None:
        planner = self.base("planner")
        body = {
            "plan_id": plan_id,
            "task_id": plan_id,
            "user_id": CANARY_USER,
            "session_id": f"canary-{run_id}",
            "original_task": "guardian's smoke canary",
            "metadata": {"canary_run": str(run_id)},
            "subtasks": [{"subtask_id": "canary", "description": "nothing", "agent": CANARY_AGENT}],
        }
        self.expect(await client.post(f"{planner}/v1/plans", json=body), 200, 201)
        while True:
            plan = self.expect(await client.get(f"{planner}/v1/plans/{plan_id}"), 200)
            if plan["subtasks"][0]["status"] == "ready":
                return
            await asyncio.sleep(POLL_S)

    async def publish(self, plan_id: str, run_id: uuid.UUID) -> None:
        event = SubtaskCompleted(
            event_id=uuid.uuid5(run_id, "subtask.completed"),
            plan_id=plan_id,
            subtask_id="canary",
            model_id=CANARY_MODEL,
            user_id=CANARY_USER,
            session_id=f"canary-{run_id}",
            agent=CANARY_AGENT,
            result="canary",
            cost_usd=Decimal(0),
        )
        async with self.runtime.transaction() as conn:
            await outbox.add(conn, [event])

    async def completed(self, client: httpx.AsyncClient, plan_id: str) -> None:
        planner = self.base("planner")
        while True:
            plan = self.expect(await client.get(f"{planner}/v1/plans/{plan_id}"), 200)
            if plan["status"] == "completed":
                return
            await asyncio.sleep(POLL_S)

    async def counted(self, client: httpx.AsyncClient, session_id: str) -> None:
        stats = self.base("stats")
        while True:
            r = await client.get(f"{stats}/v1/models/{CANARY_MODEL}/stats")
            if r.status_code == 200:
                sessions = {x["session_id"]: x for x in r.json()["sessions"]}
                if sessions.get(session_id, {}).get("response_count", 0) >= 1:
                    return
            elif r.status_code != 404:  # 404: no record yet
                self.expect(r, 200)
            await asyncio.sleep(POLL_S)
