"""Pure decisions of benchmark: the price guard, what one streamed run measured, the summary
of a job, how a job ends, and what of an upstream's text may be kept. No I/O here.

The price guard is written once, in `PRICE_GUARD_RULE` below; the API's documentation and
the README point to it.
"""

from __future__ import annotations

import itertools
import math
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from contracts.events import (
    BenchmarkCompleted,
    BenchmarkFailed,
    BenchmarkRequested,
    BenchmarkSummary,
    LatencySummary,
    within_price_cap,
)

Provider = Literal["ollama", "openrouter", "openai"]
LOCAL_PROVIDER = "ollama"
MILLION = Decimal(1_000_000)


# --- the price guard ---------------------------------------------------------------------

PRICE_GUARD_RULE = """\
A request is judged by the catalog price (from `model.synced`) of the model it names, whatever
provider it goes through (the seed refuses `openai/gpt-4` asked through `ollama`), when the
API accepts it and again when a worker starts it (prices change, and any client may publish
`benchmark.requested`):

1. Every catalog entry whose id is the model's is considered (for provider `openai`,
   `gpt-4o` is also looked up as `openai/gpt-4o`); the strictest decides. An entry of
   provider `ollama` is free (a local model).
2. A prompt or completion price per 1M tokens above `BENCHMARK_MAX_PRICE_PER_1M` is refused,
   naming the price and the cap; a price equal to the cap is allowed. The highest of the
   entry's price tiers counts (OpenRouter's `pricing.overrides`, e.g. long prompts).
   A model not priced per token (its output is not text: priced per image, second, ...)
   is refused: it is never free.
3. A variable price (`variable_price`, a negative price such as OpenRouter's `-1`, or no
   price) is refused unless `BENCHMARK_ALLOW_VARIABLE_PRICE` (the cost is then unknown
   unless the server reports it).
4. A model the catalog does not know is allowed through `ollama` (a local model is free)
   and refused through `openrouter` and `openai` unless `BENCHMARK_ALLOW_UNKNOWN_MODELS`.

A removed catalog entry keeps its last known price, so the guard still knows what it costs.
A refusal answers `400 {"error": "benchmark_blocked", "reason": ...}`."""


@dataclass(frozen=True)
class Policy:
    max_price_per_1m: Decimal
    allow_variable_price: bool = False
    allow_unknown_models: bool = False


@dataclass(frozen=True)
class Tier:
    """Prices that replace the base ones from `min_prompt_tokens` prompt tokens up
    (OpenRouter's `pricing.overrides`). None: under another condition (a time window, say),
    which a run cannot tell; such a tier counts for the cap, never for a run's cost."""

    min_prompt_tokens: int | None
    prompt_per_1m: Decimal
    completion_per_1m: Decimal


