"""Cross-user reads, tried as an attacker would, against a stack started by `fleet up`.

    python -m benchmarks.cross_user [--users 4]

Each user creates what the APIs keep per user: a plan with an approval (planner), a
benchmark job (benchmark), and completed subtasks, rewards and a dismissal on a model and a
session of their own (stats, published over NATS as the `agent` client). Then every user
tries every other user's records through every route that holds them (by id, by a
`user_id=` filter, by acting on them), and through SQL as stats' runtime login role with
their own claims; and each service's login role tries to become the superuser or another
service. A read "found" something when the answer holds the victim's data (a 2xx on an id,
or the victim's id, model or session in a list); an action "found" something when it was
accepted. Target: 0 found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats

from contracts.events import Event, ModelDismissed, ModelRewarded, SubtaskCompleted
from services.runtime.auth import development_secret, mint
from services.runtime.db import login_role, user_role

SERVICES = ("sync", "benchmark", "planner", "guardian", "stats")


class Tally:
    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()
        self.found: Counter[str] = Counter()
        self.examples: list[str] = []

    def check(self, where: str, leaked: bool, what: str) -> None:
        self.tried[where] += 1
        if leaked:
            self.found[where] += 1
            self.examples.append(f"{where}: {what}")


def start_stack(home: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    closed = "http://127.0.0.1:9"  # upstreams fail fast; nothing reaches out
    env = {
        **os.environ,
        "FLEET_HOME": str(home),
        "OPENROUTER_BASE_URL": closed,
        "OLLAMA_BASE_URL": closed,
        "OPENAI_BASE_URL": closed,
        "OPENROUTER_SYNC_ON_STARTUP": "false",
        "LOG_LEVEL": "WARNING",
    }
    for key in ("NATS_URL", "DATABASE_URL"):
        env.pop(key, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (home / "stack.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"fleet up did not come up; see {home}/logs")
        time.sleep(0.05)
    time.sleep(0.2)  # written, then filled: wait for the JSON to be whole
    return proc, json.loads((home / "stack.json").read_text())


async def eventually(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await asyncio.sleep(0.1)
    raise TimeoutError(what)


async def seed_user(
    user: str,
    http: httpx.AsyncClient,
    urls: dict[str, str],
    headers: dict[str, str],
    agent: Any,
    ui: Any,
) -> dict[str, Any]:
    """Everything `user` owns: ids, model and session names no one else uses."""
    own: dict[str, Any] = {"model": f"vendor/model-of-{user}", "session": f"session-of-{user}"}
    plan = {
        "task_id": f"task-{uuid.uuid4()}",
        "user_id": user,
        "session_id": own["session"],
        "original_task": f"{user}'s report",
        "subtasks": [
            {"subtask_id": "a", "description": "ask", "agent": "x", "requires_approval": True},
            {"subtask_id": "b", "description": "then", "agent": "x", "depends_on": ["a"]},
        ],
    }
    r = await http.post(f"{urls['planner']}/v1/plans", json=plan, headers=headers)
    assert r.is_success, f"{r.request.url}: {r.status_code} {r.text}"
    own["plan"] = r.json()["plan_id"]

    async def approval() -> list[dict[str, Any]]:
        found = await http.get(f"{urls['planner']}/v1/approvals", headers=headers)
        return list(found.json())

    own["approval"] = (await eventually(approval, f"{user}'s approval"))[0]["approval_id"]
    job = {"provider": "ollama", "model": own["model"], "task_type": "generate", "prompt": "hi"}
    job |= {"runs": 1, "max_tokens": 8, "concurrency": 1}
    r = await http.post(f"{urls['benchmark']}/v1/benchmarks/run", json=job, headers=headers)
    assert r.is_success, f"{r.request.url}: {r.status_code} {r.text}"
    own["job"] = r.json()["job_id"]
    common = {"user_id": user, "session_id": own["session"], "model_id": own["model"]}
    events: list[Event] = [
        SubtaskCompleted(
            plan_id=own["plan"],
            subtask_id=f"s{i}",
            prompt_tokens=10,
            completion_tokens=5,
            cost_usd="0.01",
            **common,
        )
        for i in range(3)
    ]
    events += [ModelRewarded(brains=2, **common), ModelDismissed(reason="slow", **common)]
    for event in events:
        js = agent if isinstance(event, SubtaskCompleted) else ui
        await js.publish(
            event.subject,
            event.model_dump_json().encode(),
            headers={"Nats-Msg-Id": str(event.event_id)},
        )

    async def counted() -> bool:
        r = await http.get(f"{urls['stats']}/v1/models/{own['model']}/stats", headers=headers)
        record = r.json() if r.status_code == 200 else {}
        return record.get("response_count") == 3 and record.get("dismissal_count") == 1

    await eventually(counted, f"{user}'s stats")
    return own


def holds(response: httpx.Response, *marks: str) -> bool:
    """Whether an answer carries any of the victim's marks (a 2xx only)."""
    return response.is_success and any(m in response.text for m in marks)


