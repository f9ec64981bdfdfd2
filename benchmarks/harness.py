"""What the benchmark programs share."""

from __future__ import annotations

import uuid

import asyncpg


async def fresh_database(admin_url: str) -> str:
    """Create an empty database next to the admin URL's and return its URL."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"
