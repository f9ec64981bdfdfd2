"""`fleet demo`: traffic through a running stack, the way an outside client makes it.

Everything goes through public interfaces: the services' HTTP APIs with bearer tokens, and
NATS subjects as the `agent` user (subtask reports) and the `ui` user (brains, dismissals).
Read it as an example of integrating with LLM Fleet:

- a user posts a plan to planner;
- planner sends `subtask.ready` for the agent named in each subtask whose dependencies are
  done; the agent answers `subtask.started`, then `subtask.completed` (model, tokens, cost)
  or `subtask.failed` (planner retries it with backoff);
- a subtask that `requires_approval` waits until the user approves or rejects it over HTTP;
- the user's UI publishes `model.rewarded` (brains) and `model.dismissed`; stats counts
  them with the responses per model, user and session;
- an operator syncs the catalog and checks the devices (sync), anyone runs a benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg

from contracts.events import (
    Event,
    ModelDismissed,
    ModelRewarded,
    SubtaskCompleted,
    SubtaskFailed,
    SubtaskReady,
    SubtaskStarted,
    utcnow,
)
from services.demo.fleet import Fleet, publish
from services.demo.servers import DEVICE, DemoServers, Ports, listed_prices, stack_env
from services.demo.story import (
    AGENTS,
    BACKGROUND,
    NEW_COMPLETION_PRICE,
    OPERATOR,
    REPORTS_COST,
    REPRICED,
    STORY,
    USER,
    Script,
    Step,
)

PLAN_END = {"completed", "failed", "cancelled"}


@dataclass
class Tally:
    """What the demo did, and what it saw the services do; `--json` writes it."""

    run: str
    user: str = USER
    configured: bool = False  # the stack uses the demo's catalog, device and model server
    plans: dict[str, str] = field(default_factory=dict)  # plan id -> final status
    responses: Counter[str] = field(default_factory=Counter)  # model -> subtask.completed
    tokens: int = 0
    failed_attempts: int = 0
    approvals: Counter[str] = field(default_factory=Counter)  # approved / rejected
    brains: Counter[str] = field(default_factory=Counter)
    dismissals: Counter[str] = field(default_factory=Counter)
    benchmarks: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> brief
    blocked: str | None = None  # the price guard's answer to an expensive model
    catalog: dict[str, Any] = field(default_factory=dict)
    device: list[str] = field(default_factory=list)  # its states as discovery saw them


class Progress:
    """One line per thing that happened, with the time since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, topic: str, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {topic:<10} {text}", flush=True)


Say = Callable[[str, str], None]


async def publish_retrying(nc: Nats, event: Event) -> None:
    """A retry reuses the event (and its id): JetStream and the consumers drop a copy."""
    for attempt in range(5):
        try:
            await publish(nc, event)
            return
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            await asyncio.sleep(0.5 * 2**attempt)
    await publish(nc, event)


async def until(
    read: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], timeout: float = 120
) -> Any:
    """Read every half second until `done(value)`; the last value on timeout."""
    deadline = time.monotonic() + timeout
    value = await read()
    while not done(value) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        value = await read()
    return value


# --- the agents ----------------------------------------------------------------------------


