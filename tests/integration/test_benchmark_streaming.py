"""benchmark's streaming clients against local servers speaking Ollama's NDJSON and the
OpenAI-compatible SSE formats, with scripted delays and chunks of several tokens: the
measurements must match the script, and token counts must be the server's."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from services.benchmark.domain import measure
from services.benchmark.providers import Endpoint, Prompt, stream_once
from tests.fakes import FakeModelServer, Script

TTFT_S, GAP_S = 0.12, 0.04
SLACK_MS = 50.0  # generous: the scheduler of a busy machine, not a timing target
# 5 chunks, 12 tokens: a count of chunks would be wrong
CHUNKS = (("The", 1), (" sky is", 2), (" blue because", 3), (" of Rayleigh", 3), (" light.", 3))
SCRIPT = Script(ttft_s=TTFT_S, gap_s=GAP_S, chunks=CHUNKS, prompt_tokens=11)

CASES = [
    ("ollama", "generate", ""),
    ("ollama", "chat", ""),
    ("openai", "chat", "/v1"),
    ("openrouter", "generate", ""),
]


@pytest.mark.parametrize(("provider", "task", "prefix"), CASES)
async def test_a_stream_is_measured_as_scripted(provider: str, task: str, prefix: str) -> None:
    async with FakeModelServer(SCRIPT) as server, httpx.AsyncClient() as client:
        endpoint = Endpoint(provider, server.url + prefix)
        stream = await stream_once(client, endpoint, Prompt("m", task, "why?", 64), timeout_s=5)
    run = measure(0, stream, None)
    assert run.ok, run.error
    served = server.served[0]
    assert served.body["model"] == "m"
    assert run.output_tokens == 12 and run.prompt_tokens == 11
    assert run.content_chunks == len(CHUNKS)
    assert run.ttft_ms is not None
    assert TTFT_S * 1000 <= run.ttft_ms <= TTFT_S * 1000 + SLACK_MS
    assert len(run.inter_token_ms) == len(CHUNKS) - 1
    for gap in run.inter_token_ms:
        assert abs(gap - GAP_S * 1000) <= SLACK_MS
    # each chunk seen after the server wrote it, and not long after
    for seen, written in zip(stream.token_times, served.written_at, strict=True):
        assert 0 <= (seen - written) * 1000 <= SLACK_MS
    assert run.e2e_ms is not None and run.tokens_per_s == pytest.approx(12 / (run.e2e_ms / 1000))
    if provider == "ollama":
        assert run.server_tokens_per_s is not None  # from eval_count / eval_duration


async def test_openrouters_reported_cost_is_taken_and_its_comments_skipped() -> None:
    script = Script(ttft_s=0.01, gap_s=0.005, cost_usd="0.00042", sse_comment=True)
    async with FakeModelServer(script) as server, httpx.AsyncClient() as client:
        endpoint = Endpoint("openrouter", server.url, "key")
        stream = await stream_once(client, endpoint, Prompt("a/b", "chat", "hi"), timeout_s=5)
    run = measure(0, stream, None)
    assert run.ok and run.cost_usd == Decimal("0.00042") and run.cost_source == "server"
    assert run.output_tokens == script.completion_tokens


async def test_failures_are_recorded_per_run_with_their_reason() -> None:
    prompt = Prompt("m", "generate", "hi")
    async with httpx.AsyncClient() as client:
        async with FakeModelServer(Script(status=404)) as server:
            missing = await stream_once(client, Endpoint("ollama", server.url), prompt, 5)
        async with FakeModelServer(Script(error_after=1, gap_s=0.001)) as server:
            broken = await stream_once(client, Endpoint("openai", server.url + "/v1"), prompt, 5)
        async with FakeModelServer(Script(ttft_s=0.01, stall_s=3)) as server:
            late = await stream_once(client, Endpoint("ollama", server.url), prompt, 0.3)
        refused = await stream_once(client, Endpoint("ollama", "http://127.0.0.1:9"), prompt, 5)
    assert (missing.error_kind, broken.error_kind) == ("http_status", "stream_error")
    assert (
        missing.error is not None and "HTTP 404" in missing.error and "not found" in missing.error
    )
    assert broken.error is not None and "upstream overloaded" in broken.error
    assert late.error_kind == "timeout" and late.error == "no complete answer within 0.3s"
    assert refused.error_kind == "connection"
    assert refused.error is not None and "cannot connect" in refused.error
