"""benchmark's measurement error against a fake model server's scripted truth, at 1 and at
64 concurrent streams, for Ollama's NDJSON and the OpenAI-compatible SSE format.

    python -m benchmarks.benchmark_accuracy [--rounds 3] [--chunks 100]

The fake server (services/benchmark/fakes.py) runs in this process and records with
`perf_counter()` when it wrote each output chunk; the client under test (the workers' own
`stream_runs`: one kept-alive connection per concurrent stream) records when it read it, on
the same clock. Errors:

    TTFT         |measured TTFT - (server's first write - client's request start)|
                 = |client's first output chunk - server's first write|
    inter-token  |measured gap - the server's gap between the same two writes|

Targets: |error| <= 1 ms at p50 and <= 5 ms at p99 for both; token counts exact (the
server's usage count, here 2 tokens per chunk, never the number of chunks). A round starts
all its streams at once (the 64 connections warmed up first) with the same script, so they
also end together: the worst case for the streams still reading. The figures are the median
over the rounds of each round's p50 and p99.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics

from services.benchmark.domain import percentile
from services.benchmark.providers import Endpoint, Prompt, stream_runs
from tests.fakes import FakeModelServer, Script

FORMATS = {"ollama NDJSON": ("ollama", ""), "OpenAI SSE": ("openai", "/v1")}


def prompt_of(body: dict[str, object]) -> str:
    if "prompt" in body:
        return str(body["prompt"])
    messages = body["messages"]
    assert isinstance(messages, list)
    return str(messages[0]["content"])


async def one_round(
    provider: str, prefix: str, streams: int, script: Script
) -> tuple[list[float], list[float], bool]:
    """`streams` streams at once; returns the |TTFT error|s and |gap error|s in ms, and
    whether every token count was exact."""
    prompts = [Prompt("m", "chat", f"req-{i}") for i in range(streams)]
    warmups = streams if streams > 1 else 0  # connections open before the measured runs
    async with FakeModelServer(script) as server:
        endpoint = Endpoint(provider, server.url + prefix)
        seen = await stream_runs(
            endpoint, prompts, concurrency=streams, warmup_runs=warmups, timeout_s=60
        )
    truth = {prompt_of(s.body): s for s in server.served}  # warm-ups come first: replaced
    ttft_errors: list[float] = []
    gap_errors: list[float] = []
    exact = True
    for p, stream in zip(prompts, seen, strict=True):
        assert stream.error is None, stream.error
        written = truth[p.prompt].written_at
        exact &= stream.output_tokens == script.completion_tokens
        exact &= len(stream.token_times) == len(written)
        ttft_errors.append(abs(stream.token_times[0] - written[0]) * 1000)
        for i in range(1, len(written)):
            measured = stream.token_times[i] - stream.token_times[i - 1]
            gap_errors.append(abs(measured - (written[i] - written[i - 1])) * 1000)
    return ttft_errors, gap_errors, exact


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=100, help="output chunks per stream")
    args = parser.parse_args()
    script = Script(
        ttft_s=0.05, gap_s=0.02, chunks=tuple((f" t{i}", 2) for i in range(args.chunks))
    )
    load = os.getloadavg()[0]
    print(
        f"benchmark measurement accuracy - Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs (load {load:.2f}), {args.rounds} rounds, streams of "
        f"{args.chunks} chunks x 2 tokens, TTFT {script.ttft_s * 1000:.0f} ms, "
        f"gap {script.gap_s * 1000:.0f} ms"
    )
    header = (
        f"{'format':<14} {'streams':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'ITL p50':>8} {'ITL p99':>8}  {'tokens':<6}  target (1 ms p50, 5 ms p99)"
    )
    print(header)
    print("-" * len(header))
    for name, (provider, prefix) in FORMATS.items():
        for streams in (1, 64):
            rounds = [
                await one_round(provider, prefix, streams, script) for _ in range(args.rounds)
            ]
            ttfts, gaps = [r[0] for r in rounds], [r[1] for r in rounds]
            ttft_p50, ttft_p99, itl_p50, itl_p99 = (
                statistics.median(percentile(errors, q) for errors in per_round)
                for per_round, q in ((ttfts, 50), (ttfts, 99), (gaps, 50), (gaps, 99))
            )
            exact = all(r[2] for r in rounds)
            met = max(ttft_p50, itl_p50) <= 1 and max(ttft_p99, itl_p99) <= 5
            print(
                f"{name:<14} {streams:>7} {ttft_p50:>6.3f} ms {ttft_p99:>6.3f} ms "
                f"{itl_p50:>5.3f} ms {itl_p99:>5.3f} ms  {'exact' if exact else 'WRONG':<6}"
                f"  {'met' if met else 'missed'}"
            )


if __name__ == "__main__":
    asyncio.run(main())