class Agents:
    """The seed's agents: each takes the subtasks planner dispatches to it (`subtask.ready`,
    on core NATS), starts, works a moment, completes — or fails when its script says so.
    Event ids derive from the dispatch's, so a dispatch seen twice is reported once."""

    def __init__(self, nc: Nats, tally: Tally, say: Say) -> None:
        self.nc, self.tally, self.say = nc, tally, say
        self.fails: dict[tuple[str, str], int] = {}  # (plan, subtask) -> attempts to fail
        self._seen: set[tuple[str, str, int]] = set()
        self._work: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.nc.subscribe("subtask.ready", cb=self._on_ready)

    async def _on_ready(self, msg: Msg) -> None:
        ready = SubtaskReady.from_wire(msg.data)
        key = (ready.plan_id, ready.subtask_id, ready.attempt)
        mine = ready.agent in AGENTS and ready.plan_id.startswith(self.tally.run)
        if mine and key not in self._seen:
            self._seen.add(key)
            task = asyncio.create_task(self._do(ready))
            self._work.add(task)
            task.add_done_callback(self._work.discard)

    async def _do(self, ready: SubtaskReady) -> None:
        started = SubtaskStarted(
            event_id=uuid.uuid5(ready.event_id, "started"),
            plan_id=ready.plan_id,
            subtask_id=ready.subtask_id,
            agent=ready.agent,
            attempt=ready.attempt,
        )
        await publish_retrying(self.nc, started)
        await asyncio.sleep(random.uniform(0.3, 1.5))  # the work
        model = AGENTS[ready.agent]
        if ready.attempt <= self.fails.get((ready.plan_id, ready.subtask_id), 0):
            await publish_retrying(self.nc, failure(ready, model))
            self.tally.failed_attempts += 1
            self.say("agent", f"{ready.agent} failed {ready.subtask_id!r}, attempt {ready.attempt}")
            return
        done = completion(ready, model, started)
        await publish_retrying(self.nc, done)
        self.tally.responses[model] += 1
        self.tally.tokens += done.prompt_tokens + done.completion_tokens


def failure(ready: SubtaskReady, model: str) -> SubtaskFailed:
    return SubtaskFailed(
        event_id=uuid.uuid5(ready.event_id, "failed"),
        plan_id=ready.plan_id,
        subtask_id=ready.subtask_id,
        agent=ready.agent,
        model_id=model,
        attempt=ready.attempt,
        error="the tool call timed out after 30s",
    )


def completion(ready: SubtaskReady, model: str, started: SubtaskStarted) -> SubtaskCompleted:
    prompt, output = random.randint(400, 3000), random.randint(120, 900)
    cost = None
    if ready.agent in REPORTS_COST:  # as OpenRouter's usage.cost tells it
        price = listed_prices(model)
        cost = prompt * Decimal(price["prompt"]) + output * Decimal(price["completion"])
    return SubtaskCompleted(
        event_id=uuid.uuid5(ready.event_id, "completed"),
        plan_id=ready.plan_id,
        subtask_id=ready.subtask_id,
        model_id=model,
        user_id=ready.user_id,
        session_id=ready.session_id,
        agent=ready.agent,
        attempt=ready.attempt,
        started_at=started.started_at,
        duration_seconds=(utcnow() - started.started_at).total_seconds(),
        result=f"{ready.description}: done",
        prompt_tokens=prompt,
        completion_tokens=output,
        cost_usd=cost,
    )


# --- the user and the operator -------------------------------------------------------------


