"""schemathesis against the OpenAPI of all five services, each run as `fleet run <name>`
against real NATS and PostgreSQL: valid and invalid requests generated from each
operation's schema (a fixed seed) must never get a 5xx, nor an answer that breaks the
documented schema (status, content type, body) — sent with an operator's token (so every
route is reached), and again with none (every route but the open ones must refuse).

FUZZ_MAX_EXAMPLES sets the examples per operation and generation mode (default 25).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err

from services.embedded import die_with_parent, free_port
from tests.conftest import Infra, bearer

SERVICES = ("sync", "benchmark", "planner", "guardian", "stats")
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


async def _database(admin_url: str, name: str, create: bool) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        if create:
            await admin.execute(f'CREATE DATABASE "{name}"')
        else:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{url} exited while starting:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"{url} was not ready in {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def fleet(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The five services as child processes on a fresh database; upstreams (OpenRouter,
    Ollama, OpenAI-compatible) point at a closed port, so what the fuzzer starts fails
    fast instead of reaching out."""
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    base, _, _ = infra.database_url.rpartition("/")
    asyncio.run(_database(infra.database_url, name, create=True))
    logs = tmp_path_factory.mktemp("fuzz-logs")
    closed = f"http://127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "NATS_URL": infra.nats_url,
        "DATABASE_URL": f"{base}/{name}",
        "HTTP_HOST": "127.0.0.1",
        "LOG_LEVEL": "WARNING",
        "OPENROUTER_BASE_URL": closed,
        "OLLAMA_BASE_URL": closed,
        "OPENAI_BASE_URL": closed,
        "OPENROUTER_SYNC_ON_STARTUP": "false",
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    try:
        for service in SERVICES:
            port = free_port()
            urls[service] = f"http://127.0.0.1:{port}"
            with (logs / f"{service}.log").open("wb") as out:
                procs[service] = subprocess.Popen(
                    [sys.executable, "-m", "services.cli", "run", service],
                    env={**env, "HTTP_PORT": str(port)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=die_with_parent(15),
                )
        for service, url in urls.items():
            _wait_ready(url, procs[service], logs / f"{service}.log")
        yield urls
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(_database(infra.database_url, name, create=False))


@dataclass
class Tally:
    operations: int = 0
    cases: int = 0
    server_errors: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # the first of each kind

    def line(self, service: str) -> str:
        return (
            f"{service}: {self.operations} operations, {self.cases} cases, "
            f"{self.server_errors} 5xx, {len(self.failures)} kinds of failure"
        )


def fuzz(url: str, headers: dict[str, str], examples: int) -> Tally:
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    tally = Tally()
    session = requests.Session()
    session.headers.update(headers)
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation whose schema cannot be read
            tally.failures[str(result.err())] = str(result.err())
            continue
        operation = result.ok()
        tally.operations += 1
        cases = st.one_of(
            operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
            operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=2 * examples,
            derandomize=True,  # the same cases every run
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],  # every failure is collected, unshrunk
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=url, session=session, timeout=30)
            tally.cases += 1
            tally.server_errors += response.status_code >= 500
            try:
                case.validate_response(response, checks=CHECKS)
            except (AssertionError, FailureGroup) as exc:
                kind = f"{case.operation.label}: {str(exc).strip().splitlines()[0][:200]}"
                tally.failures.setdefault(kind, f"{exc}\n{case.as_curl_command(base_url=url)}")

        run()
    return tally


@pytest.mark.parametrize("service", SERVICES)
def test_fuzzing_finds_no_server_error_and_no_answer_off_schema(
    fleet: dict[str, str], service: str
) -> None:
    tally = fuzz(fleet[service], bearer("fuzzer", "operator"), MAX_EXAMPLES)
    print(f"\nfuzz {tally.line(service)}")
    assert tally.operations > 0 and tally.cases >= tally.operations
    assert tally.server_errors == 0 and not tally.failures, (
        tally.line(service) + "\n\n" + "\n\n".join(tally.failures.values())[:20_000]
    )


# guardian's, for probes and load balancers, and its status page (it shows no user's data)
OPEN_PATHS = {"/api/health", "/api/metrics", "/", "/status/live"}


def is_open(path: str) -> bool:
    return path.startswith("/health/") or path in OPEN_PATHS


@pytest.mark.parametrize("service", SERVICES)
def test_without_a_token_every_route_but_the_open_ones_refuses_with_401(
    fleet: dict[str, str], service: str
) -> None:
    document = httpx.get(f"{fleet[service]}/openapi.json", timeout=10).json()
    reached = []
    for path, operations in document["paths"].items():
        for method in operations:
            concrete = path.replace("{", "").replace("}", "")  # any value: refused before
            r = httpx.request(method, f"{fleet[service]}{concrete}", json={}, timeout=10)
            if is_open(path):
                assert r.status_code < 500, (method, path, r.text)
            else:
                assert r.status_code == 401, (method, path, r.status_code, r.text[:300])
                assert r.json()["error"]["code"] == "unauthorized"
                reached.append(path)
    assert reached, "no operation needs a token"
    tally = fuzz(fleet[service], {}, max(2, MAX_EXAMPLES // 5))
    assert tally.server_errors == 0 and not tally.failures, (
        tally.line(service) + "\n\n" + "\n\n".join(tally.failures.values())[:20_000]
    )
