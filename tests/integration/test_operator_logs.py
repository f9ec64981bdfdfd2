"""What an operator reads in the logs: a benchmark job's start and end, in the trace of the
message that asked for it, so one trace id finds the request, the job and its result."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from contracts.events import BenchmarkRequested
from services.benchmark.app import build
from services.runtime.logs import JsonFormatter
from services.runtime.telemetry import current_trace_headers
from tests.conftest import Infra, eventually, running
from tests.fakes import FakeModelServer
from tests.integration.test_benchmark_service import FAST, finished, settings


class Lines(logging.Handler):
    """Each record as the service prints it (formatted where it is logged, in its context)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter("benchmark"))
        self.lines: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@contextmanager
def printed(logger: str) -> Iterator[Lines]:
    lines, log = Lines(), logging.getLogger(logger)
    level = log.level
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        log.removeHandler(lines)
        log.setLevel(level)


def tracer() -> trace.Tracer:
    """The process-wide provider can be set once; a recording one is all this needs."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    return trace.get_tracer("test")


async def test_a_job_asked_for_over_nats_logs_its_start_and_end_in_the_askers_trace(
    infra: Infra, database_url: str, js: JetStreamContext
) -> None:
    job = BenchmarkRequested(
        job_id=uuid.uuid4(),
        provider="ollama",
        model="llama3.1:8b",
        task_type="generate",
        prompt="Why is the sky blue?",
        runs=2,
    )
    async with (
        FakeModelServer(lambda n, body: FAST) as fake,
        running(build(settings(infra, database_url, fake))) as (_, client),
    ):
        with printed("services.benchmark.worker") as logged:
            with tracer().start_as_current_span("orchestrator asks for a benchmark") as span:
                headers = current_trace_headers()
                trace_id = format(span.get_span_context().trace_id, "032x")
            await js.publish(job.subject, job.model_dump_json().encode(), headers=headers)

            async def stored() -> bool:
                r = await client.get(f"/v1/benchmarks/{job.job_id}")
                return r.status_code == 200

            await eventually(stored, what="the job stored from its message")
            ended = await finished(client, str(job.job_id))
    assert ended["status"] == "completed"
    about_job = [line for line in logged.lines if str(job.job_id) in line["msg"]]
    starts = [line for line in about_job if " started: " in line["msg"]]
    ends = [line for line in about_job if " ended completed: 2 of 2 runs ok" in line["msg"]]
    assert len(starts) == 1 and len(ends) == 1, [line["msg"] for line in about_job]
    assert {line.get("trace_id") for line in about_job} == {trace_id}
