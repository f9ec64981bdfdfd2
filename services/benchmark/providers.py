"""Streaming clients of the model servers, timed with `time.perf_counter()`.

- Ollama: `POST /api/generate` (task `generate`) and `POST /api/chat` (task `chat`), an
  NDJSON stream whose last object has `done: true` with `eval_count`, `eval_duration`
  (nanoseconds) and `prompt_eval_count`.
- OpenRouter (`POST {base}/api/v1/chat/completions`) and any OpenAI-compatible server
  (`POST {base}/chat/completions`, base ending in `/v1` as OpenAI's clients take it), with
  `stream: true` and `stream_options.include_usage`, an SSE stream of `data: {...}` lines
  ending with a chunk that carries `usage` (OpenRouter adds `usage.cost` in USD) and
  `data: [DONE]`. SSE comments such as OpenRouter's `: OPENROUTER PROCESSING` are skipped.

Each line is timestamped as it is read, before it is parsed. Token counts come from the
server's usage, never from counting chunks.

Concurrent runs go through lanes: one client with one kept-alive connection each. A single
pool of N connections costs O(N) work whenever a request starts or ends (httpcore walks
every connection and polls each idle one), which at 64 streams stalls the loop for
milliseconds and shows up as measurement error in the other streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import httpx

from services.benchmark.domain import Stream


@dataclass(frozen=True)
class Endpoint:
    """Where a provider's server is and how to talk to it."""

    provider: str  # ollama, openrouter, openai
    base_url: str
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Prompt:
    model: str
    task_type: str  # generate or chat
    prompt: str
    max_tokens: int | None = None


@dataclass
class Chunk:
    """What one line of a stream says."""

    output: bool = False  # carries generated text (or reasoning)
    done: bool = False  # the server says the answer is complete
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: Decimal | None = None
    eval_ns: int | None = None
    error: str | None = None


class ProtocolError(Exception):
    """A line that is not what the wire format promises."""


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _json_object(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"not a JSON object: {text[:200]!r}")
    return data


def parse_ollama_line(line: str) -> Chunk | None:
    """One NDJSON line of Ollama's /api/generate or /api/chat."""
    if not line.strip():
        return None
    data = _json_object(line)
    if data.get("error"):
        return Chunk(error=_error_text(data["error"]))
    message = data.get("message")
    if not isinstance(message, dict):
        message = {}
    texts = [data.get("response"), data.get("thinking")]
    texts += [message.get("content"), message.get("thinking")]
    chunk = Chunk(output=any(isinstance(t, str) and t for t in texts))
    if data.get("done") is True:
        chunk.done = True
        chunk.prompt_tokens = _int(data.get("prompt_eval_count"))
        chunk.output_tokens = _int(data.get("eval_count"))
        chunk.eval_ns = _int(data.get("eval_duration"))
    return chunk


