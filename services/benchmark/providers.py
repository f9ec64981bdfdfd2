"""Streaming clients of the model servers, and when each of their clocks starts and stops.

Wire formats
------------
- Ollama: `POST /api/generate` (task `generate`) and `POST /api/chat` (task `chat`), an
  NDJSON stream whose last object has `done: true` with `eval_count`, `eval_duration`
  (nanoseconds) and `prompt_eval_count`.
- OpenRouter (`POST {base}/api/v1/chat/completions`) and any OpenAI-compatible server
  (`POST {base}/chat/completions`, base ending in `/v1` as OpenAI's clients take it), with
  `stream: true` and `stream_options.include_usage`, an SSE stream of `data: {...}` lines
  ending with a chunk that carries `usage` (OpenRouter adds `usage.cost` in USD) and
  `data: [DONE]`. SSE comments such as OpenRouter's `: OPENROUTER PROCESSING` are skipped.
  A server that puts a running `usage.completion_tokens` into every chunk (vLLM's
  continuous usage statistics) tells how many tokens each chunk held.

Token counts come from the server's usage, never from counting chunks. Anything that is
not the promised format (an HTML page, JSON of another shape, text that is not UTF-8, a
stream cut short, a body above `MAX_BODY_BYTES`) is a protocol error of that run, with a
reason that says what was wrong; it never escapes a run.

The clocks (all `time.perf_counter()`, one monotonic clock for the whole machine)
---------------------------------------------------------------------------------
    started     the run begins: before the connection is opened when the lane has none
                open, else right before the request's bytes are written
    sent        the request's bytes were handed to the kernel (`transport.write` returned)
    first_byte  the first bytes of the response (its status line) were read
    token_times for each chunk carrying output: when the read that completed its line
                arrived (the first token chunk is `token_times[0]`, the last token chunk
                `token_times[-1]`)
    finished    "done": the read that completed the line in which the server said the
                answer is complete (Ollama's `done: true`, SSE's `[DONE]`), else the line
                with the final usage

An arrival is the time the kernel received the last packet of the read (Linux's
`SO_TIMESTAMPNS` receive timestamp, taken as the packet comes off the network, and turned
into `perf_counter()` time by how long the bytes waited in the socket's queue; see
`StampedSocket`), so it does not depend on when the event loop gets round to the socket:
a loop busy with other streams, other jobs, a parse or a garbage collection delays the
read, not its stamp. Where the kernel gives no stamp (another OS, a loop that does not
read through the socket object) the stamp is taken in the protocol's `data_received`, the
first Python code that runs when the loop sees the socket readable. Only when the loop
lags by more than the gap between two chunks do they come in one read, and share the
later one's stamp. HTTP framing is undone in `data_received` by `httptools` (C), and every
line is split, decoded and parsed only once the response has ended, `PARSE_SLICE` lines at
a time with the loop given back in between (concurrent streams tend to end together), so
a busy stream costs the others a few microseconds per read. Requests are encoded once per
distinct prompt, before any clock starts. `benchmarks/benchmark_accuracy.py` measures the
remaining error against a server's own write times, beside a minimal raw-socket client.

Connections: each concurrent lane keeps one HTTP/1.1 connection open (keep-alive) and
reopens it when the server closes it. TLS is verified with certifi's roots. Proxies from
the environment are not used (a proxy would be part of what is measured).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import socket
import ssl
import struct
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, cast
from urllib.parse import urlsplit

import certifi
import httptools

from services.benchmark.domain import Stream, scrub

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024  # of one response; a runaway stream ends as a protocol error
ERROR_TEXT_CHARS = 300  # of an upstream error body kept in a run's error
PARSE_SLICE = 8  # lines parsed between chances for the loop to stamp other streams' reads


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
    output_tokens: int | None = None  # SSE: the running count when sent with every chunk
    cost_usd: Decimal | None = None
    eval_ns: int | None = None
    error: str | None = None


class ProtocolError(Exception):
    """A response that is not what the wire format promises."""


# --- reading the wire formats ------------------------------------------------------------


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _json_object(text: str) -> dict[str, Any]:
    if text.lstrip().startswith("<"):
        raise ProtocolError(f"an HTML page, not a stream: {text[:120]!r}")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {text[:120]!r}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"JSON that is not an object: {text[:120]!r}")
    return data


def _has_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def parse_ollama_line(line: str) -> Chunk | None:
    """One NDJSON line of Ollama's /api/generate or /api/chat."""
    if not line.strip():
        return None
    data = _json_object(line)
    if data.get("error"):
        return Chunk(error=_error_text(data["error"]))
    message = data.get("message", {})
    if not isinstance(message, dict):
        raise ProtocolError(f"JSON whose message is not an object: {line[:120]!r}")
    if not any(k in data for k in ("response", "message", "done")):
        raise ProtocolError(f"JSON without response, message or done: {line[:120]!r}")
    texts = (data.get("response"), data.get("thinking"), message.get("content"))
    chunk = Chunk(output=any(_has_text(t) for t in (*texts, message.get("thinking"))))
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
        if line.lstrip().startswith("<"):
            raise ProtocolError(f"an HTML page, not a stream: {line[:120]!r}")
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return Chunk(done=True)
    data = _json_object(payload)
    if data.get("error"):
        return Chunk(error=_error_text(data["error"]))
    choices = data.get("choices", [])
    usage = data.get("usage")
    if not isinstance(choices, list):
        raise ProtocolError(f"JSON whose choices is not a list: {payload[:120]!r}")
    if "choices" not in data and not isinstance(usage, dict):
        raise ProtocolError(f"JSON without choices or usage: {payload[:120]!r}")
    chunk = Chunk()
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            raise ProtocolError(f"JSON whose choices[{i}] is not an object: {payload[:120]!r}")
        delta = choice.get("delta") or {}
        if not isinstance(delta, dict):
            raise ProtocolError(f"JSON whose choices[{i}].delta is not an object")
        texts = (delta.get("content"), delta.get("reasoning_content"), delta.get("reasoning"))
        chunk.output |= any(_has_text(t) for t in texts)
    if isinstance(usage, dict):
        chunk.prompt_tokens = _int(usage.get("prompt_tokens"))
        chunk.output_tokens = _int(usage.get("completion_tokens"))
        cost = usage.get("cost")
        if isinstance(cost, int | float | str) and not isinstance(cost, bool):
            with contextlib.suppress(InvalidOperation):
                chunk.cost_usd = Decimal(str(cost))
                if not chunk.cost_usd.is_finite():
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