@dataclass
class Demo:
    """A session with the stack: its URLs and tokens, the demo's servers, the user's HTTP
    client and UI connection (NATS `ui`), the operator's HTTP client, the agents."""

    fleet: Fleet
    servers: DemoServers
    api: httpx.AsyncClient  # as the user
    ops: httpx.AsyncClient  # as the operator
    ui: Nats
    agents: Agents
    say: Say
    decisions: dict[tuple[str, str], str] = field(default_factory=dict)  # approvals to give
    plans_made: int = 0

    @property
    def tally(self) -> Tally:
        return self.agents.tally

    async def get(self, service: str, path: str, client: httpx.AsyncClient | None = None) -> Any:
        answer = await (client or self.api).get(self.fleet.url(service, path))
        answer.raise_for_status()
        return answer.json()

    # the user: plans, approvals, brains, dismissals, benchmarks

    async def plan(self, script: Script) -> None:
        """Post the plan, wait for its end, then say what the user thinks of the models."""
        self.plans_made += 1
        plan_id = f"{self.tally.run}-p{self.plans_made}"
        session = f"{self.tally.run}-s{self.plans_made}"
        for s in script.steps:
            self.agents.fails[plan_id, s.id] = s.fails
            if s.approval:
                self.decisions[plan_id, s.id] = s.approval
        body = {
            "plan_id": plan_id,
            "task_id": plan_id,
            "user_id": USER,
            "session_id": session,
            "original_task": script.task,
            "metadata": {"source": "fleet demo"},
            "subtasks": [subtask(s) for s in script.steps],
        }
        (await self.api.post(self.fleet.url("planner", "/v1/plans"), json=body)).raise_for_status()
        plan = await until(
            lambda: self.get("planner", f"/v1/plans/{plan_id}"), lambda p: p["status"] in PLAN_END
        )
        self.tally.plans[plan_id] = plan["status"]
        ended = dict(Counter(s["status"] for s in plan["subtasks"]))
        self.say("planner", f"{script.task!r} {plan['status']}: {ended}")
        for agent, brains in script.brains:
            rewarded = ModelRewarded(
                user_id=USER, session_id=session, model_id=AGENTS[agent], brains=brains
            )
            await publish_retrying(self.ui, rewarded)
            self.tally.brains[AGENTS[agent]] += brains
            self.say("ui", f"{USER} gave {AGENTS[agent]} {brains} brains")
        if script.dismiss:
            agent, reason = script.dismiss
            dismissed = ModelDismissed(
                user_id=USER, session_id=session, model_id=AGENTS[agent], reason=reason
            )
            await publish_retrying(self.ui, dismissed)
            self.tally.dismissals[AGENTS[agent]] += 1
            self.say("ui", f"{USER} dismissed {AGENTS[agent]}: {reason}")

    async def review(self) -> None:
        """Answer the approvals planner asks of the user, as the story decides."""
        while True:
            try:
                for a in await self.get("planner", "/v1/approvals?status=pending"):
                    decision = self.decisions.get((a["plan_id"], a["subtask_id"]))
                    if decision:
                        await self.decide(a, decision)
            except httpx.HTTPError as exc:
                self.say("planner", f"approvals not readable now ({exc!r}); trying again")
            await asyncio.sleep(0.5)

    async def decide(self, approval: dict[str, Any], decision: str) -> None:
        url = self.fleet.url("planner", f"/v1/approvals/{approval['approval_id']}")
        comment = "looks good" if decision == "approved" else "not before legal review"
        answer = await self.api.post(url, json={"decision": decision, "comment": comment})
        if answer.status_code == 200:
            self.tally.approvals[decision] += 1
            self.say("planner", f"{approval['subtask_id']!r} {decision} by {USER}: {comment}")

    async def benchmark(self, provider: str, model: str, task: str, runs: int) -> None:
        spec = {
            "provider": provider,
            "model": model,
            "task_type": task,
            "runs": runs,
            "prompt": "Summarise the plan in three sentences.",
            "max_tokens": 64,
        }
        answer = await self.api.post(self.fleet.url("benchmark", "/v1/benchmarks/run"), json=spec)
        if answer.status_code == 400:  # the price guard
            self.tally.blocked = answer.json()["error"]["message"]
            self.say("benchmark", f"{model} refused: {self.tally.blocked}")
            return
        if answer.status_code != 202:
            self.say("benchmark", f"{model} not accepted: {answer.status_code} {answer.text}")
            return
        job_id = answer.json()["job_id"]
        job = await until(
            lambda: self.get("benchmark", f"/v1/benchmarks/{job_id}"),
            lambda j: j["status"] in ("completed", "failed", "cancelled"),
        )
        summary = job["summary"] or {}
        runs_ok = summary.get("runs_ok", 0)
        self.tally.benchmarks[job_id] = {
            "provider": provider,
            "model": model,
            "status": job["status"],
            "runs_ok": runs_ok,
        }
        ttft, speed = summary.get("ttft_ms") or {}, summary.get("tokens_per_s") or {}
        self.say(
            "benchmark",
            f"{model} via {provider}: {job['status']}, {runs_ok}/{runs} runs, "
            f"TTFT p50 {ttft.get('p50', 0):.0f} ms, {speed.get('p50', 0):.0f} tokens/s",
        )

    # the operator: the catalog and the devices

    async def discover(self) -> dict[str, Any] | None:
        """Check the devices now: the demo's device as sync saw it; None when sync has no
        such device (the stack was not started with the demo's environment)."""
        answer = await self.ops.post(self.fleet.url("sync", "/v1/discovery/run"))
        answer.raise_for_status()
        url = self.servers.served["ollama"].url
        found = (d for d in answer.json() if d["name"] == DEVICE and d["base_url"] == url)
        return next(found, None)

    async def sync_catalog(self) -> dict[str, Any]:
        answer = await self.ops.post(self.fleet.url("sync", "/v1/sync/run"))
        if answer.status_code != 409:  # 409: one is running already; Location names it
            answer.raise_for_status()
        path = answer.headers["Location"]
        run: dict[str, Any] = await until(
            lambda: self.get("sync", path, self.ops), lambda r: r["status"] != "running"
        )
        return run

    async def price(self, model: str) -> str:
        price: str = (await self.get("sync", f"/v1/models/{model}"))["completion_price_per_1m"]
        return price


