"""The floor of `benchmarks.planner_dag`: a stand-in for planner that keeps the DAG in
memory, stores nothing and validates nothing. It pulls `subtask.completed` the way the
services do (a durable consumer, the same continuous pull, an ack per message) and sends
each subtask that became ready as `subtask.ready` to JetStream (PubAcks awaited in the
background), then `plan.completed`. What the benchmark measures against it is the cost of
the transport, the fake agent pool and one Python process on this machine: no planner that
persists its decisions can be faster.

    python -m benchmarks.dag_forwarder NATS_URL DAG_JSON   (started by planner_dag)
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.catalog import PLANS_STREAM
from contracts.events import PlanCompleted, SubtaskCompleted, SubtaskReady, utcnow
from services.planner import domain
from services.runtime.pull import Puller

PLAN_ID = "dag-forwarder"


async def forward(nats_url: str, subtasks: list[dict[str, Any]]) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    durable = "dag-forwarder"

    async def declare() -> None:
        await js.add_consumer(
            PLANS_STREAM.name,
            ConsumerConfig(
                durable_name=durable,
                filter_subject=SubtaskCompleted.subject,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.NEW,
                ack_wait=30,
                max_ack_pending=1000,
            ),
        )

    await declare()
    agent = {s["subtask_id"]: s["agent"] for s in subtasks}
    deps = {s["subtask_id"]: s["depends_on"] for s in subtasks}
    dependents = domain.dependents_of(deps)
    waiting = {sid: len(d) for sid, d in deps.items()}  # dependencies not completed yet
    acks: list[asyncio.Future[Any]] = []

    async def dispatch(ids: list[str]) -> None:
        for sid in ids:
            event_id = str(uuid.uuid4())
            ready = {
                "event_id": event_id,
                "occurred_at": utcnow().isoformat(),
                "plan_id": PLAN_ID,
                "subtask_id": sid,
                "user_id": "bench",
                "session_id": "bench",
                "agent": agent[sid],
                "attempt": 1,
                "description": "",
            }
            acks.append(
                await js.publish_async(
                    SubtaskReady.subject,
                    json.dumps(ready).encode(),
                    headers={"Nats-Msg-Id": event_id},
                    stream=PLANS_STREAM.name,
                )
            )

    puller = Puller(nc, PLANS_STREAM.name, durable, batch_size=200, recreate=declare)
    await puller.start()
    done: set[str] = set()
    await dispatch(domain.roots(deps))
    while len(done) < len(subtasks):
        msgs = await puller.next_batch()
        ready = []
        for msg in msgs:
            sid = json.loads(msg.data)["subtask_id"]
            if sid in done:
                continue
            done.add(sid)
            for dependent in dependents.get(sid, ()):
                waiting[dependent] -= 1
                if waiting[dependent] == 0:
                    ready.append(dependent)
        await dispatch(ready)
        for msg in msgs:
            await msg.ack()
        if len(acks) >= 1000:
            await asyncio.gather(*acks)
            acks.clear()
    await asyncio.gather(*acks)
    completed = PlanCompleted(
        plan_id=PLAN_ID, task_id=PLAN_ID, user_id="bench", session_id="bench", status="completed"
    )
    await js.publish(PlanCompleted.subject, completed.model_dump_json().encode())
    await puller.stop()
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(forward(sys.argv[1], json.loads(Path(sys.argv[2]).read_text())))