@dataclass(frozen=True)
class CatalogPrice:
    """One entry of the service's price table (from `model.synced`)."""

    provider: str
    model_id: str
    prompt_per_1m: Decimal | None
    completion_per_1m: Decimal | None
    variable_price: bool = False
    # the highest of the base price and the entry's price tiers (None: as the base)
    highest_prompt_per_1m: Decimal | None = None
    highest_completion_per_1m: Decimal | None = None
    priced_per_token: bool = True  # False: its output is not text (per image, second, ...)
    tiers: tuple[Tier, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.provider == LOCAL_PROVIDER

    @property
    def is_variable(self) -> bool:
        if self.is_local or not self.priced_per_token:
            return False
        prices = (self.prompt_per_1m, self.completion_per_1m)
        return self.variable_price or any(p is None or p < 0 for p in prices)

    @property
    def top_prompt(self) -> Decimal:
        return self.highest_prompt_per_1m or self.prompt_per_1m or Decimal(0)

    @property
    def top_completion(self) -> Decimal:
        return self.highest_completion_per_1m or self.completion_per_1m or Decimal(0)

    @property
    def top_prices(self) -> tuple[Decimal, Decimal]:
        """(prompt, completion) at their highest tier, as `within_price_cap` takes them."""
        return self.top_prompt, self.top_completion

    @property
    def tiered(self) -> bool:
        return (self.top_prompt, self.top_completion) != (
            self.prompt_per_1m or Decimal(0),
            self.completion_per_1m or Decimal(0),
        )

    @property
    def highest(self) -> Decimal:
        if self.is_local or self.is_variable or not self.priced_per_token:
            return Decimal(0)
        return max(self.top_prompt, self.top_completion)


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens, as used for the cost of a run: the base prices, replaced by those
    of the tier in force for the run's prompt (the one with the highest threshold the
    prompt reaches)."""

    prompt_per_1m: Decimal
    completion_per_1m: Decimal
    tiers: tuple[Tier, ...] = ()

    def in_force(self, prompt_tokens: int) -> tuple[Decimal, Decimal]:
        """(prompt, completion) USD per 1M for a request of `prompt_tokens` prompt tokens."""
        reached = [
            t
            for t in self.tiers
            if t.min_prompt_tokens is not None and prompt_tokens >= t.min_prompt_tokens
        ]
        if not reached:
            return self.prompt_per_1m, self.completion_per_1m
        tier = max(reached, key=lambda t: t.min_prompt_tokens or 0)
        return tier.prompt_per_1m, tier.completion_per_1m


FREE = Price(Decimal(0), Decimal(0))


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    price: Price | None  # None: the cost is unknown (variable or unknown price)


def catalog_ids(provider: str, model: str) -> list[str]:
    """The catalog ids a requested model may have: OpenAI's own API names models without
    the vendor prefix the catalog (OpenRouter) uses."""
    ids = [model]
    if provider == "openai" and "/" not in model:
        ids.append(f"openai/{model}")
    return ids


def _usd(value: Decimal) -> str:
    return f"${value.normalize():f}"


def check_price(
    provider: str, model: str, catalog: Sequence[CatalogPrice], policy: Policy
) -> Verdict:
    """May `model` be benchmarked through `provider`? See `PRICE_GUARD_RULE`."""
    cap = _usd(policy.max_price_per_1m)
    entries = [c for c in catalog if c.model_id in catalog_ids(provider, model)]
    per_unit = [c for c in entries if not c.is_local and not c.priced_per_token]
    priced = [c for c in entries if not c.is_local and c.priced_per_token and not c.is_variable]
    # the fleet's one price-cap rule (contracts.within_price_cap), at each entry's top tier
    over = [c for c in priced if not within_price_cap(c.top_prices, policy.max_price_per_1m)]
    if over:
        dearest = max(over, key=lambda c: c.highest)
        up_to = "up to " if dearest.tiered else ""
        tier = " (its highest price tier)" if dearest.tiered else ""
        return Verdict(
            False,
            f"model too expensive for benchmark: {dearest.model_id} costs {up_to}"
            f"{_usd(dearest.top_prompt)} per 1M prompt tokens and "
            f"{_usd(dearest.top_completion)} per 1M completion tokens{tier} in the "
            f"{dearest.provider} catalog, above the cap BENCHMARK_MAX_PRICE_PER_1M={cap}",
            None,
        )
    if per_unit:
        return Verdict(
            False,
            f"model not priced per token: {per_unit[0].model_id} outputs something other than "
            "text and the catalog prices it per unit (image, second, ...), so its cost cannot "
            f"be held under the cap BENCHMARK_MAX_PRICE_PER_1M={cap}",
            None,
        )
    if any(c.is_variable for c in entries):
        if not policy.allow_variable_price:
            return Verdict(
                False,
                f"model price is variable: {model} is priced per request in the catalog, so "
                f"its cost cannot be held under the cap BENCHMARK_MAX_PRICE_PER_1M={cap}; "
                "set BENCHMARK_ALLOW_VARIABLE_PRICE=1 to allow such models",
                None,
            )
        return Verdict(True, "variable price, allowed by BENCHMARK_ALLOW_VARIABLE_PRICE", None)
    if priced:
        dearest = max(priced, key=lambda c: c.highest)
        assert dearest.prompt_per_1m is not None and dearest.completion_per_1m is not None
        return Verdict(
            True,
            f"catalog price {_usd(dearest.highest)} per 1M tokens is within the cap {cap}",
            Price(dearest.prompt_per_1m, dearest.completion_per_1m, dearest.tiers),
        )
    if entries:
        return Verdict(True, "a local Ollama model is free", FREE)
    if provider == LOCAL_PROVIDER:
        return Verdict(True, "not in the catalog; a local Ollama model is free", FREE)
    if policy.allow_unknown_models:
        return Verdict(True, "not in the catalog, allowed by BENCHMARK_ALLOW_UNKNOWN_MODELS", None)
    return Verdict(
        False,
        f"model not in the catalog: the price of {model} via {provider} is unknown, so it "
        f"cannot be held under the cap BENCHMARK_MAX_PRICE_PER_1M={cap}; set "
        "BENCHMARK_ALLOW_UNKNOWN_MODELS=1 to allow models the catalog does not know",
        None,
    )


# --- one run -----------------------------------------------------------------------------


@dataclass
class Stream:
    """What a provider client saw of one streamed request: `perf_counter()` seconds, stamped
    as `providers` states (started, sent, first_byte, token_times, finished); token counts
    and cost are the server's own."""

    started: float
    sent: float | None = None
    first_byte: float | None = None
    token_times: list[float] = field(default_factory=list)  # each chunk carrying output
    chunk_tokens: list[int] | None = None  # tokens in each of those chunks, if the server says
    finished: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    server_cost_usd: Decimal | None = None
    server_eval_ns: int | None = None  # Ollama's eval_duration
    error_kind: str | None = None  # timeout, connection, http_status, stream_error, protocol
    error: str | None = None


