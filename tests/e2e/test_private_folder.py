"""A newcomer's private folder keeps its permissions: the embedded PostgreSQL started from
a path inside a mode-700 directory (as `make up` and `make test` start it, as root too)
works, keeps its data over a restart, and leaves the mode of every directory above
FLEET_HOME as it was."""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
from pathlib import Path

import asyncpg

from services.embedded import EmbeddedPostgres


def modes_up_from(path: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in [path, *path.parents]}


async def query(url: str, *statements: str) -> object:
    """The first value of the last statement."""
    conn = await asyncpg.connect(url)
    try:
        for sql in statements[:-1]:
            await conn.execute(sql)
        return await conn.fetchval(statements[-1])
    finally:
        await conn.close()


def test_embedded_postgres_inside_a_mode_700_folder_works_and_changes_no_mode() -> None:
    private = Path(tempfile.mkdtemp(prefix="fleet-private-"))  # mode 700, like `mktemp -d`
    home = private / "clone" / ".fleet"
    home.mkdir(parents=True)
    home.chmod(0o700)
    before = modes_up_from(home)
    assert before[private] == 0o700
    pg = EmbeddedPostgres(home / "postgres")
    try:
        pg.start()
        asyncio.run(query(pg.url, "CREATE TABLE kept (x int)", "INSERT INTO kept VALUES (42)"))
        pg.stop()
        pg.start()  # the same cluster again: its data survived
        assert asyncio.run(query(pg.url, "SELECT x FROM kept")) == 42
        assert modes_up_from(home) == before
        if os.geteuid() == 0:  # the server runs as another user: it reached its data anyway
            owner = asyncio.run(query(pg.url, "SELECT current_setting('data_directory')"))
            assert not str(owner).startswith(str(private))
    finally:
        pg.remove()
    assert modes_up_from(home) == before
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