# --- one HTTP/1.1 connection -------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a URL's requests go."""

    tls: bool
    host: str
    port: int
    path: str

    @classmethod
    def of(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(tls, parts.hostname, parts.port or (443 if tls else 80), path)


class Reply:
    """One response as it arrives: status, headers, and body pieces with arrival stamps.
    Methods named `on_*` are httptools' callbacks."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_byte: float | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self.pieces: list[tuple[float, bytes]] = []
        self.size = 0
        self.keep_alive = False
        self._now = 0.0
        self._headers_done = False

    def feed(self, now: float, data: bytes) -> None:
        if self.ended.done():
            return
        if self.first_byte is None:
            self.first_byte = now
        self._now = now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(ProtocolError(f"not a valid HTTP/1.1 response: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_BODY_BYTES:
            self.fail(ProtocolError(f"a response larger than {MAX_BODY_BYTES} bytes"))
            return
        self.pieces.append((self._now, body))

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        if not self.ended.done():
            self.ended.set_result(None)

    def closed(self, exc: Exception | None) -> None:
        """The connection closed: the end of a body delimited by closing, else a cut."""
        if self.ended.done():
            return
        delimited = "content-length" in self.headers or "chunked" in self.headers.get(
            "transfer-encoding", ""
        )
        if self._headers_done and not delimited and exc is None:
            self.ended.set_result(None)
        else:
            reason = f" ({exc})" if exc else ""
            self.fail(
                ProtocolError(f"cut off: the server closed the connection mid-response{reason}")
            )

    def fail(self, exc: Exception) -> None:
        if not self.ended.done():
            self.ended.set_exception(exc)

    def lines(self) -> list[tuple[float, bytes]]:
        """The body's lines, each stamped with the arrival of the read that completed it."""
        out: list[tuple[float, bytes]] = []
        partial = bytearray()
        for at, data in self.pieces:
            if b"\n" not in data:
                partial += data
                continue
            first, *middle, rest = data.split(b"\n")
            partial += first
            out.append((at, bytes(partial)))
            out += [(at, line) for line in middle]
            partial = bytearray(rest)
        if partial:
            out.append((self.pieces[-1][0], bytes(partial)))
        return out

    def text(self) -> str:
        return b"".join(data for _, data in self.pieces).decode(errors="replace")


# Linux's SO_TIMESTAMPNS, which Python's socket module does not name (35 on every
# architecture but a few that nobody serves models from; a wrong value only fails setsockopt)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_MAX_QUEUED_S = 60.0  # a kernel stamp older than this (or in the future) is not believed


class StampedSocket(socket.socket):
    """A TCP socket that asks the kernel for each packet's receive time (`SO_TIMESTAMPNS`,
    the wall clock) and notes, at each read, when the read's last packet arrived on the
    `perf_counter()` clock: the read's time minus how long the bytes sat in the receive
    queue. So a stamp does not wait for the event loop to get round to the socket.

    asyncio's selector transports read with `recv` (plain) and `recv_into` (TLS), which
    are overridden here; a loop that reads the descriptor by other means (uvloop) leaves
    `arrival` None and the reader stamps the read itself."""

    __slots__ = ("arrival", "stamped")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrival: float | None = None
        self.stamped = False
        with contextlib.suppress(OSError):  # not Linux: the reader's own stamps
            self.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            self.stamped = True

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not self.stamped:
            return super().recv(bufsize, flags)
        data, ancillary, _, _ = self.recvmsg(bufsize, _ANCILLARY_SIZE, flags)
        self.arrival = _arrival(ancillary)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        if not self.stamped:
            return super().recv_into(buffer, nbytes, flags)
        view = memoryview(buffer)
        size, ancillary, _, _ = self.recvmsg_into(
            [view[:nbytes] if nbytes else view], _ANCILLARY_SIZE, flags
        )
        self.arrival = _arrival(ancillary)
        return size


def _arrival(ancillary: list[tuple[int, int, bytes]]) -> float:
    """When the packet a read ended with reached the kernel, on the `perf_counter()` clock;
    the read's own time when the kernel gave no (believable) stamp."""
    now, wall_ns = time.perf_counter(), time.time_ns()
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = cast(tuple[int, int], _TIMESPEC.unpack_from(data))
            queued = (wall_ns - seconds * 1_000_000_000 - nanoseconds) / 1e9
            if 0.0 <= queued < _MAX_QUEUED_S:
                return now - queued
    return now


async def stamped_connection(host: str, port: int) -> StampedSocket:
    """A connected, non-blocking `StampedSocket` to (host, port), trying each address."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = StampedSocket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error


class Wire(asyncio.Protocol):
    """The socket side of a lane: stamps every read with its arrival as the socket noted
    it (the kernel's receive time), else the moment the loop delivers it."""

    def __init__(self, sock: StampedSocket) -> None:
        self.sock = sock
        self.transport: asyncio.Transport | None = None
        self.reply: Reply | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, but have the same methods
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        arrival = self.sock.arrival
        if self.reply is not None:
            self.reply.feed(arrival if arrival is not None else time.perf_counter(), data)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends the reply

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.reply is not None:
            self.reply.closed(exc)


class Lane:
    """One kept-alive connection to one server, used by one run at a time."""

    def __init__(self, tls: Callable[[], ssl.SSLContext]) -> None:
        self._tls = tls
        self._wire: Wire | None = None
        self._to: Target | None = None

    async def exchange(self, target: Target, request: bytes, stream: Stream) -> Reply:
        """Send `request` and wait for the whole response. Stamps `stream.started` (before
        connecting when the lane has no open connection, else right before the write) and
        `stream.sent`."""
        wire = self._wire
        stream.started = time.perf_counter()
        if (
            wire is None
            or wire.transport is None
            or wire.transport.is_closing()
            or (self._to != target)
        ):
            self.close()
            loop = asyncio.get_running_loop()
            sock = await stamped_connection(target.host, target.port)
            try:
                _, wire = await loop.create_connection(
                    functools.partial(Wire, sock),
                    sock=sock,
                    ssl=self._tls() if target.tls else None,
                    server_hostname=target.host if target.tls else None,
                )
            except BaseException:
                sock.close()
                raise
            self._wire, self._to = wire, target
        assert wire.transport is not None
        reply = wire.reply = Reply()
        try:
            wire.transport.write(request)
            stream.sent = time.perf_counter()
            await reply.ended
        except BaseException:
            self.close()  # a half-read connection cannot carry the next run
            raise
        finally:
            wire.reply = None
        if not reply.keep_alive:
            self.close()
        return reply

    def close(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None and wire.transport is not None:
            wire.transport.abort()


def _head(target: Target, headers: dict[str, str], length: int) -> bytes:
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.host}" + ("" if target.port in (80, 443) else f":{target.port}"),
        "User-Agent: llm-fleet-benchmark",
        "Accept-Encoding: identity",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    head = "\r\n".join(lines) + "\r\n\r\n"
    if any(c in v for v in headers.values() for c in "\r\n"):
        raise ValueError("a header value holds a line break")
    return head.encode("latin-1")


# --- one run -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _encoded(endpoint: Endpoint, prompt: Prompt) -> tuple[Target, bytes]:
    """Where a request goes and its bytes; a job sends the same request run after run, so
    it is encoded once, not between the stamps of a run."""
    url, body, headers = request_of(endpoint, prompt)
    target = Target.of(url)
    payload = json.dumps(body).encode()
    return target, _head(target, headers, len(payload)) + payload


async def stream_once(lane: Lane, endpoint: Endpoint, prompt: Prompt, timeout_s: float) -> Stream:
    """Send one streamed request and time it; every failure is recorded in the returned
    stream (its error scrubbed of the endpoint's key and any authorization value), never
    raised. Cancelling the caller closes the connection."""
    url = request_of(endpoint, prompt)[0]
    secrets = [endpoint.api_key] if endpoint.api_key else []
    stream = Stream(started=time.perf_counter())
    try:
        target, request = _encoded(endpoint, prompt)
        async with asyncio.timeout(timeout_s):
            reply = await lane.exchange(target, request, stream)
        stream.first_byte = reply.first_byte
        await _read(endpoint, url, reply, stream)
    except TimeoutError:
        stream.error_kind = "timeout"
        stream.error = f"no complete answer within {timeout_s:g}s"
    except ProtocolError as exc:
        stream.error_kind = "protocol"
        stream.error = f"unexpected stream from {url}: {exc}"
    except (OSError, ValueError) as exc:  # refused, reset, TLS, DNS, a bad URL
        stream.error_kind = "connection"
        stream.error = f"cannot talk to {url}: {exc or type(exc).__name__}"
    except Exception as exc:  # whatever else a broken server provokes stays in this run
        trace = scrub(traceback.format_exc(), secrets)  # it may quote what the server sent
        log.error("run against %s failed unexpectedly: %s", scrub(url, secrets), trace)
        stream.error_kind = "protocol"
        stream.error = f"unexpected stream from {url}: {type(exc).__name__}: {exc}"
    if stream.error is not None:
        stream.error = scrub(stream.error, secrets)
    return stream


async def _read(endpoint: Endpoint, url: str, reply: Reply, stream: Stream) -> None:
    """Fill `stream` from a whole response, giving the loop back every `PARSE_SLICE` lines:
    concurrent streams tend to end together, and the reads of the others must not wait
    for this parse to be stamped."""
    if reply.status != 200:
        stream.error_kind = "http_status"
        stream.error = f"HTTP {reply.status} from {url}: {_body_error(reply.text())}"
        return
    kind = reply.headers.get("content-type", "")
    if "html" in kind:
        raise ProtocolError(f"an HTML page (Content-Type {kind}), not a stream")
    parse = parse_ollama_line if endpoint.provider == "ollama" else parse_sse_line
    last_line_at: float | None = None
    running_count = 0
    counts: list[int] = []  # tokens in each output chunk, while the server says so
    counted = True
    for number, (at, raw) in enumerate(reply.lines(), 1):
        if number % PARSE_SLICE == 0:
            await asyncio.sleep(0)
        try:
            line = raw.decode().rstrip("\r")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"line {number} is not UTF-8 text ({exc.reason})") from exc
        chunk = parse(line)
        if chunk is None:
            continue
        last_line_at = at
        if chunk.error is not None:
            stream.error_kind = "stream_error"
            stream.error = f"the server reported an error mid-stream: {chunk.error}"
            return
        if chunk.output:
            stream.token_times.append(at)
            if chunk.output_tokens is not None and not chunk.done and counted:
                counts.append(chunk.output_tokens - running_count)
            else:
                counted = False
        if chunk.output_tokens is not None:
            running_count = chunk.output_tokens
            stream.output_tokens = chunk.output_tokens
        if chunk.prompt_tokens is not None:
            stream.prompt_tokens = chunk.prompt_tokens
        if chunk.cost_usd is not None:
            stream.server_cost_usd = chunk.cost_usd
        if chunk.eval_ns is not None:
            stream.server_eval_ns = chunk.eval_ns
        if chunk.done:  # Ollama's done object and SSE's [DONE] are the last lines
            stream.finished = at
            break
    else:
        if stream.output_tokens is not None and last_line_at is not None:
            stream.finished = last_line_at  # usage came, only the [DONE] line is missing
        elif not reply.pieces:
            raise ProtocolError("an empty body")
        else:
            raise ProtocolError("the stream ended before the server said it was done")
    if counted and counts and all(n > 0 for n in counts):
        stream.chunk_tokens = counts


def _body_error(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text[:ERROR_TEXT_CHARS] or "(empty body)"
    if isinstance(data, dict) and data.get("error"):
        return _error_text(data["error"])[:ERROR_TEXT_CHARS]
    return text[:ERROR_TEXT_CHARS]


# --- runs of a job -----------------------------------------------------------------------

OnStream = Callable[[int, Stream], Awaitable[None]]


def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


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
    runs in the order of `prompts`. Cancelling it closes every connection."""
    width = max(1, min(concurrency, len(prompts)))
    streams: list[Stream | None] = [None] * len(prompts)
    pending = iter(range(len(prompts)))
    tls: list[ssl.SSLContext] = []  # built once, when first needed (~20 ms of CPU)

    def shared_tls() -> ssl.SSLContext:
        if not tls:
            tls.append(tls_context())
        return tls[0]

    lanes = [Lane(shared_tls) for _ in range(width)]

    async def warm_up(lane_index: int, lane: Lane) -> None:
        for _ in range(lane_index, warmup_runs, width):
            await stream_once(lane, endpoint, prompts[0], timeout_s)

    async def measured(lane: Lane) -> None:
        for index in pending:  # shared: each lane takes the next run
            stream = await stream_once(lane, endpoint, prompts[index], timeout_s)
            streams[index] = stream
            if on_stream is not None:
                await on_stream(index, stream)

    try:
        async with asyncio.TaskGroup() as warming:
            for i, lane in enumerate(lanes):
                warming.create_task(warm_up(i, lane))
        async with asyncio.TaskGroup() as running:
            for lane in lanes:
                running.create_task(measured(lane))
    finally:
        for lane in lanes:
            lane.close()
    return [s for s in streams if s is not None]