@dataclass
class RunResult:
    """One measured run, as stored and shown. Latencies in milliseconds."""

    run_index: int
    ok: bool
    error_kind: str | None = None
    error: str | None = None
    ttft_ms: float | None = None
    e2e_ms: float | None = None
    inter_token_ms: list[float] = field(default_factory=list)
    itl_mean_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    tpot_ms: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    tokens_per_s: float | None = None
    server_tokens_per_s: float | None = None
    cost_usd: Decimal | None = None
    cost_source: str | None = None  # "server" or "catalog"
    content_chunks: int = 0
    ttfb_ms: float | None = None
    itl_per_token_ms: list[float] = field(default_factory=list)


def run_cost(
    price: Price | None,
    prompt_tokens: int | None,
    output_tokens: int | None,
    server_cost_usd: Decimal | None,
) -> tuple[Decimal | None, str | None]:
    """The server's reported cost when it sends one, else the catalog price in force for
    the prompt's size (its tier) times the server's token counts; unknown when neither is
    there."""
    if server_cost_usd is not None:
        return server_cost_usd, "server"
    if price is None or output_tokens is None:
        return None, None
    prompt_per_1m, completion_per_1m = price.in_force(prompt_tokens or 0)
    cost = (
        Decimal(prompt_tokens or 0) * prompt_per_1m + Decimal(output_tokens) * completion_per_1m
    ) / MILLION
    return cost, "catalog"


def per_token_gaps(token_times: Sequence[float], chunk_tokens: Sequence[int]) -> list[float]:
    """ITL per token, in seconds: each chunk after the first holding k tokens contributes k
    gaps of (its arrival - the previous chunk's arrival) / k. The first chunk's extra
    tokens came with the first token and add nothing."""
    gaps: list[float] = []
    for (before, after), tokens in zip(
        itertools.pairwise(token_times), chunk_tokens[1:], strict=False
    ):
        gaps += [(after - before) / tokens] * tokens
    return gaps


