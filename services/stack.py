"""The whole system on one machine: embedded NATS and PostgreSQL (unless NATS_URL and
DATABASE_URL name real ones) and the five services as child processes.

State lives under FLEET_HOME (default `.fleet/`): server data, logs, and `stack.json`, which
`fleet status` reads. A lock file makes a second `fleet up` on the same home refuse to start.

`fleet up` owns the processes and guardian decides when one needs a restart, so `fleet up`
serves guardian a narrow channel (`RestartChannel`): HTTP on a Unix socket under FLEET_HOME
(mode 0600), each request with a bearer token from FLEET_HOME/supervisor.token (0600, new at
every start). It tells of process exits the moment they happen and restarts one service on
request, refusing requests of a stale leader epoch. If guardian itself exits, `fleet up`
starts it again.

Scaled out (`fleet up --replicas K --nats-cluster N`): N nats-server processes form one
JetStream cluster (streams on min(N, 3) of them, fsync before every PubAck) and each
service runs K times (`stats`, `stats-2`, ...; ports 8105, 8205, ...). Guardian watches and
restarts the first instance of each service as above; `fleet up` starts the others again
itself when they exit (after 1 s, doubling to 30 s while one keeps failing).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hmac
import json
import os
import queue
import secrets
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx

from services.embedded import (
    EmbeddedNats,
    EmbeddedNatsCluster,
    EmbeddedPostgres,
    die_with_parent,
    free_port,
)
from services.runtime import nats_users

SERVICES: dict[str, int] = {
    "sync": 8101,
    "benchmark": 8102,
    "planner": 8103,
    "guardian": 8104,
    "stats": 8105,
}
REPLICA_PORT_STEP = 100  # replica r of a service listens on its port + 100 * (r - 1)
CLUSTER_SYNC_INTERVAL = "always"  # see the README: a PubAck means the write is on disk


def instance_name(service: str, replica: int) -> str:
    """`stats` for the first replica (what guardian watches), `stats-2`, ... for the others."""
    return service if replica == 1 else f"{service}-{replica}"


def service_of(instance: str) -> str:
    return instance.rsplit("-", 1)[0] if instance not in SERVICES else instance


T = TypeVar("T")


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


class StaleEpochError(RuntimeError):
    pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class RestartChannel:
    """fleet up's side of guardian's restart channel (see the module's docstring).

    GET  /exits?after=N&wait=S          exits after sequence N, waiting up to S seconds for
                                         one; also which processes are alive now
    POST /restart {"service", "epoch", "reason"}
                                         kill the service's process if alive, start it again
    """

    def __init__(
        self,
        home: Path,
        restart: Callable[[str], int],
        alive: Callable[[], dict[str, bool]],
    ) -> None:
        self.token_file = home / "supervisor.token"
        self.token = secrets.token_urlsafe(32)
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.token)
        # AF_UNIX paths hold at most 107 bytes: a deep home gets a private temporary folder
        path = home / "supervisor.sock"
        self._tmp: Path | None = None
        if len(os.fsencode(path)) > 100:
            self._tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
            path = self._tmp / "supervisor.sock"
        path.unlink(missing_ok=True)
        self.socket = path
        self._restart = restart
        self._alive = alive
        self._changed = threading.Condition()
        self._exits: list[dict[str, Any]] = []
        self._seq = 0
        self.highest_epoch = 0
        self.restarts: list[dict[str, Any]] = []  # every restart done, for tests and logs
        old_umask = os.umask(0o177)  # the socket is created 0600
        try:
            self._server = _UnixHTTPServer(str(path), self._handler())
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def exited(self, service: str, pid: int, code: int | None) -> None:
        with self._changed:
            self._seq += 1
            self._exits.append(
                {
                    "seq": self._seq,
                    "service": service,
                    "pid": pid,
                    "code": code,
                    "at": datetime.now(UTC).isoformat(),
                }
            )
            del self._exits[:-1000]
            self._changed.notify_all()

    def exits_after(self, after: int, wait: float) -> dict[str, Any]:
        deadline = time.monotonic() + min(max(wait, 0.0), 30.0)
        with self._changed:
            while self._seq <= after and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            found = [e for e in self._exits if e["seq"] > after]
            last = self._seq
        return {"exits": found, "last": last, "alive": self._alive()}

    def restart(self, service: str, epoch: int, reason: str) -> int:
        with self._changed:
            if epoch < self.highest_epoch:
                raise StaleEpochError(f"epoch {epoch} is older than {self.highest_epoch}: refused")
            self.highest_epoch = epoch
        pid = self._restart(service)
        self.restarts.append(
            {"service": service, "epoch": epoch, "reason": reason, "pid": pid, "at": time.time()}
        )
        return pid

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        channel = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # a Unix socket has no client address; fleet up prints what matters

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                sent = self.headers.get("Authorization", "")
                if hmac.compare_digest(sent.encode(), f"Bearer {channel.token}".encode()):
                    return True
                self._answer(401, {"error": "unauthorized"})
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                url = urlsplit(self.path)
                if url.path != "/exits":
                    self._answer(404, {"error": "not_found"})
                    return
                query = parse_qs(url.query)
                try:
                    after = int(query.get("after", ["0"])[0])
                    wait = float(query.get("wait", ["0"])[0])
                except ValueError:
                    self._answer(400, {"error": "after and wait are numbers"})
                    return
                self._answer(200, channel.exits_after(after, wait))

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                if self.path != "/restart":
                    self._answer(404, {"error": "not_found"})
                    return
                try:
                    length = min(int(self.headers.get("Content-Length", "0")), 65536)
                    body = json.loads(self.rfile.read(length) or b"{}")
                    service, epoch = str(body["service"]), int(body["epoch"])
                    reason = str(body.get("reason", ""))[:1000]
                except (ValueError, KeyError, TypeError):
                    self._answer(400, {"error": "expected {service, epoch, reason}"})
                    return
                try:
                    pid = channel.restart(service, epoch, reason)
                except StaleEpochError as exc:
                    self._answer(409, {"error": "stale_epoch", "detail": str(exc)})
                except KeyError:
                    self._answer(404, {"error": "unknown_service", "service": service[:100]})
                except OSError as exc:
                    self._answer(500, {"error": "start_failed", "detail": str(exc)})
                else:
                    self._answer(200, {"service": service, "pid": pid})

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.socket.unlink(missing_ok=True)
        self.token_file.unlink(missing_ok=True)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


@dataclass
class Stack:
    home: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    say: Callable[[str], None] = print
    replicas: int = 1  # processes of each service
    nats_cluster: int = 1  # nats-server processes (more than 1: one JetStream cluster)
    known_ports: bool = True  # the services' usual ports when free; False: any free ports
    nats: EmbeddedNats | EmbeddedNatsCluster | None = None
    postgres: EmbeddedPostgres | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    channel: RestartChannel | None = None
    _calls: queue.Queue[tuple[Callable[[], Any], Future[Any]]] = field(default_factory=queue.Queue)
    _envs: dict[str, dict[str, str]] = field(default_factory=dict)
    _started_at: dict[str, float] = field(default_factory=dict)  # instance -> monotonic
    _replica_delay: dict[str, float] = field(default_factory=dict)  # its next restart's wait
    _replica_due: dict[str, float] = field(default_factory=dict)  # when to start it again
    _procs_lock: threading.Lock = field(default_factory=threading.Lock)
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

    def up(self, timeout: float | None = None) -> None:
        """Start everything; `timeout` for the services to be ready (60 s per replica)."""
        timeout = timeout or 60.0 * self.replicas
        if self.replicas < 1 or self.nats_cluster < 1:
            raise ValueError("--replicas and --nats-cluster are 1 or more")
        self._acquire_lock()
        t0 = time.monotonic()
        (self.home / "logs").mkdir(exist_ok=True)
        nats_url = self.env.get("NATS_URL")
        nats_passwords: dict[str, str] = {}
        if not nats_url:
            # users with the event catalog's permissions, one per service and per client kind
            users = nats_users.fleet_users()
            nats_passwords = nats_users.passwords(self.home, users)
            config = self.home / "nats.conf"
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(nats_users.server_config(users, nats_passwords))
            nats: EmbeddedNats | EmbeddedNatsCluster
            if self.nats_cluster == 1:
                nats = EmbeddedNats(self.home / "nats", port=port_or_free(4222), config=config)
                self._step("NATS (JetStream, embedded)", nats.start)
            else:
                nats = EmbeddedNatsCluster(
                    self.home / "nats-cluster",
                    size=self.nats_cluster,
                    config=config,
                    sync_interval=CLUSTER_SYNC_INTERVAL,
                )
                self._step(f"NATS (JetStream cluster of {self.nats_cluster})", nats.start)
            self.nats = nats
            self.say(f"    {nats.url}")
            # what this stack's own tools (and fleet status) use: the admin user
            nats_url = nats.url.replace("nats://", f"nats://admin:{nats_passwords['admin']}@")
        database_url = self.env.get("DATABASE_URL")
        if not database_url:
            pg = self.postgres = EmbeddedPostgres(
                self.home / "postgres", port=port_or_free(5432) if self.known_ports else 0
            )
            self._step("PostgreSQL (embedded)", pg.start)
            self.say(f"    {pg.url}")
            database_url = pg.url
        self.channel = RestartChannel(self.home, self.restart, self.alive)
        for replica in range(1, self.replicas + 1):
            for name, port in SERVICES.items():
                instance = instance_name(name, replica)
                chosen = self.env.get(f"{name.upper()}_HTTP_PORT") if replica == 1 else None
                usual = port + REPLICA_PORT_STEP * (replica - 1)
                port = int(chosen or (port_or_free(usual) if self.known_ports else free_port()))
                self.urls[instance] = f"http://127.0.0.1:{port}"
                child_env = {
                    **self.env,
                    "NATS_URL": nats_url,
                    "DATABASE_URL": database_url,
                    "HTTP_PORT": str(port),
                    "HTTP_HOST": "127.0.0.1",
                    "FLEET_HOME": str(self.home),
                }
                if self.nats_cluster > 1 and not self.env.get("NATS_URL"):
                    child_env["NATS_STREAM_REPLICAS"] = str(min(self.nats_cluster, 3))
                if nats_passwords:
                    child_env |= {
                        "NATS_URL": nats.url,
                        "NATS_USER": name,
                        "NATS_PASSWORD": nats_passwords[name],
                    }
                if name == "guardian":
                    child_env["GUARDIAN_SUPERVISOR_SOCKET"] = str(self.channel.socket)
                    child_env["GUARDIAN_SUPERVISOR_TOKEN_FILE"] = str(self.channel.token_file)
                self._envs[instance] = child_env
                self.procs[instance] = self._spawn(instance)
        self._step("services (migrate, connect, ready)", lambda: self._wait_ready(timeout))
        self.state_file.touch(mode=0o600)  # it holds the admin's NATS URL
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "nats_url": nats_url,
                    "database_url": database_url,
                    "services": self.urls,
                    "supervisor_socket": str(self.channel.socket),
                    "started_in_s": round(time.monotonic() - t0, 2),
                },
                indent=2,
            )
        )
        self.say(f"LLM Fleet is up in {time.monotonic() - t0:.1f}s\n")
        self.say(status_table(self.urls, nats_url, database_url))
        self.say(
            "\nevery API takes a bearer token: .venv/bin/fleet token --user alice"
            " (add --operator for sync runs and guardian's controls)"
        )
        if nats_passwords:
            self.say(
                "NATS clients connect as user agent, ui or admin; passwords in "
                f"{self.home / nats_users.USERS_FILE}"
            )
        self.say("guardian restarts what dies")
        self.say(f"logs: {self.home / 'logs'}   reports: {self.home / 'reports'}   stop: Ctrl-C")

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

    def _spawn(self, instance: str) -> subprocess.Popen[bytes]:
        self._started_at[instance] = time.monotonic()
        log = self.home / "logs" / f"{instance}.log"
        return spawn_service(service_of(instance), self._envs[instance], log)

    def restart(self, name: str, timeout: float = 30) -> int:
        """Kill the service's process if it is alive (hung or not) and start it again; the
        killed process's exit is not reported as news. Guardian is not restarted this way.
        The main thread does it: a child's parent-death signal fires when the *thread* that
        started it ends, and the channel answers each request on a thread of its own."""
        if name not in self.procs or name == "guardian":
            raise KeyError(name)
        pid: int = self.on_owner_thread(lambda: self._restart_now(name)).result(timeout)
        return pid

    def on_owner_thread(self, action: Callable[[], T]) -> Future[T]:
        """Have the thread running `wait()` (the one that started the processes) do
        `action`: what it starts then dies with that thread, not with a passing one."""
        done: Future[T] = Future()
        self._calls.put((action, done))
        return done

    def _restart_now(self, name: str) -> int:
        with self._procs_lock:
            old = self.procs[name]
            if old.poll() is None:
                old.kill()  # SIGKILL also ends a stopped (SIGSTOP) process
                old.wait()
            self.procs[name] = proc = self._spawn(name)
        self.say(f"{name} restarted at guardian's request (pid {proc.pid})")
        return proc.pid

    def alive(self) -> dict[str, bool]:
        """Whether each service's first instance (the one guardian watches) is alive."""
        with self._procs_lock:
            return {name: self.procs[name].poll() is None for name in SERVICES}

    def wait(self, poll_s: float = 0.02, until: threading.Event | None = None) -> None:
        """Run until interrupted (KeyboardInterrupt) or `until` is set: tell guardian of
        every process that exits (polled often: guardian's detection time starts here),
        start guardian again when it exits itself (1 s, doubling to 30 s while it keeps
        failing), and do what `on_owner_thread` was asked."""
        reported: set[int] = set()
        guardian_delay, guardian_due = 1.0, 0.0
        while until is None or not until.is_set():
            while not self._calls.empty():
                action, done = self._calls.get_nowait()
                try:
                    done.set_result(action())
                except Exception as exc:
                    done.set_exception(exc)
            with self._procs_lock:
                ended = [
                    (name, proc)
                    for name, proc in self.procs.items()
                    if proc.poll() is not None and proc.pid not in reported
                ]
                reported.update(proc.pid for _, proc in ended)
            for name, proc in ended:
                if self.channel is not None and name in SERVICES:
                    self.channel.exited(name, proc.pid, proc.returncode)
                self.say(
                    f"{name} exited with code {proc.returncode}; "
                    f"see {self.home / 'logs' / (name + '.log')}"
                )
                if name == "guardian":
                    guardian_due = time.monotonic() + guardian_delay
                    guardian_delay = min(guardian_delay * 2, 30.0)
                elif name not in SERVICES:  # a further replica: fleet up's own to restart
                    self._schedule_replica(name)
            self._start_replicas_due()
            guardian = self.procs.get("guardian")
            if guardian and guardian.poll() is not None and time.monotonic() >= guardian_due:
                with self._procs_lock:
                    self.procs["guardian"] = self._spawn("guardian")
                self.say("guardian started again")
            time.sleep(poll_s)

    def _schedule_replica(self, name: str) -> None:
        """Start a further replica again after 1 s, doubling to 30 s while it keeps exiting
        within a minute of its start."""
        now = time.monotonic()
        ran_long = now - self._started_at.get(name, now) > 60
        delay = 1.0 if ran_long else min(self._replica_delay.get(name, 0.5) * 2, 30.0)
        self._replica_delay[name] = delay
        self._replica_due[name] = now + delay

    def _start_replicas_due(self) -> None:
        now = time.monotonic()
        for name, due in list(self._replica_due.items()):
            if now >= due:
                del self._replica_due[name]
                with self._procs_lock:
                    self.procs[name] = proc = self._spawn(name)
                self.say(f"{name} started again (pid {proc.pid})")

    def down(self) -> None:
        if self._lock is None:
            return  # never started: another stack holds the home
        self.say("stopping ...")
        if self.channel is not None:
            self.channel.close()
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
        f"NATS:       {_hide_password(nats_url)}",
        f"PostgreSQL: {_hide_password(database_url)}",
        "API docs:   <url>/docs   metrics: <url>/metrics",
    ]
    return "\n".join(lines)


def _hide_password(url: str) -> str:
    if "," in url:  # a cluster's servers
        return ",".join(_hide_password(one) for one in url.split(","))
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