async def attack_http(
    tally: Tally,
    http: httpx.AsyncClient,
    urls: dict[str, str],
    headers: dict[str, str],
    victim: str,
    v: dict[str, Any],
    act: bool = True,
) -> None:
    p, b, s = urls["planner"], urls["benchmark"], urls["stats"]
    marks = (victim, v["plan"], v["approval"], v["job"], v["model"], v["session"])
    reads = {
        "planner": [
            f"{p}/v1/plans/{v['plan']}",
            f"{p}/v1/plans/{v['plan']}/metrics",
            f"{p}/v1/plans?user_id={victim}",
            f"{p}/v1/plans?session_id={v['session']}",
            f"{p}/v1/approvals",
            f"{p}/v1/approvals?user_id={victim}",
            f"{p}/v1/approvals/{v['approval']}",
        ],
        "benchmark": [
            f"{b}/v1/benchmarks/{v['job']}",
            f"{b}/v1/benchmarks",
            f"{b}/v1/benchmarks?user_id={victim}",
            f"{b}/v1/benchmarks?model={v['model']}",
            f"{b}/v1/benchmarks/models/{v['model']}/summary",
        ],
        "stats": [
            f"{s}/v1/models/{v['model']}/stats",
            f"{s}/v1/models/{v['model']}/stats?user_id={victim}",
            f"{s}/v1/stats/models",
            f"{s}/v1/stats/models?user_id={victim}",
            f"{s}/v1/sessions/{v['session']}/roster",
            f"{s}/v1/sessions/{v['session']}/roster?user_id={victim}",
            f"{s}/v1/spend",
            f"{s}/v1/spend?user_id={victim}",
            f"{s}/v1/costs",
            f"{s}/v1/costs?session_id={v['session']}&user_id={victim}",
            f"{s}/v1/leaderboard",
            f"{s}/v1/leaderboard?user_id={victim}",
            f"{s}/v1/leaderboard/global",
        ],
    }
    for service, paths in reads.items():
        for url in paths:
            r = await http.get(url, headers=headers)
            tally.check(f"{service} read", holds(r, *marks), f"GET {url} -> {r.status_code}")
    if not act:
        return
    actions = [
        ("planner", f"{p}/v1/plans/{v['plan']}/cancel", None),
        ("planner", f"{p}/v1/plans/{v['plan']}/subtasks/b/assign", {"agent": "mine"}),
        ("planner", f"{p}/v1/approvals/{v['approval']}", {"decision": "approved"}),
        ("benchmark", f"{b}/v1/benchmarks/{v['job']}/cancel", None),
    ]
    for service, url, body in actions:
        r = await http.post(url, json=body, headers=headers)
        tally.check(f"{service} action", r.is_success, f"POST {url} -> {r.status_code}")
    # acting in the victim's name
    forged = {
        "task_id": f"task-{uuid.uuid4()}",
        "user_id": victim,
        "session_id": "forged",
        "original_task": "forged",
        "subtasks": [{"subtask_id": "a", "description": "x", "agent": "x"}],
    }
    r = await http.post(f"{p}/v1/plans", json=forged, headers=headers)
    tally.check("planner action", r.is_success, f"POST a plan as {victim} -> {r.status_code}")


