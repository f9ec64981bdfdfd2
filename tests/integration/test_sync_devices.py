"""sync's local Ollama devices against local servers speaking Ollama's `/api/version` and
`/api/tags`: discovery, offline and back, and what is published on the way."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from nats.js import JetStreamContext

from services.sync.app import build
from services.sync.config import SyncSettings
from tests.conftest import Infra, running
from tests.integration.test_sync_catalog import Catalog, FakeHttp, Reply


def tag(name: str, size: int = 4_920_753_328) -> dict[str, Any]:
    """One entry of Ollama's `/api/tags`, as Ollama writes it."""
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-03-30T09:12:44.123456789+02:00",
        "size": size,
        "digest": "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e",
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_K_M",
        },
    }


class FakeOllama(FakeHttp):
    def __init__(self, *models: str, version: str = "0.6.1") -> None:
        super().__init__()
        self.models = list(models)
        self.hang = False  # accept the connection, never answer
        self.routes["/api/version"] = lambda _: self._json({"version": version})
        self.routes["/api/tags"] = lambda _: self._json({"models": [tag(m) for m in self.models]})

    def _json(self, body: Any) -> Reply:
        return Reply(
            200,
            json.dumps(body).encode(),
            {"Content-Type": "application/json; charset=utf-8"},
            delay=30 if self.hang else 0,
        )


@asynccontextmanager
async def ollama(*models: str) -> AsyncIterator[FakeOllama]:
    device = FakeOllama(*models)
    await device.start()
    try:
        yield device
    finally:
        if device._server is not None:
            await device.stop()


def settings(
    infra: Infra, database_url: str, devices: dict[str, str], timeout_s: float = 10.0
) -> SyncSettings:
    """A device that answers is given time enough on a loaded machine (a 0.5 s timeout once
    took a living fake device for an offline one); the hanging device's test sets its own."""
    return SyncSettings(
        nats_url=infra.nats_url,
        database_url=database_url,
        http_port=0,
        ollama_devices=devices,
        ollama_discovery_interval=3600,  # the startup pass, then only what the test asks for
        ollama_timeout_s=timeout_s,
        outbox_poll_interval_s=0.05,
    )


async def discover(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    r = await client.post("/v1/discovery/run")
    assert r.status_code == 200, r.text
    return {d["name"]: d for d in r.json()}


async def statuses(client: httpx.AsyncClient) -> dict[tuple[str, str], str]:
    models = (await client.get("/v1/models", params={"provider": "ollama"})).json()
    return {(m["device"], m["model_id"]): m["status"] for m in models}


async def test_a_device_going_down_and_up_is_published_once_each_way(
    infra: Infra, database_url: str, js: JetStreamContext, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with ollama("llama3.1:8b", "qwen2.5:7b") as device:
        config = settings(infra, database_url, {"gpu-box": device.url})
        async with running(build(config)) as (runtime, client):
            stream = Catalog(js)
            assert (await discover(client))["gpu-box"]["status"] == "online"
            first = await stream.new(runtime)
            assert [e["subject"] for e in first if e["subject"].startswith("device.")] == [
                "device.online"  # first seen: nobody knew of it yet
            ]
            assert await statuses(client) == {
                ("gpu-box", "llama3.1:8b"): "active",
                ("gpu-box", "qwen2.5:7b"): "active",
            }

            await device.stop()  # down
            for _ in range(3):
                down = await discover(client)
            assert down["gpu-box"]["status"] == "offline"
            assert down["gpu-box"]["last_error"]
            assert await statuses(client) == {  # kept, not deleted
                ("gpu-box", "llama3.1:8b"): "unavailable",
                ("gpu-box", "qwen2.5:7b"): "unavailable",
            }
            available = (await client.get("/v1/models", params={"available": "true"})).json()
            assert available == []

            await device.start()  # up again, same port
            for _ in range(3):
                up = await discover(client)
            assert up["gpu-box"]["status"] == "online"
            assert set((await statuses(client)).values()) == {"active"}

            events = await stream.new(runtime)
            device_events = [e for e in events if e["subject"].startswith("device.")]
            assert [e["subject"] for e in device_events] == ["device.offline", "device.online"]
            offline, online = device_events
            assert offline["device"] == "gpu-box" and offline["base_url"] == device.url
            assert offline["reason"]
            assert (online["version"], online["model_count"]) == ("0.6.1", 2)
            told = [(e["model_id"], e["status"]) for e in events if e["subject"] == "model.synced"]
            assert sorted(told) == [
                ("llama3.1:8b", "active"),
                ("llama3.1:8b", "unavailable"),
                ("qwen2.5:7b", "active"),
                ("qwen2.5:7b", "unavailable"),
            ]
    offline_lines = [r.getMessage() for r in caplog.records if "offline" in r.getMessage()]
    assert len(offline_lines) == 1 and "gpu-box" in offline_lines[0]


async def test_a_device_that_never_answers_is_offline_after_the_timeout(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with ollama("llama3.1:8b") as device:
        device.hang = True
        config = settings(infra, database_url, {"slow": device.url}, timeout_s=0.5)
        async with running(build(config)) as (runtime, client):
            slow = (await discover(client))["slow"]
            assert slow["status"] == "offline"
            assert "no answer within 0.5s" in slow["last_error"]
            events = await Catalog(js).new(runtime)
            assert [e["subject"] for e in events] == ["device.offline"]


async def test_device_models_are_added_and_removed_and_named_by_device(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    async with ollama("llama3.1:8b", "qwen2.5:7b") as gpu, ollama("llama3.1:8b") as laptop:
        config = settings(infra, database_url, {"gpu-box": gpu.url, "laptop": laptop.url})
        async with running(build(config)) as (runtime, client):
            stream = Catalog(js)
            devices = await discover(client)
            assert {
                n: (d["status"], d["version"], d["model_count"]) for n, d in devices.items()
            } == {
                "gpu-box": ("online", "0.6.1", 2),
                "laptop": ("online", "0.6.1", 1),
            }
            await stream.new(runtime)

            gpu.models = ["llama3.1:8b", "mistral:7b"]  # one pulled, one deleted
            await discover(client)
            told = {
                (e["device"], e["model_id"], e["change"], e["status"])
                for e in await stream.new(runtime, "model.synced")
            }
            assert told == {
                ("gpu-box", "mistral:7b", "added", "active"),
                ("gpu-box", "qwen2.5:7b", "removed", "removed"),
            }
            await discover(client)  # nothing changed: nothing published
            assert await stream.new(runtime) == []

            models = (await client.get("/v1/models", params={"provider": "ollama"})).json()
            mistral = next(m for m in models if m["model_id"] == "mistral:7b")
            assert (mistral["prompt_price_per_1m"], mistral["completion_price_per_1m"]) == (
                "0",
                "0",
            )
            ambiguous = await client.get("/v1/models/llama3.1:8b")
            assert ambiguous.status_code == 409
            assert ambiguous.json()["error"]["code"] == "ambiguous_model"
            assert "gpu-box" in ambiguous.json()["error"]["message"]
            one = (await client.get("/v1/models/llama3.1:8b", params={"device": "laptop"})).json()
            assert one["device"] == "laptop" and one["raw"]["details"]["parameter_size"] == "8.0B"
            providers = (await client.get("/v1/providers")).json()
            assert providers == [
                {"provider": "ollama", "count": 3, "by_status": {"active": 3, "removed": 1}}
            ]
            listed = (await client.get("/v1/devices")).json()
            assert [d["name"] for d in listed] == ["gpu-box", "laptop"]
