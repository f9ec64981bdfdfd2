"""The demo's outside world on this machine: a fake OpenRouter (the catalog of
`catalog.json` and streamed chat completions), a fake Ollama device and a fake
OpenAI-compatible model server. They speak the real wire formats — OpenRouter's
`/api/v1/models` with an ETag, Ollama's NDJSON lines, OpenAI's SSE events with `usage` —
and stream word by word with a think time before the first word and uneven gaps after it,
as real servers do.

They listen on fixed local ports (FLEET_DEMO_PORT, default 8190, and the two after it), so
a stack started with `stack_env()` in its environment finds them: sync's catalog and
device, benchmark's three providers.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import hashlib
import json
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

DEVICE = "demo-gpu"
DEFAULT_BASE_PORT = 8190
CATALOG_FILE = Path(__file__).with_name("catalog.json")
LOCAL_MODELS = ("llama3.1:8b", "qwen2.5-coder:7b")
ANSWER_TEXT = (
    "Done. I read the task, checked the inputs against last week's numbers, wrote the "
    "result in the shared folder and left two notes for the next step: the edge cases "
    "around empty files, and a question about the retention window."
)


@dataclass(frozen=True)
class Ports:
    openrouter: int
    ollama: int
    openai: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Ports:
        text = env.get("FLEET_DEMO_PORT") or str(DEFAULT_BASE_PORT)
        if not text.isdigit() or not 1 <= int(text) <= 65533:
            raise ValueError(f"FLEET_DEMO_PORT: expected a port of 1-65533, got {text[:20]!r}")
        base = int(text)
        return cls(base, base + 1, base + 2)

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"


def stack_env(env: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What a stack's services need in their environment to use the demo's servers."""
    ports = Ports.from_env(env)
    return {
        "OPENROUTER_BASE_URL": ports.url(ports.openrouter),
        "OLLAMA_DEVICES": f"{DEVICE}={ports.url(ports.ollama)}",
        "OLLAMA_BASE_URL": ports.url(ports.ollama),
        "OPENAI_BASE_URL": ports.url(ports.openai) + "/v1",
    }


# --- streaming like a model ------------------------------------------------------------


async def words(limit: int | None) -> AsyncIterator[str]:
    """The answer word by word: 150-400 ms before the first, 15-60 ms between the others."""
    await asyncio.sleep(random.uniform(0.15, 0.4))
    answer = ANSWER_TEXT.split()
    for i, word in enumerate(answer[: limit or len(answer)]):
        if i:
            await asyncio.sleep(random.uniform(0.015, 0.06))
        yield word if i == 0 else " " + word


