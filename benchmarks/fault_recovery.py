"""How long stats takes to consume again after each fault, and what was lost or counted twice.

    python -m benchmarks.fault_recovery [--rounds 3] [--rate 200]

NATS and PostgreSQL of its own (the embedded ones, in a temporary folder) and stats as a
process of its own (`fleet run stats`, CONSUMER_MAX_DELIVER=2, CONSUMER_ACK_WAIT_S=1). A
publisher sends `subtask.completed` at a steady rate for the whole run, retrying each event
with its `Nats-Msg-Id` until JetStream stores it, as a careful client does. Each fault is
injected `--rounds` times. "Recovery" runs from the moment the fault ends (the server is
back, the garbage or the deletion is done, the killed service is started again) to the
first event counted in PostgreSQL after it; counts are read from stats' tables, not from
the service. At the end every stored event must be counted once: lost = stored - counted,
twice = responses - distinct events applied.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import nats
from nats.js import JetStreamContext

from benchmarks.harness import fresh_database, service_env
from contracts.events import SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from services.runtime.messaging import ensure_streams
from services.stack import spawn_service, wait_until_up

CONSUMER = "stats-subtask-completed"
PG_OUTAGE_S = 6.0  # three times the retry budget (2 tries x 1 s ack wait)


class Bench:
    def __init__(self, base: Path, rate: float) -> None:
        self.nats = EmbeddedNats(base / "nats")
        self.pg = EmbeddedPostgres(base / "pg")
        self.base = base
        self.rate = rate
        self.stored = 0
        self.database_url = ""
        self.stats: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.flowing = asyncio.Event()  # cleared: the publisher waits
        self.flowing.set()

    async def start(self) -> None:
        self.nats.start()
        self.pg.start()
        self.database_url = await fresh_database(self.pg.url)

        async def quiet(_: Exception) -> None:  # the faults are on purpose
            pass

        self.nc = await nats.connect(
            self.nats.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, error_cb=quiet
        )
        self.js: JetStreamContext = self.nc.jetstream()
        await ensure_streams(self.js)
        await self.start_stats()

    async def start_stats(self) -> None:
        env = service_env(self.nats.url, self.database_url, self.port)
        env |= {"CONSUMER_MAX_DELIVER": "2", "CONSUMER_ACK_WAIT_S": "1"}
        self.stats = spawn_service("stats", env, self.base / "stats.log")
        await wait_until_up(f"http://127.0.0.1:{self.port}", self.stats, path="/health/live")

    async def publisher(self, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            await self.flowing.wait()
            event = SubtaskCompleted(
                plan_id="p",
                subtask_id=f"s{i}",
                model_id=f"m{i % 5}",
                user_id="u",
                session_id="bench",
                prompt_tokens=1,
            )
            while True:
                try:
                    await self.js.publish(
                        event.subject,
                        event.model_dump_json().encode(),
                        headers={"Nats-Msg-Id": str(event.event_id)},
                        timeout=1,
                    )
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            self.stored += 1
            i += 1
            await asyncio.sleep(1 / self.rate)

    async def counts(self) -> tuple[int, int]:
        """(responses, distinct events applied); (-1, -1) while PostgreSQL is away."""
        try:
            conn = await asyncpg.connect(self.database_url, timeout=1)
        except (OSError, asyncpg.PostgresError):
            return -1, -1
        try:
            row = await conn.fetchrow(
                "SELECT (SELECT coalesce(sum(response_count), 0) FROM stats.model_statistics),"
                " (SELECT count(*) FROM stats.inbox)"
            )
            assert row is not None
            return int(row[0]), int(row[1])
        except asyncpg.PostgresError:
            return -1, -1
        finally:
            await conn.close()

    async def recovery_after(self, fault_ended: float) -> float:
        """Seconds from `fault_ended` until the applied count grows past what it was then."""
        before = -1
        while before < 0:
            before = (await self.counts())[1]
        while True:
            now = (await self.counts())[1]
            if now > before:
                return time.monotonic() - fault_ended
            await asyncio.sleep(0.01)

    # --- the faults: each returns when the fault is over -------------------------------

    async def garbage_at_the_size_limit(self) -> None:
        await self.js.publish("subtask.completed", b"\x00garbage" * (self.nc.max_payload // 8 - 20))

    async def nats_killed(self) -> None:
        self.nats.kill()
        await asyncio.sleep(1.0)
        self.nats.start()

    async def postgres_outage(self) -> None:
        self.pg.stop()
        await asyncio.sleep(PG_OUTAGE_S)
        self.pg.start()

    async def consumer_deleted(self) -> None:
        await self.js.delete_consumer("PLANS", CONSUMER)

    async def stream_deleted(self) -> None:
        # what a stream held and stats had not applied yet is lost with it: delete it
        # when stats has applied everything; the publisher retries until it is back
        self.flowing.clear()
        await self.drain()
        await self.js.delete_stream("PLANS")
        self.flowing.set()

    async def stats_killed(self) -> None:
        assert self.stats is not None
        self.stats.kill()
        self.stats.wait()
        await self.start_stats()

    async def drain(self, timeout: float = 120) -> tuple[int, int]:
        deadline = time.monotonic() + timeout
        while True:
            counts = await self.counts()
            if counts[1] >= self.stored or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()
        if self.stats and self.stats.poll() is None:
            self.stats.terminate()
            self.stats.wait(30)
        self.pg.stop()
        self.nats.stop()


async def main(rounds: int, rate: float) -> None:
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(f"stats alone, events published at {rate:.0f}/s, {rounds} rounds per fault\n")
    with tempfile.TemporaryDirectory(prefix="fleet-faults-") as tmp:
        bench = Bench(Path(tmp), rate)
        await bench.start()
        stop = asyncio.Event()
        publishing = asyncio.create_task(bench.publisher(stop))
        faults: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("garbage message at the size limit", bench.garbage_at_the_size_limit),
            ("NATS killed, back after 1 s", bench.nats_killed),
            (f"PostgreSQL away {PG_OUTAGE_S:.0f} s (3x the retry budget)", bench.postgres_outage),
            ("durable consumer deleted", bench.consumer_deleted),
            ("stream deleted", bench.stream_deleted),
            ("stats SIGKILLed and started again", bench.stats_killed),
        ]
        results: dict[str, list[float]] = {name: [] for name, _ in faults}
        try:
            await asyncio.sleep(1.0)  # a steady flow first
            for _ in range(rounds):
                for name, inject in faults:
                    await inject()
                    results[name].append(await bench.recovery_after(time.monotonic()))
            stop.set()
            await publishing
            responses, applied = await bench.drain()
        finally:
            stop.set()
            await bench.stop()
    print("| fault | recovery median | max |")
    print("|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} s | {max(values):.2f} s |")
    print(
        f"\nstored {bench.stored}, applied {applied}, lost {bench.stored - applied},"
        f" counted twice {responses - applied}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0)
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.rate))