def subtask(s: Step) -> dict[str, Any]:
    return {
        "subtask_id": s.id,
        "description": s.description,
        "agent": s.agent,
        "estimated_time": "2m",
        "depends_on": list(s.after),
        "requires_approval": s.approval is not None,
        "max_attempts": s.max_attempts,
    }


async def ready(fleet: Fleet, timeout: float = 60) -> None:
    """Every service answers ready (a busy machine may keep one not ready for a moment)."""
    async with httpx.AsyncClient(timeout=5) as client:

        async def problems() -> list[str]:
            found = []
            for name, url in fleet.urls.items():
                try:
                    answer = await client.get(url + "/health/ready")
                except httpx.HTTPError as exc:
                    found.append(f"{name} does not answer at {url}: {exc!r}")
                    continue
                if answer.status_code != 200:
                    found.append(f"{name} is not ready: {answer.status_code} {answer.text[:300]}")
            return found

        left = await until(problems, lambda found: not found, timeout)
    if left:
        raise RuntimeError("; ".join(left))


@asynccontextmanager
async def connected(say: Say, run: str) -> AsyncIterator[Demo]:
    """The stack (checked ready), the demo's servers, both NATS users, the agents at work and
    the user answering approvals."""
    fleet = Fleet.find()
    await ready(fleet)
    say("stack", f"{len(fleet.urls)} services ready: {', '.join(fleet.urls)}")
    async with (
        DemoServers(Ports.from_env()) as servers,
        fleet.client(USER) as api,
        fleet.client(OPERATOR, "operator") as ops,
    ):
        urls = ", ".join(s.url for s in servers.served.values())
        say("servers", f"fake OpenRouter, Ollama device, OpenAI-compatible server: {urls}")
        agent_nc, ui_nc = await fleet.connect("agent"), await fleet.connect("ui")
        agents = Agents(agent_nc, Tally(run), say)
        await agents.start()
        say("agents", ", ".join(f"{a} ({m})" for a, m in AGENTS.items()) + " at work")
        demo = Demo(fleet, servers, api, ops, ui_nc, agents, say)
        reviewer = asyncio.create_task(demo.review())
        try:
            yield demo
        finally:
            reviewer.cancel()
            await agent_nc.drain()
            await ui_nc.drain()


# --- the commands --------------------------------------------------------------------------