def measure(index: int, stream: Stream, price: Price | None) -> RunResult:
    """Turn what a client saw into the run's measurements (times as `providers` stamps them):

    ttft_ms          started -> first chunk carrying output
    ttfb_ms          started -> first byte of the response (its status line)
    inter_token_ms   gaps between consecutive chunks carrying output (ITL per chunk; a chunk
                     may hold several tokens)
    itl_per_token_ms each gap divided by the tokens its later chunk held, once per token,
                     when the server said how many tokens each chunk held (else empty)
    tpot_ms          (e2e - ttft) / (output tokens - 1), with the server's token count, as
                     vLLM and AIPerf define it
    e2e_ms           started -> done (the line in which the server said it was done)
    tokens_per_s     the server's output tokens over e2e"""
    if stream.error is not None:
        return RunResult(index, False, stream.error_kind, stream.error)
    if not stream.token_times or stream.finished is None:
        return RunResult(
            index, False, "empty_response", "the stream ended without any generated text"
        )
    ms = 1000.0
    ttft = (stream.token_times[0] - stream.started) * ms
    e2e = (stream.finished - stream.started) * ms
    gaps = [(b - a) * ms for a, b in zip(stream.token_times, stream.token_times[1:], strict=False)]
    tokens = stream.output_tokens
    tpot = (e2e - ttft) / (tokens - 1) if tokens is not None and tokens > 1 else None
    cost, source = run_cost(price, stream.prompt_tokens, tokens, stream.server_cost_usd)
    counts = stream.chunk_tokens
    return RunResult(
        index,
        True,
        ttft_ms=ttft,
        e2e_ms=e2e,
        inter_token_ms=gaps,
        itl_mean_ms=sum(gaps) / len(gaps) if gaps else None,
        itl_p50_ms=percentile(gaps, 50) if gaps else None,
        itl_p99_ms=percentile(gaps, 99) if gaps else None,
        tpot_ms=tpot,
        prompt_tokens=stream.prompt_tokens,
        output_tokens=tokens,
        tokens_per_s=tokens / (e2e / ms) if tokens is not None and e2e > 0 else None,
        server_tokens_per_s=(
            tokens / (stream.server_eval_ns / 1e9)
            if tokens is not None and stream.server_eval_ns
            else None
        ),
        cost_usd=cost,
        cost_source=source,
        content_chunks=len(stream.token_times),
        ttfb_ms=(stream.first_byte - stream.started) * ms if stream.first_byte else None,
        itl_per_token_ms=(
            [g * ms for g in per_token_gaps(stream.token_times, counts)]
            if counts is not None and len(counts) == len(stream.token_times)
            else []
        ),
    )


# --- what of an upstream's text may be kept ----------------------------------------------

