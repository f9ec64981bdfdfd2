"""Under a real `fleet up`, guardian heals: a SIGKILLed service is seen down, restarted and
ready again; a hung (SIGSTOPped) one is killed and restarted; the incidents say so."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from tests.conftest import Infra, bearer


class Fleet:
    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.env = {**os.environ, "FLEET_HOME": str(home), **env}
        self.proc: subprocess.Popen[str] | None = None

    def up(self, timeout: float = 120) -> dict[str, Any]:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up"],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + timeout
        state_file = self.home / "stack.json"
        while not state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"fleet up did not come up:\n{self.stop()}")
            time.sleep(0.1)
        state: dict[str, Any] = json.loads(state_file.read_text())
        return state

    def pid_of(self, service: str) -> int:
        """The service's current process: a child of this fleet up, never anyone else's."""
        assert self.proc is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid), "-f", f"services.cli run {service}$"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(out) == 1, out
        return int(out[0])

    def stop(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def fleet(tmp_path: Path, infra: Infra, database_url: str) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet", {"NATS_URL": infra.nats_url, "DATABASE_URL": database_url})
    yield f
    if f.proc is not None and f.proc.poll() is None:
        f.stop()


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _stored(nats_url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SERVICES")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            if info.state.messages == 0:
                break
            msg = await js.get_msg("SERVICES", seq)
            found.append({"subject": msg.subject, **json.loads(msg.data or b"{}")})
        return found
    finally:
        await nc.close()


def stored(nats_url: str, subject: str, since: datetime) -> list[dict[str, Any]]:
    """guardian's events as JetStream keeps them (other tests' too: those since `since`)."""
    return [
        e
        for e in asyncio.run(_stored(nats_url))
        if e["subject"] == subject and datetime.fromisoformat(e["occurred_at"]) >= since
    ]


def test_guardian_restarts_a_killed_and_a_hung_service_under_fleet_up(fleet: Fleet) -> None:
    since = datetime.now(UTC)
    state = fleet.up()
    urls: dict[str, str] = state["services"]
    guardian = urls["guardian"]
    wait_for(
        lambda: httpx.get(f"{guardian}/api/health", timeout=2).json()["status"] == "healthy",
        60,
        "a healthy fleet",
    )

    killed = fleet.pid_of("stats")
    os.kill(killed, signal.SIGKILL)
    nats_url = state["nats_url"]
    down = wait_for(lambda: stored(nats_url, "service.down", since), 10, "service.down")[0]
    assert down["service"] == "stats" and down["reason"] == "process exited with code -9"
    wait_for(lambda: ready(urls["stats"]) and fleet.pid_of("stats") != killed, 60, "stats again")
    recovered = wait_for(lambda: stored(nats_url, "service.recovered", since), 30, "recovered")[0]
    assert recovered["incident_id"] == down["incident_id"] and recovered["restarts"] == 1
    health = httpx.get(f"{guardian}/api/health", timeout=2).json()
    assert health["services"]["stats"]["restarts"] == 1

    hung = fleet.pid_of("sync")
    os.kill(hung, signal.SIGSTOP)
    try:
        wait_for(
            lambda: any(e["service"] == "sync" for e in stored(nats_url, "service.down", since)),
            10,
            "sync seen down",
        )
        wait_for(lambda: ready(urls["sync"]) and fleet.pid_of("sync") != hung, 60, "sync again")
    finally:
        if os.path.exists(f"/proc/{hung}"):
            os.kill(hung, signal.SIGKILL)
    incidents = httpx.get(
        f"{guardian}/api/guardian/incidents", headers=bearer("ops"), timeout=2
    ).json()
    assert {i["service"] for i in incidents} == {"stats", "sync"}
    assert all(i["restarts"] == 1 for i in incidents)
    output = fleet.stop()
    assert "stats restarted at guardian's request" in output
    assert "sync restarted at guardian's request" in output