async def attack_sql(
    tally: Tally, database_url: str, attacker: str, victim: str, v: dict[str, Any]
) -> None:
    """As stats' runtime login, acting for `attacker` the way each request does."""
    conn = await asyncpg.connect(database_url, user=login_role("stats"))
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.columns"
            " WHERE table_schema = 'stats' AND column_name = 'user_id'"
        )
        for row in tables:
            table = row["table_name"]
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('role', $1, true),"
                    " set_config('request.jwt.claims', $2, true)",
                    user_role("stats"),
                    json.dumps({"sub": attacker, "role": "user"}),
                )
                try:
                    n = await conn.fetchval(
                        f'SELECT count(*) FROM stats."{table}" WHERE user_id = $1', victim
                    )
                except asyncpg.InsufficientPrivilegeError:
                    n = 0
            tally.check("stats SQL", bool(n), f"{table}: {n} rows of {victim}")
    finally:
        await conn.close()


async def attack_roles(tally: Tally, database_url: str) -> None:
    """Each service's login tries to become the superuser or another service."""
    for service in SERVICES:
        conn = await asyncpg.connect(database_url, user=login_role(service))
        try:
            for target in ["postgres", *(s for s in SERVICES if s != service)]:
                try:
                    async with conn.transaction():
                        await conn.execute(f'SET LOCAL ROLE "{target}"')
                    became = True
                except asyncpg.PostgresError:
                    became = False
                tally.check("PostgreSQL roles", became, f"{service} became {target}")
        finally:
            await conn.close()


async def run(stack: dict[str, Any], home: Path, users: list[str]) -> tuple[Tally, Tally]:
    urls: dict[str, str] = stack["services"]
    secret = development_secret(home)
    headers = {u: {"Authorization": f"Bearer {mint(secret, u)}"} for u in users}
    passwords = json.loads((home / "secrets" / "nats-users.json").read_text())
    server = "nats://" + stack["nats_url"].split("@")[-1].removeprefix("nats://")
    # the clients' own NATS users: an agent reports work, a UI rewards and dismisses
    agent_nc = await nats.connect(server, user="agent", password=passwords["agent"])
    ui_nc = await nats.connect(server, user="ui", password=passwords["ui"])
    tally, control = Tally(), Tally()
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            owned = {
                u: await seed_user(
                    u, http, urls, headers[u], agent_nc.jetstream(), ui_nc.jetstream()
                )
                for u in users
            }
            for attacker in users:
                for victim in users:
                    if attacker != victim:
                        await attack_http(
                            tally, http, urls, headers[attacker], victim, owned[victim]
                        )
                        await attack_sql(
                            tally, stack["database_url"], attacker, victim, owned[victim]
                        )
            await attack_roles(tally, stack["database_url"])
            # the control: through the same reads, owners find their own (the probe sees data
            # where there is some to see)
            for u in users:
                await attack_http(control, http, urls, headers[u], u, owned[u], act=False)
    finally:
        await agent_nc.close()
        await ui_nc.close()
    return tally, control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=4)
    args = parser.parse_args()
    users = [f"user{i}" for i in range(args.users)]
    tmp = Path(tempfile.mkdtemp(prefix="fleet-cross-user-"))
    proc, stack = start_stack(tmp / "fleet")
    try:
        tally, control = asyncio.run(run(stack, tmp / "fleet", users))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{len(users)} users, each against every other user's records\n")
    print(f"{'where':<20} {'tried':>6} {'found':>6}   control: the same reads by the owner")
    for where in sorted(tally.tried):
        owner = f"{control.found[where]}/{control.tried[where]}" if control.tried[where] else ""
        print(f"{where:<20} {tally.tried[where]:>6} {tally.found[where]:>6}   {owner}")
    total_tried, total_found = sum(tally.tried.values()), sum(tally.found.values())
    print(f"{'total':<20} {total_tried:>6} {total_found:>6}  (target: 0 found)")
    for example in tally.examples[:20]:
        print("  found:", example)


if __name__ == "__main__":
    main()
