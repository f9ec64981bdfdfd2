"""The consumers' INFO line about applied batches (issue 18): at most one per consumer per
second, summarising every batch since the last one, with the latest batch's trace."""

from __future__ import annotations

import logging
import time

import pytest
from opentelemetry import trace

from services.runtime import consumer
from services.runtime.consumer import BatchSummary

TRACE = trace.SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C,
    span_id=0x00F067AA0BA902B7,
    is_remote=False,
    trace_flags=trace.TraceFlags(1),
)


def test_one_line_a_second_sums_up_the_batches_since_the_last(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    summary = BatchSummary("stats-model-rewarded")
    caplog.set_level(logging.INFO, logger=consumer.__name__)

    summary.add(3, 0.010, TRACE)  # the first batch after a quiet spell: logged at once
    for n in range(1, 1001):  # 1,000 batches within the next second: no line
        clock[0] += 0.000_9
        summary.add(2, 0.001 * (n % 7), trace.INVALID_SPAN_CONTEXT)
    clock[0] += 0.2
    summary.add(5, 0.020, TRACE)  # past the second: one line for all 1,001 of them

    lines = [r for r in caplog.records if r.name == consumer.__name__]
    assert len(lines) == 2
    first, second = (r.__dict__ for r in lines)
    assert (first["consumer"], first["batches"], first["messages"]) == (
        "stats-model-rewarded",
        1,
        3,
    )
    assert (second["batches"], second["messages"], second["max_ms"]) == (1001, 2005, 20.0)
    assert second["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert 0 < second["mean_ms"] < 20
