"""benchmark's pure decisions: the price guard, one run's measurements, a job's summary and
how it ends."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from contracts.events import BenchmarkCompleted, BenchmarkFailed, BenchmarkRequested
from services.benchmark.domain import (
    FREE,
    CatalogPrice,
    Policy,
    Price,
    RunResult,
    Stream,
    Tier,
    check_price,
    cut_short,
    final_event_id,
    measure,
    outcome,
    per_token_gaps,
    percentile,
    quota_refusal,
    run_cost,
    scrub,
    start_refusal,
    summarize,
)

CAP = Policy(Decimal("10"))
GPT4 = CatalogPrice("openrouter", "openai/gpt-4", Decimal("30"), Decimal("60"))
CHEAP = CatalogPrice("openrouter", "meta/llama-3-8b", Decimal("0.05"), Decimal("0.1"))
ROUTER = CatalogPrice("openrouter", "openrouter/auto", Decimal("-1"), Decimal("-1"), True)
LOCAL = CatalogPrice("ollama", "llama3.1:8b", None, None)


def test_the_seed_example_is_blocked_whatever_the_provider() -> None:
    for provider in ("ollama", "openrouter", "openai"):
        verdict = check_price(provider, "openai/gpt-4", [GPT4], CAP)
        assert not verdict.allowed
        assert verdict.reason.startswith("model too expensive for benchmark")
        assert "$30" in verdict.reason and "$60" in verdict.reason
        assert "BENCHMARK_MAX_PRICE_PER_1M=$10" in verdict.reason


def test_one_price_above_the_cap_blocks_and_the_cap_itself_is_allowed() -> None:
    completion_only = CatalogPrice("openrouter", "m", Decimal("1"), Decimal("10.01"))
    assert not check_price("openrouter", "m", [completion_only], CAP).allowed
    at_cap = CatalogPrice("openrouter", "m", Decimal("10"), Decimal("10"))
    verdict = check_price("openrouter", "m", [at_cap], CAP)
    assert verdict.allowed
    assert verdict.price == Price(Decimal("10"), Decimal("10"))


def test_a_cheap_model_is_allowed_with_its_price_for_the_cost() -> None:
    verdict = check_price("openrouter", "meta/llama-3-8b", [CHEAP], CAP)
    assert verdict.allowed
    assert verdict.price == Price(Decimal("0.05"), Decimal("0.1"))


def test_the_openai_provider_finds_the_catalog_entry_under_the_vendor_prefix() -> None:
    verdict = check_price("openai", "gpt-4", [GPT4], CAP)
    assert not verdict.allowed and "openai/gpt-4" in verdict.reason


def test_variable_price_is_blocked_unless_allowed() -> None:
    verdict = check_price("openrouter", "openrouter/auto", [ROUTER], CAP)
    assert not verdict.allowed
    assert "variable" in verdict.reason and "BENCHMARK_ALLOW_VARIABLE_PRICE" in verdict.reason
    unpriced = CatalogPrice("openrouter", "openrouter/auto", None, None)  # null: varies
    assert not check_price("openrouter", "openrouter/auto", [unpriced], CAP).allowed
    allowed = check_price("openrouter", "openrouter/auto", [ROUTER], Policy(Decimal(10), True))
    assert allowed.allowed and allowed.price is None  # cost unknown unless the server says


def test_an_unknown_model_is_free_on_ollama_and_blocked_elsewhere_unless_allowed() -> None:
    local = check_price("ollama", "mistral:7b", [], CAP)
    assert local.allowed and local.price == FREE
    for provider in ("openrouter", "openai"):
        verdict = check_price(provider, "vendor/new-model", [], CAP)
        assert not verdict.allowed
        assert "not in the catalog" in verdict.reason
        assert "BENCHMARK_ALLOW_UNKNOWN_MODELS" in verdict.reason
    relaxed = Policy(Decimal(10), allow_unknown_models=True)
    assert check_price("openai", "vendor/new-model", [], relaxed).allowed


def test_a_local_catalog_model_is_free_and_the_strictest_entry_decides() -> None:
    assert check_price("ollama", "llama3.1:8b", [LOCAL], CAP).price == FREE
    dear_twin = CatalogPrice("openrouter", "llama3.1:8b", Decimal("12"), Decimal("12"))
    assert not check_price("ollama", "llama3.1:8b", [LOCAL, dear_twin], CAP).allowed


def stream(token_times: list[float], **fields: object) -> Stream:
    s = Stream(started=10.0, token_times=token_times, finished=token_times[-1] + 0.01)
    for k, v in fields.items():
        setattr(s, k, v)
    return s


def test_a_run_is_measured_from_the_chunk_times_and_the_servers_token_count() -> None:
    # 3 chunks carrying 7 tokens: the count comes from usage, not from the chunks
    s = stream([10.1, 10.13, 10.19], prompt_tokens=9, output_tokens=7, server_eval_ns=70_000_000)
    r = measure(0, s, Price(Decimal("1"), Decimal("2")))
    assert r.ok
    assert r.ttft_ms == pytest.approx(100)
    assert r.inter_token_ms == pytest.approx([30, 60])
    assert r.itl_mean_ms == pytest.approx(45)
    assert r.itl_p50_ms == pytest.approx(45)
    assert r.e2e_ms == pytest.approx(200)
    assert r.tpot_ms == pytest.approx(100 / 6)
    assert r.output_tokens == 7 and r.content_chunks == 3
    assert r.tokens_per_s == pytest.approx(35)
    assert r.server_tokens_per_s == pytest.approx(100)
    assert r.cost_usd == Decimal("0.000023") and r.cost_source == "catalog"


def test_the_servers_cost_wins_and_an_unknown_price_gives_no_cost() -> None:
    assert run_cost(Price(Decimal(1), Decimal(1)), 10, 10, Decimal("0.5")) == (
        Decimal("0.5"),
        "server",
    )
    assert run_cost(None, 10, 10, None) == (None, None)
    assert run_cost(FREE, 10, 10, None) == (Decimal(0), "catalog")


def test_a_run_without_usage_has_no_token_figures_and_errors_are_kept() -> None:
    r = measure(0, stream([10.1, 10.2]), None)
    assert r.ok and r.output_tokens is None and r.tokens_per_s is None and r.tpot_ms is None
    failed = measure(1, Stream(10.0, error_kind="timeout", error="no complete answer"), None)
    assert not failed.ok and failed.error_kind == "timeout"
    empty = measure(2, Stream(10.0, finished=10.5), None)
    assert not empty.ok and empty.error_kind == "empty_response"


def test_percentiles_interpolate_linearly() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 99) == 7.0


def ok_run(i: int, ttft: float, gaps: list[float], tokens: int) -> RunResult:
    return RunResult(
        i,
        True,
        ttft_ms=ttft,
        e2e_ms=ttft + sum(gaps),
        inter_token_ms=gaps,
        output_tokens=tokens,
        prompt_tokens=5,
        tokens_per_s=10.0,
        cost_usd=Decimal("0.001"),
    )


def test_the_summary_covers_runs_pools_gaps_and_counts_errors() -> None:
    results = [
        ok_run(0, 100, [10, 20], 5),
        ok_run(1, 200, [30], 6),
        RunResult(2, False, "timeout", "late"),
    ]
    s = summarize(results)
    assert (s.runs_ok, s.runs_failed) == (2, 1)
    assert s.ttft_ms is not None and s.ttft_ms.p50 == pytest.approx(150)
    assert s.inter_token_ms is not None and s.inter_token_ms.mean == pytest.approx(20)
    assert s.output_tokens == 11 and s.prompt_tokens == 10
    assert s.cost_usd == Decimal("0.002")
    assert s.errors == {"timeout": 1}


def job() -> BenchmarkRequested:
    return BenchmarkRequested(
        job_id=uuid.uuid4(), provider="ollama", model="m", task_type="chat", prompt="p", runs=2
    )


def test_a_job_fails_only_when_every_run_failed() -> None:
    j = job()
    partly = outcome(j, [ok_run(0, 1, [1], 2), RunResult(1, False, "http_status", "HTTP 500")])
    assert isinstance(partly, BenchmarkCompleted) and partly.summary.runs_failed == 1
    failed = outcome(j, [RunResult(0, False, "http_status", "HTTP 404: no model")] * 2)
    assert isinstance(failed, BenchmarkFailed)
    assert "every run failed" in failed.error and "HTTP 404" in failed.error
    assert failed.summary is not None and failed.summary.errors == {"http_status": 2}
    assert partly.event_id == failed.event_id == final_event_id(j.job_id)  # ends once


def test_a_claimed_job_does_not_start_when_refused_out_of_time_or_given_up() -> None:
    allowed = check_price("ollama", "m", [], CAP)
    assert start_refusal(1, 3, allowed, 10.0, 60) is None
    assert "gave up" in (start_refusal(4, 3, allowed, 10.0, 60) or "")
    assert (start_refusal(2, 3, allowed, 0.0, 60) or "").startswith(
        "time limit: the job ran longer than BENCHMARK_MAX_JOB_S=60s"
    )
    blocked = check_price("ollama", "openai/gpt-4", [GPT4], CAP)
    assert (start_refusal(1, 3, blocked, 10.0, 60) or "").startswith("benchmark_blocked: model too")


def test_a_job_cut_short_keeps_the_runs_it_finished() -> None:
    j = job()
    cut = cut_short(j, "cancelled on request", [ok_run(0, 100, [10], 3)])
    assert cut.error == "cancelled on request" and cut.event_id == final_event_id(j.job_id)
    assert cut.summary is not None and cut.summary.runs_ok == 1
    assert cut_short(j, "cancelled on request", []).summary is None


def test_the_quota_counts_queued_and_running_jobs() -> None:
    assert quota_refusal(2, 3) is None
    refusal = quota_refusal(3, 3) or ""
    assert "3 of your benchmark jobs" in refusal
    assert "BENCHMARK_MAX_ACTIVE_JOBS_PER_USER=3" in refusal


def test_itl_per_token_spreads_each_gap_over_the_tokens_its_chunk_held() -> None:
    # chunks of 3, 3 and 1 tokens, 30 ms then 10 ms apart
    s = stream([10.1, 10.13, 10.14], output_tokens=7, chunk_tokens=[3, 3, 1])
    r = measure(0, s, None)
    assert r.inter_token_ms == pytest.approx([30, 10])
    assert r.itl_per_token_ms == pytest.approx([10, 10, 10, 10])
    assert summarize([r]).itl_per_token_ms is not None
    assert measure(0, stream([10.1, 10.13], output_tokens=6), None).itl_per_token_ms == []
    assert per_token_gaps([1.0, 1.3], [2, 3]) == pytest.approx([0.1, 0.1, 0.1])


def test_the_clocks_of_a_run_give_ttfb_ttft_and_e2e() -> None:
    s = stream([10.1, 10.2], first_byte=10.05, sent=10.001)
    r = measure(0, s, None)
    assert r.ttfb_ms == pytest.approx(50) and r.ttft_ms == pytest.approx(100)
    assert r.e2e_ms == pytest.approx(210)


KEY = "sk-or-v1-0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "text",
    [
        f"HTTP 401: invalid credentials: Authorization: Bearer {KEY}",
        f'{{"error": {{"message": "bad key", "headers": {{"authorization": "Bearer {KEY}"}}}}}}',
        f"your key {KEY} is revoked",
        f"key={KEY[:20]}",  # cut off by a truncation
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc",
        '{"x-api-key": "anthropic-key-123"}',
    ],
)
def test_scrubbing_removes_keys_and_authorization_values(text: str) -> None:
    clean = scrub(text, [KEY])
    assert KEY[:12] not in clean and "eyJhbGciOiJIUzI1NiJ9" not in clean
    assert "anthropic-key-123" not in clean
    assert "[redacted]" in clean


def test_scrubbing_keeps_what_holds_no_secret() -> None:
    text = "HTTP 404 from http://gpu:11434/api/generate: model 'llama3' not found"
    assert scrub(text, [KEY]) == text


def test_the_highest_price_tier_counts_against_the_cap() -> None:
    tiered = CatalogPrice(
        "openrouter", "g/long", Decimal("2"), Decimal("8"), False, Decimal("4"), Decimal("16")
    )
    verdict = check_price("openrouter", "g/long", [tiered], CAP)
    assert not verdict.allowed
    assert "up to $4 per 1M prompt tokens and $16 per 1M completion tokens" in verdict.reason
    assert "highest price tier" in verdict.reason
    within = CatalogPrice(
        "openrouter", "g/long", Decimal("2"), Decimal("8"), False, Decimal("4"), Decimal("9")
    )
    allowed = check_price("openrouter", "g/long", [within], CAP)
    assert allowed.allowed and allowed.price == Price(Decimal("2"), Decimal("8"))  # base


def test_a_model_not_priced_per_token_is_never_free() -> None:
    image = CatalogPrice("openrouter", "v/image", None, None, priced_per_token=False)
    verdict = check_price("openrouter", "v/image", [image], Policy(Decimal(10), True, True))
    assert not verdict.allowed and verdict.reason.startswith("model not priced per token")


# Gemini-like tiers: base $1.25 / $10, from 200,000 prompt tokens $2.50 / $15, and a
# tier under another condition (a time window) that a run cannot tell and never applies
LONG = CatalogPrice(
    "openrouter",
    "g/long",
    Decimal("1.25"),
    Decimal("10"),
    highest_prompt_per_1m=Decimal("2.50"),
    highest_completion_per_1m=Decimal("15"),
    tiers=(
        Tier(200_000, Decimal("2.50"), Decimal("15")),
        Tier(None, Decimal("0.5"), Decimal("1")),
    ),
)


@pytest.mark.parametrize(
    ("prompt_tokens", "output_tokens", "expected"),
    [
        # worked out by hand: tokens x USD per 1M / 1,000,000
        (1_000, 500, "0.00625"),  # 1,000 x 1.25 + 500 x 10 = 6,250
        (199_999, 500, "0.25499875"),  # 199,999 x 1.25 + 5,000 = 254,998.75
        (200_000, 500, "0.5075"),  # the tier from its threshold: 500,000 + 7,500
        (250_000, 1_000, "0.64"),  # 625,000 + 15,000
    ],
)
def test_a_run_is_priced_by_the_tier_in_force_for_its_prompt(
    prompt_tokens: int, output_tokens: int, expected: str
) -> None:
    verdict = check_price("openrouter", "g/long", [LONG], Policy(Decimal(15)))
    assert verdict.allowed and verdict.price is not None
    s = stream([1.0, 1.1], prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    r = measure(0, s, verdict.price)
    assert r.cost_usd == Decimal(expected) and r.cost_source == "catalog"


def test_the_highest_threshold_reached_wins_whatever_the_order_of_the_tiers() -> None:
    price = Price(
        Decimal(1),
        Decimal(2),
        (Tier(1_000_000, Decimal(5), Decimal(9)), Tier(128_000, Decimal(3), Decimal(4))),
    )
    assert price.in_force(127_999) == (Decimal(1), Decimal(2))
    assert price.in_force(128_000) == (Decimal(3), Decimal(4))
    assert price.in_force(999_999) == (Decimal(3), Decimal(4))
    assert price.in_force(2_000_000) == (Decimal(5), Decimal(9))
    # no prompt count from the server: the base price (0 prompt tokens)
    assert run_cost(price, None, 1_000_000, None) == (Decimal(2), "catalog")