def parse_sse_line(line: str) -> Chunk | None:
    """One line of an OpenAI-compatible SSE stream; None for what carries nothing
    (blank lines, comments, `event:`/`id:` fields)."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return Chunk(done=True)
    data = _json_object(payload)
    if data.get("error"):
        return Chunk(error=_error_text(data["error"]))
    chunk = Chunk()
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        texts = (delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning"))
        if any(isinstance(t, str) and t for t in texts):
            chunk.output = True
    usage = data.get("usage")
    if isinstance(usage, dict):
        chunk.prompt_tokens = _int(usage.get("prompt_tokens"))
        chunk.output_tokens = _int(usage.get("completion_tokens"))
        cost = usage.get("cost")
        if isinstance(cost, int | float | str) and not isinstance(cost, bool):
            try:
                chunk.cost_usd = Decimal(str(cost))
            except InvalidOperation:
                chunk.cost_usd = None
    return chunk


def request_of(endpoint: Endpoint, prompt: Prompt) -> tuple[str, dict[str, Any], dict[str, str]]:
    """URL, JSON body and headers of one streamed request."""
    base = endpoint.base_url.rstrip("/")
    headers = {"Accept": "application/x-ndjson, text/event-stream"}
    if endpoint.provider == "ollama":
        body: dict[str, Any] = {"model": prompt.model, "stream": True}
        if prompt.max_tokens is not None:
            body["options"] = {"num_predict": prompt.max_tokens}
        if prompt.task_type == "chat":
            body["messages"] = [{"role": "user", "content": prompt.prompt}]
            return f"{base}/api/chat", body, headers
        body["prompt"] = prompt.prompt
        return f"{base}/api/generate", body, headers
    body = {
        "model": prompt.model,
        "messages": [{"role": "user", "content": prompt.prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if prompt.max_tokens is not None:
        body["max_tokens"] = prompt.max_tokens
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    if endpoint.provider == "openrouter":
        body["usage"] = {"include": True}  # OpenRouter's own switch for usage with cost
        return f"{base}/api/v1/chat/completions", body, headers
    return f"{base}/chat/completions", body, headers


async def stream_once(
    client: httpx.AsyncClient, endpoint: Endpoint, prompt: Prompt, timeout_s: float
) -> Stream:
    """Send one streamed request and time it; failures are recorded, not raised."""
    url, body, headers = request_of(endpoint, prompt)
    parse = parse_ollama_line if endpoint.provider == "ollama" else parse_sse_line
    stream = Stream(started=time.perf_counter())
    try:
        async with asyncio.timeout(timeout_s):
            await _read(client, url, body, headers, parse, stream)
    except TimeoutError:
        stream.error_kind = "timeout"
        stream.error = f"no complete answer within {timeout_s:g}s"
    except httpx.ConnectError as exc:
        stream.error_kind = "connection"
        stream.error = f"cannot connect to {url}: {exc or type(exc).__name__}"
    except httpx.HTTPError as exc:
        stream.error_kind = "connection"
        stream.error = f"{type(exc).__name__} from {url}: {exc}"
    except ProtocolError as exc:
        stream.error_kind = "protocol"
        stream.error = f"unexpected stream from {url}: {exc}"
    return stream


async def _read(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    parse: Callable[[str], Chunk | None],
    stream: Stream,
) -> None:
    async with client.stream("POST", url, json=body, headers=headers) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            stream.error_kind = "http_status"
            stream.error = f"HTTP {response.status_code} from {url}: {_body_error(text)}"
            return
        last_line_at = None
        lines = response.aiter_lines()
        async for line in lines:
            last_line_at = time.perf_counter()
            chunk = parse(line)
            if chunk is None:
                continue
            if chunk.error is not None:
                stream.error_kind = "stream_error"
                stream.error = f"the server reported an error mid-stream: {chunk.error}"
                return
            if chunk.output:
                stream.token_times.append(last_line_at)
            if chunk.prompt_tokens is not None:
                stream.prompt_tokens = chunk.prompt_tokens
            if chunk.output_tokens is not None:
                stream.output_tokens = chunk.output_tokens
            if chunk.cost_usd is not None:
                stream.server_cost_usd = chunk.cost_usd
            if chunk.eval_ns is not None:
                stream.server_eval_ns = chunk.eval_ns
            if chunk.done:  # Ollama's done object and SSE's [DONE] are the last lines
                stream.finished = last_line_at
                # read the end of the body too: a connection closed half-read costs the
                # other streams a stall, and cannot be reused for the next run
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for _ in lines:
                            pass
                return
        if stream.output_tokens is not None and last_line_at is not None:
            stream.finished = last_line_at  # usage came, only the [DONE] line is missing
            return
        stream.error_kind = "protocol"
        stream.error = f"the stream from {url} ended before the server said it was done"


def _body_error(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:300] or "(empty body)"
    if isinstance(data, dict) and data.get("error"):
        return _error_text(data["error"])[:300]
    return text[:300]


OnStream = Callable[[int, Stream], Awaitable[None]]


async def stream_runs(
    endpoint: Endpoint,
    prompts: Sequence[Prompt],
    *,
    concurrency: int = 1,
    warmup_runs: int = 0,
    timeout_s: float = 120.0,
    on_stream: OnStream | None = None,
) -> list[Stream]:
    """One measured run per prompt, `concurrency` lanes at a time, after `warmup_runs` runs
    of the first prompt spread over the lanes (so their connections are open; those runs
    are not returned). `on_stream` sees each measured run as it ends. Returns the measured
    runs in the order of `prompts`."""
    width = max(1, min(concurrency, len(prompts)))
    streams: list[Stream | None] = [None] * len(prompts)
    pending = iter(range(len(prompts)))
    tls = httpx.create_ssl_context()  # one for all lanes: each costs ~20 ms of CPU to build
    async with contextlib.AsyncExitStack() as stack:
        lanes = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    verify=tls,
                    timeout=timeout_s,
                    limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                )
            )
            for _ in range(width)
        ]

        async def warm_up(lane_index: int, client: httpx.AsyncClient) -> None:
            for _ in range(lane_index, warmup_runs, width):
                await stream_once(client, endpoint, prompts[0], timeout_s)

        async with asyncio.TaskGroup() as warming:
            for i, client in enumerate(lanes):
                warming.create_task(warm_up(i, client))

        async def lane(client: httpx.AsyncClient) -> None:
            for index in pending:  # shared: each lane takes the next run
                stream = await stream_once(client, endpoint, prompts[index], timeout_s)
                streams[index] = stream
                if on_stream is not None:
                    await on_stream(index, stream)

        async with asyncio.TaskGroup() as running:  # one lane failing stops the others
            for client in lanes:
                running.create_task(lane(client))
    return [s for s in streams if s is not None]
