"""A local fake model server speaking the real wire formats, with scripted timing, for the
tests and `benchmarks/benchmark_accuracy.py`.

One raw asyncio HTTP/1.1 server (keep-alive, chunked transfer encoding) answers:

- `POST /api/generate` and `POST /api/chat` as Ollama does: NDJSON lines, the last with
  `done: true`, `prompt_eval_count`, `eval_count` and `eval_duration` (nanoseconds);
- `POST .../chat/completions` as OpenAI-compatible servers do: SSE `data: {...}` events,
  a role-only first chunk, content chunks, a finish chunk, a usage chunk (with `cost` when
  scripted, as OpenRouter sends) when `stream_options.include_usage` is set, `data: [DONE]`.

A `Script` says when each chunk goes out and how many tokens it holds; the server records
(`perf_counter()`: CLOCK_MONOTONIC, one clock for every process of the machine) when each
request's last bytes reached its socket (the kernel's receive time) and when it handed each
chunk to the kernel, which is the truth a measurement is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Script:
    """How the server answers one request."""

    ttft_s: float = 0.05  # from reading the request to writing the first output chunk
    chunks: Sequence[tuple[str, int]] = (("Hello", 1), (" world, how", 3), (" are you?", 3))
    gap_s: float = 0.02  # between output chunks
    prompt_tokens: int = 9
    cost_usd: str | None = None  # usage.cost, as OpenRouter reports it
    status: int = 200  # anything else: an error answer, no stream
    error_after: int | None = None  # an error object in the stream after this many chunks
    stall_s: float = 0.0  # before the final lines (to provoke a client timeout)
    sse_comment: bool = False  # ": OPENROUTER PROCESSING" before the first chunk
    chunk_usage: bool = False  # SSE: a running usage in every chunk (vLLM's continuous stats)
    raw: bytes | None = None  # answer 200 with exactly this body instead (a broken server)
    raw_content_type: str = "application/json"
    echo_authorization: bool = False  # an error answer quotes the request's Authorization

    @property
    def completion_tokens(self) -> int:
        return sum(tokens for _, tokens in self.chunks)


@dataclass
class Served:
    """What the server did for one request; times are `perf_counter()` seconds."""

    path: str
    body: dict[str, Any]
    received_at: float
    written_at: list[float] = field(default_factory=list)  # each output chunk
    finished_at: float | None = None  # the line saying the answer is complete


Scripting = Script | Callable[[int, dict[str, Any]], Script]


# Linux's SO_TIMESTAMP (a struct timeval per read); written apart from the client's own
# stamping (`providers.StampedSocket`, SO_TIMESTAMPNS), so the truth does not share its code
SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
_TIMEVAL = struct.Struct("@ll")


class KernelStampedSocket(socket.socket):
    """An accepted connection whose reads note when their last packet reached the kernel
    (`arrival`, on the `perf_counter()` clock; None when the kernel gave no stamp).
    asyncio's transports read with `recv`."""

    __slots__ = ("arrival",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrival: float | None = None
        self.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        data, ancillary, _, _ = self.recvmsg(bufsize, socket.CMSG_SPACE(_TIMEVAL.size), flags)
        read_at, wall = time.perf_counter(), time.time()
        self.arrival = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMP:
                seconds, microseconds = _TIMEVAL.unpack_from(value)
                self.arrival = read_at - (wall - seconds - microseconds / 1e6)
        return data


class StampedListener(socket.socket):
    """A listening socket whose connections are `KernelStampedSocket`s."""

    __slots__ = ("accepted",)

    def __init__(self) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.accepted: weakref.WeakValueDictionary[int, KernelStampedSocket] = (
            weakref.WeakValueDictionary()
        )

    def accept(self) -> tuple[socket.socket, Any]:
        fd, address = self._accept()  # type: ignore[attr-defined]
        conn = KernelStampedSocket(self.family, self.type, self.proto, fileno=fd)
        self.accepted[fd] = conn
        return conn, address


class ArrivalStamping(asyncio.StreamReaderProtocol):
    """A stream protocol that notes when each read arrived (the kernel's receive time of its
    socket when known, else now), before the coroutine reading it runs (which, with many
    connections busy, can be much later)."""

    def __init__(self, listener: StampedListener, *args: Any) -> None:
        super().__init__(*args)
        self.listener = listener
        self.sock: KernelStampedSocket | None = None
        self.arrival = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sock = self.listener.accepted.get(transport.get_extra_info("socket").fileno())
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        arrival = self.sock.arrival if self.sock is not None else None
        self.arrival = arrival if arrival is not None else time.perf_counter()
        super().data_received(data)


class FakeModelServer:
    """`async with FakeModelServer(script) as server:` then point a client at `server.url`.
    `script` may be a function of (request number from 0, request body)."""

    def __init__(self, script: Scripting = Script()) -> None:
        self.script = script
        self.served: list[Served] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        # the output lines of a script, encoded once: 64 requests at once must not keep the
        # loop from stamping the arrivals of the others
        self._encoded: dict[tuple[str, Script, Any, bool], list[bytes]] = {}

    async def __aenter__(self) -> FakeModelServer:
        loop = asyncio.get_running_loop()

        listener = StampedListener()
        listener.bind(("127.0.0.1", 0))
        listener.setblocking(False)

        def protocol() -> ArrivalStamping:
            reader = asyncio.StreamReader(limit=2**16)
            return ArrivalStamping(listener, reader, self._connection)

        self._server = await loop.create_server(protocol, sock=listener, backlog=512)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away (a timeout, or done)
        except asyncio.CancelledError:
            pass  # the server is closing; asyncio's stream callback dislikes a cancelled task
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])
        }
        raw = await reader.readexactly(int(headers.get("content-length") or 0))
        # when the request's last bytes came off the socket, not when this got round to it
        protocol = writer.transport.get_protocol()
        received_at = protocol.arrival if isinstance(protocol, ArrivalStamping) else 0.0
        body: dict[str, Any] = json.loads(raw) if raw else {}
        index = len(self.served)
        script = self.script(index, body) if callable(self.script) else self.script
        served = Served(path, body, received_at)
        self.served.append(served)
        if method != "POST" or not path.endswith(
            ("/api/generate", "/api/chat", "/chat/completions")
        ):
            await self._plain(writer, 404, {"error": f"no route {method} {path}"})
            return True
        if script.status != 200:
            message = f"model {body.get('model')!r} not found"
            if script.echo_authorization:
                message = f"invalid credentials: Authorization: {headers.get('authorization')}"
            await self._plain(writer, script.status, {"error": message})
            return True
        if script.raw is not None:
            writer.write(
                f"HTTP/1.1 200 OK\r\nContent-Type: {script.raw_content_type}\r\n"
                f"Content-Length: {len(script.raw)}\r\n\r\n".encode()
                + script.raw
            )
            await writer.drain()
            return True
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if path.endswith("/chat/completions"):
                await self._sse(writer, script, body, served)
            else:
                await self._ndjson(writer, script, body, served, chat=path.endswith("/chat"))
        finally:
            self.in_flight -= 1
        return True

    async def _plain(self, writer: asyncio.StreamWriter, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        writer.write(
            f"HTTP/1.1 {status} Error\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    @staticmethod
    def _start(writer: asyncio.StreamWriter, content_type: str) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> float:
        framed = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        # stamped as the bytes are handed to the kernel: over loopback they reach the
        # client's socket within this very call
        written = time.perf_counter()
        writer.write(framed)
        await writer.drain()
        return written

    async def _paced(
        self,
        writer: asyncio.StreamWriter,
        script: Script,
        served: Served,
        lines: Sequence[bytes],
        error: bytes,
    ) -> bool:
        """Write the output chunks on schedule; False when the script ends in an error."""
        due = served.received_at + script.ttft_s
        for i, line in enumerate(lines):
            if script.error_after is not None and i == script.error_after:
                await self._send(writer, error)
                return False
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            served.written_at.append(await self._send(writer, line))
            due += script.gap_s
        if script.stall_s:
            await asyncio.sleep(script.stall_s)
        return True

    async def _ndjson(
        self,
        writer: asyncio.StreamWriter,
        script: Script,
        body: dict[str, Any],
        served: Served,
        chat: bool,
    ) -> None:
        model = body.get("model", "")

        def line(text: str, **extra: Any) -> bytes:
            out: dict[str, Any] = {"model": model, "created_at": "2026-04-02T12:00:00Z"}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            return (json.dumps({**out, **extra}) + "\n").encode()

        self._start(writer, "application/x-ndjson")
        key = ("ndjson", script, model, chat)
        outputs = self._encoded.get(key) or [line(text, done=False) for text, _ in script.chunks]
        self._encoded[key] = outputs
        error = (json.dumps({"error": "model runner has unexpectedly stopped"}) + "\n").encode()
        if not await self._paced(writer, script, served, outputs, error):
            await self._send(writer, b"")
            return
        eval_ns = int((time.perf_counter() - served.received_at - script.ttft_s) * 1e9)
        final = line(
            "",
            done=True,
            done_reason="stop",
            total_duration=int((time.perf_counter() - served.received_at) * 1e9),
            load_duration=1000,
            prompt_eval_count=script.prompt_tokens,
            prompt_eval_duration=2000,
            eval_count=script.completion_tokens,
            eval_duration=max(eval_ns, 1),
        )
        served.finished_at = await self._send(writer, final)
        await self._send(writer, b"")

    async def _sse(
        self, writer: asyncio.StreamWriter, script: Script, body: dict[str, Any], served: Served
    ) -> None:
        model = body.get("model", "")

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            chunk = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1775131200,
                "model": model,
                "choices": choices,
                **extra,
            }
            return f"data: {json.dumps(chunk)}\n\n".encode()

        def delta(content: str | None, finish: str | None = None) -> dict[str, Any]:
            d: dict[str, Any] = {} if content is None else {"content": content}
            return {"index": 0, "delta": d, "finish_reason": finish}

        self._start(writer, "text/event-stream")
        if script.sse_comment:
            await self._send(writer, b": OPENROUTER PROCESSING\n\n")
        role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        await self._send(writer, event([role]))
        key = ("sse", script, model, False)
        outputs, running = self._encoded.get(key, []), 0
        for text, tokens in script.chunks if not outputs else ():
            running += tokens
            so_far = {"prompt_tokens": script.prompt_tokens, "completion_tokens": running}
            outputs.append(
                event([delta(text)], **({"usage": so_far} if script.chunk_usage else {}))
            )
        self._encoded[key] = outputs
        error = (
            f"data: {json.dumps({'error': {'message': 'upstream overloaded', 'code': 502}})}\n\n"
        )
        if not await self._paced(writer, script, served, outputs, error.encode()):
            await self._send(writer, b"")
            return
        await self._send(writer, event([delta(None, "stop")]))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage: dict[str, Any] = {
                "prompt_tokens": script.prompt_tokens,
                "completion_tokens": script.completion_tokens,
                "total_tokens": script.prompt_tokens + script.completion_tokens,
            }
            if script.cost_usd is not None:
                usage["cost"] = float(script.cost_usd)
            await self._send(writer, event([], usage=usage))
        served.finished_at = await self._send(writer, b"data: [DONE]\n\n")
        await self._send(writer, b"")
