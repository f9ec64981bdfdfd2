"""The whole system started the way `make up` starts it, used the way a client uses it:
raw JSON over nats-py, answers over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from services.stack import SERVICES
from tests.conftest import bearer


class Fleet:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.proc: subprocess.Popen[str] | None = None
        self.output = ""

    def up(self, timeout: float = 90) -> dict[str, Any]:
        env = {**os.environ, "FLEET_HOME": str(self.home)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        state_file = self.home / "stack.json"
        while not state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.stop()
                pytest.fail(f"fleet up did not come up:\n{out}")
            time.sleep(0.1)
        state: dict[str, Any] = json.loads(state_file.read_text())
        return state

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        self.output += out
        return out


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet")
    yield f
    if f.proc is not None and f.proc.poll() is None:
        f.stop()


def count(stats_url: str, model: str, user: str) -> int:
    r = httpx.get(f"{stats_url}/v1/models/{model}/stats", headers=bearer(user, "user"), timeout=5)
    if r.status_code == 404:
        return 0
    r.raise_for_status()
    n: int = r.json()["response_count"]
    return n


def wait_count(stats_url: str, model: str, user: str, expected: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    n = count(stats_url, model, user)
    while n < expected and time.monotonic() < deadline:
        time.sleep(0.1)
        n = count(stats_url, model, user)
    return n


async def _publish_raw(nats_url: str, payloads: list[dict[str, Any]]) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for payload in payloads:
        await js.publish("subtask.completed", json.dumps(payload).encode())
    await nc.drain()


def publish_raw(nats_url: str, payloads: list[dict[str, Any]]) -> None:
    asyncio.run(_publish_raw(nats_url, payloads))


def test_make_up_counts_a_raw_json_subtask_completed_exactly_once_and_keeps_it(
    fleet: Fleet,
) -> None:
    state = fleet.up()
    services: dict[str, str] = state["services"]
    assert set(services) == set(SERVICES)
    for name, url in services.items():
        ready = httpx.get(f"{url}/health/ready", timeout=5)
        assert ready.status_code == 200, (name, ready.text)
        assert ready.json()["checks"] == {"nats": "ok", "postgres": "ok", "delivery": "ok"}
        assert httpx.get(f"{url}/metrics", timeout=5).status_code == 200

    user, model = f"user-{uuid.uuid4().hex[:8]}", "openai/gpt-4o-mini"
    first = {
        "event_id": str(uuid.uuid4()),
        "occurred_at": "2026-04-02T12:00:00Z",
        "plan_id": "plan-1",
        "subtask_id": "st-1",
        "model_id": model,
        "user_id": user,
        "session_id": "session-1",
        "prompt_tokens": 120,
        "completion_tokens": 80,
        "a_field_from_the_future": True,
    }
    # the client retries the same event (no Nats-Msg-Id): it must still count once
    publish_raw(state["nats_url"], [first, first])
    assert wait_count(services["stats"], model, user, 1) == 1
    second = {**first, "event_id": str(uuid.uuid4()), "subtask_id": "st-2"}
    publish_raw(state["nats_url"], [second])
    assert wait_count(services["stats"], model, user, 2) == 2
    time.sleep(0.5)  # a late duplicate would show up here
    assert count(services["stats"], model, user) == 2

    status = subprocess.run(
        [sys.executable, "-m", "services.cli", "status"],
        text=True,
        capture_output=True,
        env={**os.environ, "FLEET_HOME": str(fleet.home)},
    )
    assert status.returncode == 0
    assert sum("ready" in line for line in status.stdout.splitlines()) == len(SERVICES)

    second_up = subprocess.run(
        [sys.executable, "-m", "services.cli", "up"],
        text=True,
        capture_output=True,
        timeout=30,
        env={**os.environ, "FLEET_HOME": str(fleet.home)},
    )
    assert second_up.returncode == 1
    assert "already running" in second_up.stderr

    output = fleet.stop()
    assert fleet.proc is not None and fleet.proc.returncode == 0, output
    assert "stopped" in output

    state = fleet.up()  # data survives a restart
    assert count(state["services"]["stats"], model, user) == 2
