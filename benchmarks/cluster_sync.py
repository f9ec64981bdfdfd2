"""What JetStream's sync policy costs: publish throughput and latency with the server's
default (an fsync every two minutes) against `sync_interval: always` (every write on disk
before its PubAck), on one server (R1) and on a three-node cluster on this host (R3).

Two loads, as the services publish: windows of 500 `publish_async` awaiting their PubAcks
(the outbox relay's batches) and one `publish` at a time (a lone event published at commit).

    .venv/bin/python -m benchmarks.cluster_sync [--rounds 3] [--messages 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import nats

from contracts.catalog import stream_for
from contracts.events import SubtaskCompleted
from services.embedded import EmbeddedNats, EmbeddedNatsCluster
from services.runtime.messaging import ensure_streams

PAYLOAD = b'{"event_id":"00000000-0000-0000-0000-000000000000","subject":"x","n":1}' * 3
SUBJECT = SubtaskCompleted.subject
STREAM = stream_for(SUBJECT).name


async def measure(url: str, replicas: int, messages: int) -> tuple[float, float]:
    """(messages/s in windows of 500, p50 ms of one publish at a time)."""
    nc = await nats.connect(url.split(","))
    js = nc.jetstream(publish_async_max_pending=1000)
    try:
        await ensure_streams(js, replicas=replicas)
        await js.purge_stream(STREAM)
        t0 = time.perf_counter()
        for start in range(0, messages, 500):
            acks = [
                await js.publish_async(
                    SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": str(uuid.uuid4())}, stream=STREAM
                )
                for _ in range(min(500, messages - start))
            ]
            await asyncio.gather(*acks)
        rate = messages / (time.perf_counter() - t0)
        latencies = []
        for _ in range(300):
            t = time.perf_counter()
            await js.publish(SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": str(uuid.uuid4())})
            latencies.append((time.perf_counter() - t) * 1000)
        return rate, statistics.median(latencies)
    finally:
        await nc.close()


async def one_setup(replicas: int, sync: str | None, messages: int) -> tuple[float, float]:
    home = Path(tempfile.mkdtemp(prefix="fleet-cluster-sync-"))
    server: EmbeddedNats | EmbeddedNatsCluster
    try:
        if replicas == 1:
            server = EmbeddedNats(home / "nats", sync_interval=sync)
        else:
            server = EmbeddedNatsCluster(home, size=replicas, sync_interval=sync)
        server.start()
        try:
            return await measure(server.url, replicas, messages)
        finally:
            server.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    setups = [(1, None), (1, "always"), (3, None), (3, "always")]
    results: dict[tuple[int, str | None], list[tuple[float, float]]] = {s: [] for s in setups}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    for _ in range(args.rounds):
        for replicas, sync in setups:  # interleaved, so the machine's load hits all alike
            results[(replicas, sync)].append(await one_setup(replicas, sync, args.messages))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print("| stream | sync | msg/s (windows of 500) | vs default | p50 ms of one publish |")
    print("|---|---|---|---|---|")
    for replicas, sync in setups:
        rate = statistics.median(r for r, _ in results[(replicas, sync)])
        base = statistics.median(r for r, _ in results[(replicas, None)])
        p50 = statistics.median(p for _, p in results[(replicas, sync)])
        print(
            f"| R{replicas} | {sync or 'default (2 min)'} | {rate:,.0f} | {rate / base:.2f}x"
            f" | {p50:.2f} |"
        )


if __name__ == "__main__":
    asyncio.run(main())
