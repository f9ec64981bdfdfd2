"""`fleet declare` (the deployment's fleet-declare Job): against a nats-server with the
deployment's users, as admin, it creates the streams and every service's durable consumer as
the service itself declares it, and running it again is harmless."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from contracts.catalog import stream_for
from services.embedded import free_port
from services.stack import SERVICES

ROOT = Path(__file__).resolve().parents[2]
USERS_CONF = ROOT / "deploy" / "nats" / "users.conf"


@pytest.fixture
def secured_nats(tmp_path: Path) -> Iterator[str]:
    """A JetStream nats-server with deploy/nats/users.conf, every password "pw"."""
    port = free_port()
    variables = re.findall(r"\$(\w+_NATS_PASSWORD)", USERS_CONF.read_text())
    env = {**os.environ, **{v: "pw" for v in variables}}
    binary = str(Path(sys.executable).parent / "nats-server")
    server = subprocess.Popen(
        [binary, "-js", "-sd", str(tmp_path), "-p", str(port), "-c", str(USERS_CONF)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr
        for line in server.stderr:  # nats-server logs to stderr; it ends on exit
            if "Server is ready" in line:
                break
        else:
            pytest.fail("nats-server did not start")
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def declare(url: str, user: str = "admin") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": url, "NATS_USER": user, "NATS_PASSWORD": "pw"}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "declare"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_declare_creates_every_durable_consumer_once(secured_nats: str) -> None:
    expected = {
        (stream_for(c.event.subject).name, c.name, c.event.subject)
        for name in SERVICES
        for c in importlib.import_module(f"services.{name}.app").build().consumers
    }
    assert len(expected) >= 10
    first = declare(secured_nats)
    assert first.returncode == 0, first.stderr
    again = declare(secured_nats)
    assert again.returncode == 0, again.stderr

    nc = await nats.connect(secured_nats, user="admin", password="pw")
    try:
        js = nc.jetstream()
        found = set()
        for stream in {s for s, _, _ in expected}:
            for info in await js.consumers_info(stream):
                found.add((stream, info.name, info.config.filter_subject))
                assert info.config.ack_wait == 30.0  # CONSUMER_ACK_WAIT_S's default
        assert found == expected
    finally:
        await nc.close()