def prompt_tokens(body: dict[str, Any]) -> int:
    text = body.get("prompt") or json.dumps(body.get("messages", []))
    return max(1, len(str(text)) // 4)


def ndjson(body: dict[str, Any], chat: bool) -> StreamingResponse:
    """Ollama's /api/generate or /api/chat: a line per word, then a `done` line with counts."""
    model = body.get("model", "")
    limit = (body.get("options") or {}).get("num_predict")

    def line(text: str, **extra: Any) -> bytes:
        out: dict[str, Any] = {"model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
        out |= {"message": {"role": "assistant", "content": text}} if chat else {"response": text}
        return (json.dumps(out | extra) + "\n").encode()

    async def lines() -> AsyncIterator[bytes]:
        t0, n = time.monotonic_ns(), 0
        async for word in words(limit):
            n += 1
            yield line(word, done=False)
        elapsed = time.monotonic_ns() - t0
        yield line(
            "",
            done=True,
            done_reason="stop",
            total_duration=elapsed,
            load_duration=1_000_000,
            prompt_eval_count=prompt_tokens(body),
            prompt_eval_duration=5_000_000,
            eval_count=n,
            eval_duration=elapsed,
        )

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def sse(body: dict[str, Any], cost_per_token: float | None = None) -> StreamingResponse:
    """OpenAI's chat completion chunks; the usage chunk when asked for, with `cost` as
    OpenRouter adds it."""
    model, created = body.get("model", ""), int(time.time())

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "created": created}
        chunk |= {"model": model, "choices": choices, **extra}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    async def events() -> AsyncIterator[bytes]:
        if cost_per_token is not None:
            yield b": OPENROUTER PROCESSING\n\n"
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        n = 0
        async for word in words(body.get("max_tokens")):
            n += 1
            yield event([{"index": 0, "delta": {"content": word}, "finish_reason": None}])
        yield event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt = prompt_tokens(body)
            usage: dict[str, Any] = {
                "prompt_tokens": prompt,
                "completion_tokens": n,
                "total_tokens": prompt + n,
            }
            if cost_per_token is not None:
                usage["cost"] = round((prompt + n) * cost_per_token, 10)
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


# --- the three servers -------------------------------------------------------------------


@functools.cache
def listed_prices(model_id: str) -> dict[str, str]:
    """The model's `pricing` in `catalog.json`: USD per token, as strings."""
    listing = json.loads(CATALOG_FILE.read_text())
    prices: dict[str, str] = next(m for m in listing["data"] if m["id"] == model_id)["pricing"]
    return prices


class FakeOpenRouter:
    """The catalog (`catalog.json`, whose prices may be changed while it runs) and chat
    completions for any model in it."""

    def __init__(self) -> None:
        self.original: dict[str, Any] = json.loads(CATALOG_FILE.read_text())
        self.listing = copy.deepcopy(self.original)

    def model(self, model_id: str) -> dict[str, Any]:
        entry: dict[str, Any] = next(m for m in self.listing["data"] if m["id"] == model_id)
        return entry

    def set_completion_price(self, model_id: str, usd_per_token: str) -> None:
        self.model(model_id)["pricing"]["completion"] = usd_per_token

    def restore(self) -> None:
        self.listing = copy.deepcopy(self.original)

    async def models(self, request: Request) -> Response:
        body = json.dumps(self.listing).encode()
        etag = f'W/"{hashlib.sha256(body).hexdigest()[:16]}"'
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        known = {m["id"]: m for m in self.listing["data"]}
        if body.get("model") not in known:
            return JSONResponse({"error": {"message": "model not found", "code": 404}}, 404)
        price = float(known[body["model"]]["pricing"]["completion"])
        return sse(body, cost_per_token=price)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/v1/models", self.models),
                Route("/api/v1/chat/completions", self.chat, methods=["POST"]),
            ]
        )


def ollama_app() -> Starlette:
    async def version(_: Request) -> Response:
        return JSONResponse({"version": "0.6.5"})

    async def tags(_: Request) -> Response:
        return JSONResponse({"models": [_tag(name) for name in LOCAL_MODELS]})

    async def generate(request: Request) -> Response:
        return ndjson(await request.json(), chat=False)

    async def chat(request: Request) -> Response:
        return ndjson(await request.json(), chat=True)

    return Starlette(
        routes=[
            Route("/api/version", version),
            Route("/api/tags", tags),
            Route("/api/generate", generate, methods=["POST"]),
            Route("/api/chat", chat, methods=["POST"]),
        ]
    )


def _tag(name: str) -> dict[str, Any]:
    family = name.split(":")[0].rstrip("0123456789.")
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-03-30T09:12:44.123456789Z",
        "size": 4_920_753_328,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": name.split(":")[1].upper(),
            "quantization_level": "Q4_K_M",
        },
    }


def openai_app() -> Starlette:
    async def models(_: Request) -> Response:
        listed = [{"id": "gpt-4o-mini", "object": "model", "owned_by": "demo"}]
        return JSONResponse({"object": "list", "data": listed})

    async def chat(request: Request) -> Response:
        return sse(await request.json())

    return Starlette(
        routes=[
            Route("/v1/models", models),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # Ctrl-C belongs to the demo, which stops its servers itself


class PortTaken(RuntimeError):
    pass


class Served:
    """One app on a fixed local port, in this event loop; stop() and start() again."""

    def __init__(self, name: str, app: Starlette, port: int) -> None:
        self.name, self.app, self.port = name, app, port
        self.url = f"http://127.0.0.1:{port}"
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            raise PortTaken(
                f"port {self.port} for the demo's {self.name} is taken (another demo running? "
                "FLEET_DEMO_PORT moves the demo's ports, for the stack too)"
            ) from None
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=1
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None


class DemoServers:
    def __init__(self, ports: Ports) -> None:
        self.openrouter = FakeOpenRouter()
        self.served = {
            "openrouter": Served("OpenRouter", self.openrouter.app(), ports.openrouter),
            "ollama": Served("Ollama device", ollama_app(), ports.ollama),
            "openai": Served("OpenAI-compatible server", openai_app(), ports.openai),
        }

    async def __aenter__(self) -> DemoServers:
        for served in self.served.values():
            await served.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        for served in self.served.values():
            await served.stop()
