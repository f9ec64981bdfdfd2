"""benchmark's streaming clients against local servers speaking Ollama's NDJSON and the
OpenAI-compatible SSE formats, with scripted delays and chunks of several tokens: the
measurements must match the script, and token counts must be the server's."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal

import pytest

from services.benchmark.domain import measure
from services.benchmark.providers import (
    Endpoint,
    Lane,
    Prompt,
    stream_once,
    stream_runs,
    tls_context,
)
from tests.conftest import eventually
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
    async with FakeModelServer(SCRIPT) as server:
        endpoint = Endpoint(provider, server.url + prefix)
        stream = await stream_once(lane(), endpoint, Prompt("m", task, "why?", 64), timeout_s=5)
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
    # each chunk seen after the server wrote it, and not long after; the clocks in order
    for seen, written in zip(stream.token_times, served.written_at, strict=True):
        assert 0 <= (seen - written) * 1000 <= SLACK_MS
    assert stream.sent is not None and stream.first_byte is not None
    # the request reaches the server's socket within the client's write, so the server's
    # (kernel) stamp of its arrival may come before the client's stamp of the write's return
    assert stream.started <= served.received_at <= stream.first_byte
    assert stream.started <= stream.sent <= stream.first_byte
    assert stream.first_byte <= stream.token_times[0] and stream.finished is not None
    assert stream.token_times[-1] <= stream.finished
    assert run.itl_per_token_ms == []  # the server did not say how many tokens each chunk held
    assert run.e2e_ms is not None and run.tokens_per_s == pytest.approx(12 / (run.e2e_ms / 1000))
    if provider == "ollama":
        assert run.server_tokens_per_s is not None  # from eval_count / eval_duration


async def test_openrouters_reported_cost_is_taken_and_its_comments_skipped() -> None:
    script = Script(ttft_s=0.01, gap_s=0.005, cost_usd="0.00042", sse_comment=True)
    async with FakeModelServer(script) as server:
        endpoint = Endpoint("openrouter", server.url, "key")
        stream = await stream_once(lane(), endpoint, Prompt("a/b", "chat", "hi"), timeout_s=5)
    run = measure(0, stream, None)
    assert run.ok and run.cost_usd == Decimal("0.00042") and run.cost_source == "server"
    assert run.output_tokens == script.completion_tokens


async def test_failures_are_recorded_per_run_with_their_reason() -> None:
    prompt = Prompt("m", "generate", "hi")
    async with FakeModelServer(Script(status=404)) as server:
        missing = await stream_once(lane(), Endpoint("ollama", server.url), prompt, 5)
    async with FakeModelServer(Script(error_after=1, gap_s=0.001)) as server:
        broken = await stream_once(lane(), Endpoint("openai", server.url + "/v1"), prompt, 5)
    async with FakeModelServer(Script(ttft_s=0.01, stall_s=3)) as server:
        late = await stream_once(lane(), Endpoint("ollama", server.url), prompt, 0.3)
    refused = await stream_once(lane(), Endpoint("ollama", "http://127.0.0.1:9"), prompt, 5)
    assert (missing.error_kind, broken.error_kind) == ("http_status", "stream_error")
    assert (
        missing.error is not None and "HTTP 404" in missing.error and "not found" in missing.error
    )
    assert broken.error is not None and "upstream overloaded" in broken.error
    assert late.error_kind == "timeout" and late.error == "no complete answer within 0.3s"
    assert refused.error_kind == "connection"
    assert refused.error is not None and "cannot talk to" in refused.error


def lane() -> Lane:
    return Lane(tls_context)


class ServerThread:
    """A fake model server on an event loop of its own, in a thread: it keeps writing on
    schedule while the client's loop is blocked."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ready = threading.Event()
        self.server: FakeModelServer | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        async with FakeModelServer(self.script) as self.server:
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> FakeModelServer:
        self.thread.start()
        assert self.ready.wait(10)
        assert self.server is not None
        return self.server

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