REDACTED = "[redacted]"
_HEADER_VALUE = re.compile(
    r"(?i)(\b(?:proxy-)?authorization|x-api-key|api[_-]?key)(\W{1,4})"
    r"(?:(?:bearer|basic)\s+)?[^\s\"',;}]+"
)
_SCHEME_TOKEN = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]+")
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{6,}")
_SHORTEST_PARTIAL_SECRET = 6


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` without any of `secrets` (also one cut off at the end of the text),
    authorization header values, Bearer/Basic credentials and `sk-...` keys; apply it to
    an upstream's text before it is stored or logged."""
    for secret in secrets:
        if len(secret) < 4:
            continue
        text = text.replace(secret, REDACTED)
        for n in range(len(secret) - 1, _SHORTEST_PARTIAL_SECRET - 1, -1):
            if text.endswith(secret[:n]):
                text = text[:-n] + REDACTED
                break
    text = _HEADER_VALUE.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    text = _SCHEME_TOKEN.sub(lambda m: f"{m[1]} {REDACTED}", text)
    return _API_KEY.sub(f"sk-{REDACTED}", text)


# --- a job's summary ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's
    default); `values` must not be empty."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Sequence[float]) -> LatencySummary | None:
    if not values:
        return None
    return LatencySummary(
        mean=sum(values) / len(values),
        p50=percentile(values, 50),
        p90=percentile(values, 90),
        p99=percentile(values, 99),
    )


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def summarize(results: Sequence[RunResult]) -> BenchmarkSummary:
    ok = [r for r in results if r.ok]
    costs = [r.cost_usd for r in ok]
    return BenchmarkSummary(
        runs_ok=len(ok),
        runs_failed=len(results) - len(ok),
        ttft_ms=distribution(_present(r.ttft_ms for r in ok)),
        inter_token_ms=distribution([g for r in ok for g in r.inter_token_ms]),
        itl_per_token_ms=distribution([g for r in ok for g in r.itl_per_token_ms]),
        tpot_ms=distribution(_present(r.tpot_ms for r in ok)),
        e2e_ms=distribution(_present(r.e2e_ms for r in ok)),
        tokens_per_s=distribution(_present(r.tokens_per_s for r in ok)),
        output_tokens=sum(r.output_tokens or 0 for r in ok),
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        cost_usd=sum((c for c in costs if c is not None), Decimal(0))
        if ok and all(c is not None for c in costs)
        else None,
        errors=dict(Counter(r.error_kind or "error" for r in results if not r.ok)),
    )


# --- how a job ends ----------------------------------------------------------------------

Outcome = BenchmarkCompleted | BenchmarkFailed


def final_event_id(job_id: uuid.UUID) -> uuid.UUID:
    """A job ends once, so its final event has one id whichever worker writes it."""
    return uuid.uuid5(job_id, "benchmark.final")


def outcome(job: BenchmarkRequested, results: Sequence[RunResult]) -> Outcome:
    """Completed when at least one run succeeded; failed when every run failed."""
    summary = summarize(results)
    if summary.runs_ok:
        return BenchmarkCompleted(
            event_id=final_event_id(job.job_id),
            job_id=job.job_id,
            provider=job.provider,
            model=job.model,
            task_type=job.task_type,
            summary=summary,
        )
    first_error = next((r.error for r in results if r.error), "no run succeeded")
    return refused(job, f"every run failed ({len(results)}); first error: {first_error}", summary)


def refused(
    job: BenchmarkRequested, error: str, summary: BenchmarkSummary | None = None
) -> BenchmarkFailed:
    """A job that failed: every run failed (with their `summary`), or it ended before its
    runs did: refused by the guard, given up on, cancelled, or out of time (with the
    `summary` of the runs it finished, if any)."""
    return BenchmarkFailed(
        event_id=final_event_id(job.job_id),
        job_id=job.job_id,
        provider=job.provider,
        model=job.model,
        task_type=job.task_type,
        error=error,
        summary=summary,
    )


def cut_short(job: BenchmarkRequested, error: str, results: Sequence[RunResult]) -> BenchmarkFailed:
    """A job stopped before its runs ended (cancelled, or out of time): failed, with the
    runs it finished."""
    return refused(job, error, summarize(results) if results else None)


CANCELLED = "cancelled on request"


def time_limit_reason(max_job_s: float) -> str:
    return (
        f"time limit: the job ran longer than BENCHMARK_MAX_JOB_S={max_job_s:g}s and was "
        "stopped; the runs finished before are kept"
    )


def start_refusal(
    attempt: int, max_attempts: int, verdict: Verdict, seconds_left: float, max_job_s: float
) -> str | None:
    """Why a claimed job must not run now, if it must not: too many workers already
    stopped mid-job, its time is up, or the guard refuses it (prices may have changed
    since it was accepted)."""
    if attempt > max_attempts:
        return (
            f"gave up: {max_attempts} workers started this job and each stopped before finishing it"
        )
    if seconds_left <= 0:
        return time_limit_reason(max_job_s)
    if not verdict.allowed:
        return f"benchmark_blocked: {verdict.reason}"
    return None


def quota_refusal(active_jobs: int, limit: int) -> str | None:
    """Why a user may not queue another job, if they may not."""
    if active_jobs >= limit:
        return (
            f"quota: {active_jobs} of your benchmark jobs are queued or running, the most "
            f"BENCHMARK_MAX_ACTIVE_JOBS_PER_USER={limit} allows; wait for one to end or cancel one"
        )
    return None