async def seed_catalog(demo: Demo) -> bool:
    """The demo's device and catalog into sync; False when the stack does not use them."""
    device = await demo.discover()
    if device is None:
        env = " ".join(f"{k}={v}" for k, v in stack_env().items())
        demo.say(
            "sync",
            "the stack does not use the demo's servers: catalog, device and "
            f"benchmark steps skipped. Start it with `fleet up --demo` (or with {env})",
        )
        return False
    demo.tally.configured = True
    demo.tally.device.append(device["status"])
    demo.say("sync", f"device {DEVICE} {device['status']}, {device['model_count']} models")
    run = await demo.sync_catalog()
    demo.tally.catalog["runs"] = [run["run_id"]]
    if run["status"] == "not_modified":
        demo.say("sync", "catalog unchanged since the last sync (same ETag)")
    else:
        demo.say(
            "sync",
            f"catalog sync {run['status']}: {run['selected']} models kept, "
            f"{run['added']} added, {run['changed']} changed",
        )
    return True


async def seed(demo: Demo) -> None:
    await seed_catalog(demo)
    hello = tuple(Step(a.lower(), f"{a}: introduce yourself", a) for a in AGENTS)
    await demo.plan(Script("Say hello", hello))


async def run(demo: Demo, minutes: float) -> None:
    deadline = time.monotonic() + minutes * 60
    configured = await seed_catalog(demo)
    demo.say("planner", f"{len(STORY)} plans for {USER}; agents fail now and then")
    await asyncio.gather(*(demo.plan(script) for script in STORY))
    if configured:
        await asyncio.gather(
            demo.benchmark("openai", "gpt-4o-mini", "chat", runs=5),
            demo.benchmark("ollama", "llama3.1:8b", "generate", runs=3),
            demo.benchmark("openrouter", "openai/o1", "chat", runs=1),  # too dear: refused
        )
        await reprice(demo)
        await device_outage(demo)
    await keep_coming(demo, deadline)


async def keep_coming(demo: Demo, deadline: float) -> None:
    """Small plans every few seconds until the deadline, or until Ctrl-C: then the plans
    under way finish and the summary follows."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if time.monotonic() < deadline:
        demo.say("planner", "more plans every few seconds (Ctrl-C: finish and sum up)")
    more: list[asyncio.Task[None]] = []
    try:
        while time.monotonic() < deadline and not stop.is_set():
            more.append(asyncio.create_task(demo.plan(random.choice(BACKGROUND))))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), random.uniform(3, 6))
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    await asyncio.gather(*more)


async def reprice(demo: Demo) -> None:
    before = await demo.price(REPRICED)
    demo.servers.openrouter.set_completion_price(REPRICED, NEW_COMPLETION_PRICE)
    run = await demo.sync_catalog()
    after = await demo.price(REPRICED)
    demo.tally.catalog |= {"model": REPRICED, "before": before, "after": after}
    demo.tally.catalog["runs"].append(run["run_id"])
    demo.say(
        "sync",
        f"re-sync: {run['changed']} changed, {REPRICED} completion {before} -> "
        f"{after} USD per 1M tokens",
    )


async def device_outage(demo: Demo) -> None:
    ollama = demo.servers.served["ollama"]
    await ollama.stop()
    for _ in range(2):  # down, then back
        device = await demo.discover()
        assert device is not None
        demo.tally.device.append(device["status"])
        why = f": {device['last_error']}" if device["status"] == "offline" else ""
        demo.say("sync", f"device {DEVICE} {device['status']}{why}")
        if device["status"] == "offline":
            await ollama.start()


async def reset(demo: Demo) -> None:
    """Back to the seed: the demo user's unfinished plans and benchmark jobs cancelled, the
    catalog's original prices synced (the servers start with them), then seed again. What
    stats counted is history and stays: no public API deletes it."""
    cancelled = 0
    for status in ("running", "awaiting_approval"):
        for plan in await demo.get("planner", f"/v1/plans?status={status}"):
            url = demo.fleet.url("planner", f"/v1/plans/{plan['plan_id']}/cancel")
            cancelled += (await demo.api.post(url)).status_code == 200
    for status in ("queued", "running"):
        for job in await demo.get("benchmark", f"/v1/benchmarks?status={status}"):
            url = demo.fleet.url("benchmark", f"/v1/benchmarks/{job['job_id']}/cancel")
            cancelled += (await demo.api.post(url)).status_code in (200, 202)
    demo.say("reset", f"{cancelled} unfinished plans and benchmark jobs of {USER} cancelled")
    await seed(demo)


async def settle(demo: Demo) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Stats' records of the user once it has counted every response the agents reported,
    and the user's leaderboard."""

    async def records() -> Any:
        return await demo.get("stats", "/v1/stats/models")

    sent = sum(demo.tally.responses.values())
    found: list[dict[str, Any]] = await until(
        records, lambda ms: sum(m["response_count"] for m in ms) >= sent, timeout=30
    )
    return found, await demo.get("stats", "/v1/leaderboard?window=7d")