async def test_a_chunk_is_stamped_when_it_arrived_not_when_a_busy_loop_read_it() -> None:
    # chunks at 0.1, 0.4 and 0.7 s; the client's loop is blocked from 0.25 to 0.55 s, over
    # the second chunk's arrival only
    script = Script(ttft_s=0.1, gap_s=0.3, chunks=(("a", 1), ("b", 1), ("c", 1)))

    async def block_the_loop() -> None:
        await asyncio.sleep(0.25)
        time.sleep(0.3)  # noqa: ASYNC251 - a loop kept from reading is what is tested

    with ServerThread(script) as server:
        endpoint = Endpoint("ollama", server.url)
        blocker = asyncio.create_task(block_the_loop())
        stream = await stream_once(lane(), endpoint, Prompt("m", "chat", "p"), timeout_s=5)
        await blocker
    written = server.served[0].written_at
    late_ms = [(seen - at) * 1000 for seen, at in zip(stream.token_times, written, strict=True)]
    # read up to 150 ms after it arrived, stamped as it arrived (the kernel's receive time)
    assert all(0 <= late < 50 for late in late_ms), late_ms


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("provider", "script", "reason"),
    [
        (
            "openai",
            Script(raw=b"<html><body>Bad gateway</body></html>", raw_content_type="text/html"),
            "an HTML page",
        ),
        (
            "ollama",
            Script(raw=b"<!DOCTYPE html>\n<html></html>\n", raw_content_type="text/plain"),
            "an HTML page",
        ),
        (
            "openai",
            Script(raw=b'data: {"choices":[1,"x"]}\n\n', raw_content_type="text/event-stream"),
            "choices[0] is not an object",
        ),
        (
            "ollama",
            Script(raw=b'{"choices": 3}\n', raw_content_type="application/x-ndjson"),
            "without response, message or done",
        ),
        (
            "ollama",
            Script(
                raw=b'{"response": "caf\xe9", "done": false}\n',
                raw_content_type="application/x-ndjson",
            ),
            "line 1 is not UTF-8",
        ),
        (
            "openai",
            Script(
                raw=b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n',
                raw_content_type="text/event-stream",
            ),
            "ended before the server said it was done",
        ),
        ("ollama", Script(raw=b"", raw_content_type="application/x-ndjson"), "an empty body"),
    ],
)
async def test_a_malformed_stream_is_a_protocol_error_of_its_run(
    provider: str, script: Script, reason: str
) -> None:
    prefix = "/v1" if provider == "openai" else ""
    async with FakeModelServer(script) as server:
        endpoint = Endpoint(provider, server.url + prefix)
        streams = await stream_runs(
            endpoint, [Prompt("m", "chat", "hi")] * 3, concurrency=2, timeout_s=5
        )
    assert len(streams) == 3  # every run ended, none took the others down
    for stream in streams:
        run = measure(0, stream, None)
        assert not run.ok and run.error_kind == "protocol"
        assert run.error is not None and reason in run.error, run.error


async def test_a_stream_cut_off_mid_body_is_a_failed_run() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        line = b'{"response": "a", "done": false}\n'
        writer.write(CHUNKED_HEAD + b"%x\r\n%s\r\n" % (len(line), line))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(cut, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        stream = await stream_once(
            lane(), Endpoint("ollama", f"http://127.0.0.1:{port}"), Prompt("m", "generate", "x"), 5
        )
    assert stream.error_kind == "protocol"
    assert stream.error is not None and "cut off" in stream.error


async def test_an_upstream_that_echoes_the_key_has_it_scrubbed() -> None:
    key = "sk-or-v1-" + "7f3a9c" * 8
    async with FakeModelServer(Script(status=401, echo_authorization=True)) as server:
        stream = await stream_once(
            lane(), Endpoint("openrouter", server.url, key), Prompt("a/b", "chat", "hi"), 5
        )
        assert server.served  # the key was sent, and came back
    assert stream.error_kind == "http_status" and stream.error is not None
    assert "HTTP 401" in stream.error and "invalid credentials" in stream.error
    assert key[:16] not in stream.error and "[redacted]" in stream.error


async def test_chunks_that_say_their_tokens_give_itl_per_token() -> None:
    script = Script(ttft_s=0.02, gap_s=0.03, chunks=(("a b c", 3),) * 4, chunk_usage=True)
    async with FakeModelServer(script) as server:
        stream = await stream_once(
            lane(), Endpoint("openai", server.url + "/v1"), Prompt("m", "chat", "x"), 5
        )
    run = measure(0, stream, None)
    assert run.ok and stream.chunk_tokens == [3, 3, 3, 3]
    assert len(run.itl_per_token_ms) == 9
    for per_token, per_chunk in zip(run.itl_per_token_ms[::3], run.inter_token_ms, strict=True):
        assert per_token == pytest.approx(per_chunk / 3)


async def test_cancelling_runs_closes_their_streams() -> None:
    slow = Script(ttft_s=0.01, gap_s=0.2, chunks=(("a", 1),) * 50)
    async with FakeModelServer(slow) as server:
        endpoint = Endpoint("ollama", server.url)
        runs = asyncio.create_task(
            stream_runs(endpoint, [Prompt("m", "generate", "x")] * 2, concurrency=2, timeout_s=30)
        )

        async def streaming() -> bool:
            return server.in_flight == 2

        await eventually(streaming, what="both streams open")
        runs.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runs
        stopped = time.perf_counter()

        async def closed() -> bool:
            return server.in_flight == 0

        await eventually(closed, what="the server saw both connections close")
    assert time.perf_counter() - stopped < 5  # not the 10 s the streams would have taken
