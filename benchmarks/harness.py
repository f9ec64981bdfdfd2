"""What the benchmark programs share."""

from __future__ import annotations

import os
import resource
import secrets
import uuid
from pathlib import Path

import asyncpg

from services.runtime.auth import Role, mint


async def fresh_database(admin_url: str) -> str:
    """Create an empty database next to the admin URL's and return its URL."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


BENCH_JWT_SECRET = secrets.token_urlsafe(48)  # what the services a benchmark starts verify


def bench_headers(user: str = "bench", role: Role = "operator") -> dict[str, str]:
    """Headers of a request by `user` to a service a benchmark started."""
    return {"Authorization": f"Bearer {mint(BENCH_JWT_SECRET, user, role)}"}


def service_env(nats_url: str, database_url: str, port: int) -> dict[str, str]:
    """The environment of a service a benchmark starts: this one, plus where to connect,
    the HTTP port, the token secret, and logs at BENCH_LOG_LEVEL (WARNING unless set)."""
    return {
        **os.environ,
        "NATS_URL": nats_url,
        "DATABASE_URL": database_url,
        "HTTP_PORT": str(port),
        "AUTH_JWT_SECRET": BENCH_JWT_SECRET,
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process and of its children that have exited (for
    PostgreSQL: its backends), from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> tuple[float, float]:
    """CPU of this process, and of its children that have exited and been waited for."""
    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime
