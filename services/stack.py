"""The whole system on one machine: embedded NATS and PostgreSQL (unless NATS_URL and
DATABASE_URL name real ones) and the five services as child processes.

State lives under FLEET_HOME (default `.fleet/`): server data, logs, and `stack.json`, which
`fleet status` reads. A lock file makes a second `fleet up` on the same home refuse to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from services.embedded import EmbeddedNats, EmbeddedPostgres, die_with_parent, free_port

SERVICES: dict[str, int] = {
    "sync": 8101,
    "benchmark": 8102,
    "planner": 8103,
    "guardian": 8104,
    "stats": 8105,
}


class AlreadyRunning(RuntimeError):
    pass


def fleet_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("FLEET_HOME", ".fleet")).resolve()


def port_or_free(preferred: int) -> int:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def spawn_service(name: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`fleet run <name>` as a child process that dies with its parent, output to `log`."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", name],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )


async def wait_until_up(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 60, path: str = "/health/ready"
) -> None:
    """Poll `url + path` until it answers 200; fail early when the process exits."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url + path)).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url}{path} did not answer 200 within {timeout:.0f}s")


def health(url: str, timeout: float = 1.0) -> str:
    try:
        r = httpx.get(f"{url}/health/ready", timeout=timeout)
    except httpx.HTTPError:
        return "down"
    return "ready" if r.status_code == 200 else "not ready"


@dataclass
class Stack:
    home: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    say: Callable[[str], None] = print
    nats: EmbeddedNats | None = None
    postgres: EmbeddedPostgres | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    _lock: IO[str] | None = None

    @property
    def state_file(self) -> Path:
        return self.home / "stack.json"

    def _acquire_lock(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        lock = (self.home / "up.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise AlreadyRunning(
                f"LLM Fleet is already running from {self.home} (see `fleet status`); "
                "stop it with Ctrl-C in its terminal before starting another"
            ) from None
        self._lock = lock

    def _step(self, what: str, action: Callable[[], object]) -> None:
        t0 = time.monotonic()
        self.say(f"  {what:<34} ...")
        action()
        self.say(f"  {what:<34} ok  {time.monotonic() - t0:5.2f}s")

    def up(self, timeout: float = 60) -> None:
        self._acquire_lock()
        t0 = time.monotonic()
        (self.home / "logs").mkdir(exist_ok=True)
        nats_url = self.env.get("NATS_URL")
        if not nats_url:
            nats = self.nats = EmbeddedNats(self.home / "nats", port=port_or_free(4222))
            self._step("NATS (JetStream, embedded)", nats.start)
            self.say(f"    {nats.url}")
            nats_url = nats.url
        database_url = self.env.get("DATABASE_URL")
        if not database_url:
            pg = self.postgres = EmbeddedPostgres(self.home / "postgres", port=port_or_free(5432))
            self._step("PostgreSQL (embedded)", pg.start)
            self.say(f"    {pg.url}")
            database_url = pg.url
        for name, port in SERVICES.items():
            port = int(self.env.get(f"{name.upper()}_HTTP_PORT") or port_or_free(port))
            self.urls[name] = f"http://127.0.0.1:{port}"
            child_env = {
                **self.env,
                "NATS_URL": nats_url,
                "DATABASE_URL": database_url,
                "HTTP_PORT": str(port),
                "HTTP_HOST": "127.0.0.1",
            }
            self.procs[name] = spawn_service(name, child_env, self.home / "logs" / f"{name}.log")
        self._step("services (migrate, connect, ready)", lambda: self._wait_ready(timeout))
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "nats_url": nats_url,
                    "database_url": database_url,
                    "services": self.urls,
                    "started_in_s": round(time.monotonic() - t0, 2),
                },
                indent=2,
            )
        )
        self.say(f"LLM Fleet is up in {time.monotonic() - t0:.1f}s\n")
        self.say(status_table(self.urls, nats_url, database_url))
        self.say(f"\nlogs: {self.home / 'logs'}   stop: Ctrl-C")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.urls)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                code = self.procs[name].poll()
                if code is not None:
                    raise RuntimeError(
                        f"{name} exited with code {code} while starting; "
                        f"see {self.home / 'logs' / (name + '.log')}"
                    )
                if health(self.urls[name], timeout=0.5) == "ready":
                    pending.discard(name)
                    self.say(f"    {name} ready")
            time.sleep(0.1)
        if pending:
            raise TimeoutError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}")

    def wait(self) -> None:
        """Run until interrupted (KeyboardInterrupt); report services that exit."""
        reported: set[str] = set()
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None and name not in reported:
                    reported.add(name)
                    self.say(
                        f"{name} exited with code {proc.returncode}; "
                        f"see {self.home / 'logs' / (name + '.log')}"
                    )
            time.sleep(0.2)

    def down(self) -> None:
        if self._lock is None:
            return  # never started: another stack holds the home
        self.say("stopping ...")
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.postgres:
            self.postgres.stop()
        if self.nats:
            self.nats.stop()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if self._lock:
            self._lock.close()
        self.say("stopped")


def status_table(urls: Mapping[str, str], nats_url: str, database_url: str) -> str:
    rows = [("service", "health", "url")]
    rows += [(name, health(url), url) for name, url in urls.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [
        "",
        f"NATS:       {nats_url}",
        f"PostgreSQL: {_hide_password(database_url)}",
        "API docs:   <url>/docs   metrics: <url>/metrics",
    ]
    return "\n".join(lines)


def _hide_password(url: str) -> str:
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}{':***' if ':' in creds else ''}@{host}"


def read_state(home: Path) -> dict[str, object] | None:
    try:
        state: dict[str, object] = json.loads((home / "stack.json").read_text())
    except FileNotFoundError:
        return None
    return state