def report(demo: Demo, records: list[dict[str, Any]], board: dict[str, Any]) -> list[str]:
    """What happened, as the services now tell it, and where to look."""
    tally, urls = demo.tally, demo.fleet.urls
    total = {
        k: sum(Decimal(m[k]) for m in records)
        for k in ("response_count", "total_brains", "dismissal_count", "cost_usd")
    }
    lines = [
        "",
        f"What happened (run {tally.run}):",
        f"  planner    plans {dict(Counter(tally.plans.values()))}; "
        f"{tally.failed_attempts} failed attempts; approvals {dict(tally.approvals)}",
        f"  stats      {USER} (every run so far): {total['response_count']} responses, "
        f"{total['total_brains']} brains, {total['dismissal_count']} dismissals, "
        f"{total['cost_usd']:.6f} USD known cost",
        f"             leaderboard (7 days): {ranked(board)}",
    ]
    if tally.configured and tally.benchmarks:
        jobs = "; ".join(f"{j['model']} {j['status']}" for j in tally.benchmarks.values())
        lines += [
            f"  benchmark  {jobs}; openai/o1 refused by the price guard",
            f"  sync       {REPRICED} completion {tally.catalog['before']} -> "
            f"{tally.catalog['after']} USD/1M; device {DEVICE}: {' -> '.join(tally.device)}",
        ]
    s, sync = urls["stats"], urls["sync"]
    lines += [
        "",
        "Where to look:",
        f"  status page  {urls['guardian']}/",
        f'  the APIs     curl -H "Authorization: Bearer $(.venv/bin/fleet token --user {USER})"',
        f"               {urls['planner']}/v1/plans  {s}/v1/stats/models  {s}/v1/costs",
        f"               {s}/v1/leaderboard  {urls['benchmark']}/v1/benchmarks",
        f"               {sync}/v1/models/{REPRICED}  {sync}/v1/devices",
        "  API docs     <service url>/docs",
        "  Grafana      http://localhost:3000 with the compose stack (deploy/README.md)",
    ]
    return lines


def ranked(board: dict[str, Any]) -> str:
    lines = [m for m in board["models"] if m["status"] == "ranked"]
    if not lines:
        return f"no model ranked yet: each needs {board['min_responses']} responses"
    return ", ".join(
        f"{m['rank']}. {m['model_id']}" for m in sorted(lines, key=lambda m: m["rank"])
    )


async def main(command: str, minutes: float, json_path: Path | None) -> int:
    say = Progress()
    async with connected(say, f"demo-{uuid.uuid4().hex[:6]}") as demo:
        if command == "run":
            await run(demo, minutes)
        elif command == "seed":
            await seed(demo)
        else:
            await reset(demo)
        records, board = await settle(demo)
    print("\n".join(report(demo, records, board)))
    if command != "run":
        print(f"\nTokens (valid 12 h):\n  {USER:<18} user      {demo.fleet.token(USER)}")
        print(f"  {OPERATOR:<18} operator  {demo.fleet.token(OPERATOR, 'operator')}")
        print(
            f"The demo's servers run only while `fleet demo` does: sync will find {DEVICE} "
            "offline until the next `fleet demo run`."
        )
    if json_path:
        text = json.dumps(vars(demo.tally), indent=2, default=str)
        await asyncio.to_thread(json_path.write_text, text)
    return 0
