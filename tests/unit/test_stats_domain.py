from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from contracts.events import ModelRewarded, PriceTier, SubtaskCompleted
from services.stats.domain import (
    ModelCounts,
    PriceInForce,
    PriceSource,
    Unacceptable,
    UnknownReason,
    calls_to_price,
    from_call,
    from_reward,
    leaderboard,
    poisson_score,
    price_at,
    price_call,
    wilson,
)

T0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)


def done(
    model: str,
    session: str,
    minutes: int,
    tokens: int = 1,
    cost: str | None = None,
    user: str = "u",
) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p",
        subtask_id=f"{model}{minutes}",
        model_id=model,
        user_id=user,
        session_id=session,
        prompt_tokens=tokens,
        completion_tokens=2 * tokens,
        completed_at=T0 + timedelta(minutes=minutes),
        cost_usd=Decimal(cost) if cost else None,
    )


PRICE = PriceInForce(Decimal("2.5"), Decimal("10"), False)


# --- costs -------------------------------------------------------------------------------


def test_a_call_is_priced_by_its_own_cost_first_then_by_the_catalog() -> None:
    own = price_call(done("a", "s", 0, tokens=1000, cost="0.5"), PRICE)
    assert (own.price_source, own.cost_usd, own.prompt_price_per_1m) == (
        "event",
        Decimal("0.5"),
        None,
    )
    priced = price_call(done("a", "s", 0, tokens=1000), PRICE)
    # 1000 prompt tokens at 2.5/1M + 2000 completion tokens at 10/1M
    assert priced.price_source == PriceSource.CATALOG
    assert priced.cost_usd == Decimal("0.0225")
    assert (priced.prompt_price_per_1m, priced.completion_price_per_1m) == (
        Decimal("2.5"),
        Decimal(10),
    )


def test_a_long_prompt_pays_the_highest_tier_it_reaches() -> None:
    tiers = (
        PriceTier(min_prompt_tokens=1000, prompt_price_per_1m=5, completion_price_per_1m=20),
        PriceTier(min_prompt_tokens=200_000, prompt_price_per_1m=9, completion_price_per_1m=30),
        PriceTier(min_prompt_tokens=None, prompt_price_per_1m=0, completion_price_per_1m=0),
    )
    price = PriceInForce(Decimal("2.5"), Decimal("10"), False, tiers)
    assert price_call(done("a", "s", 0, tokens=999), price).prompt_price_per_1m == Decimal("2.5")
    assert price_call(done("a", "s", 0, tokens=1000), price).prompt_price_per_1m == 5
    assert price_call(done("a", "s", 0, tokens=300_000), price).prompt_price_per_1m == 9


@pytest.mark.parametrize(
    ("price", "reason"),
    [
        (None, UnknownReason.NO_PRICE_YET),
        (PriceInForce(None, None, True), UnknownReason.VARIABLE_PRICE),
        (PriceInForce(None, None, False), UnknownReason.NOT_PRICED_PER_TOKEN),
    ],
)
def test_an_unknown_price_is_unknown_with_a_reason_never_zero(
    price: PriceInForce | None, reason: UnknownReason
) -> None:
    entry = price_call(done("router/auto", "s", 0, tokens=100), price)
    assert (entry.price_source, entry.cost_usd, entry.unknown_reason) == ("unknown", None, reason)
    contribution = from_call(entry)
    assert (contribution.unpriced_calls, contribution.cost_usd) == (1, Decimal(0))


def test_a_free_model_costs_zero_and_counts_as_priced() -> None:
    entry = price_call(
        done("llama3", "s", 0, tokens=100), PriceInForce(Decimal(0), Decimal(0), False)
    )
    assert (entry.price_source, entry.cost_usd) == (PriceSource.CATALOG, Decimal(0))
    assert from_call(entry).unpriced_calls == 0


def test_numbers_beyond_any_real_call_are_refused() -> None:
    with pytest.raises(Unacceptable):
        price_call(done("a", "s", 0, tokens=10**13), PRICE)
    with pytest.raises(Unacceptable):
        from_reward(ModelRewarded(user_id="u", session_id="s", model_id="a", brains=10**10))


# --- folding a batch ---------------------------------------------------------------------


# --- intervals and ranks -----------------------------------------------------------------


def score_bound(
    statistic: Callable[[float], float], estimate: float, lo: float, hi: float, z: float
) -> float:
    """Where the score statistic equals z, by bisection (independent of any closed form)."""
    for _ in range(200):
        mid = (lo + hi) / 2
        if (statistic(mid) > z) == (mid < estimate):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


Z = 1.959963984540054


@pytest.mark.parametrize(("x", "n"), [(0, 10), (1, 10), (5, 10), (10, 10), (3, 1000), (481, 977)])
def test_wilson_bounds_are_where_the_binomial_score_test_reaches_its_95_percent_limit(
    x: int, n: int
) -> None:
    p_hat = x / n

    def score(p: float) -> float:
        return abs(p_hat - p) / math.sqrt(p * (1 - p) / n)

    interval = wilson(x, n)
    low = 0.0 if x == 0 else score_bound(score, p_hat, 1e-12, p_hat, Z)
    high = 1.0 if x == n else score_bound(score, p_hat, p_hat, 1 - 1e-12, Z)
    assert interval.rate == p_hat
    assert interval.low == pytest.approx(low, abs=1e-9)
    assert interval.high == pytest.approx(high, abs=1e-9)
    # and a textbook value: 5 of 10 -> (0.2366, 0.7634)
    if (x, n) == (5, 10):
        assert (round(interval.low, 4), round(interval.high, 4)) == (0.2366, 0.7634)


@pytest.mark.parametrize(("x", "n"), [(0, 10), (3, 10), (25, 10), (500, 400)])
def test_the_rate_interval_is_where_the_poisson_score_test_reaches_its_95_percent_limit(
    x: int, n: int
) -> None:
    rate = x / n

    def score(lam: float) -> float:
        return abs(x - n * lam) / math.sqrt(n * lam)

    interval = poisson_score(x, n)
    low = 0.0 if x == 0 else score_bound(score, rate, 1e-12, rate, Z)
    high = score_bound(score, rate, max(rate, 1e-12), rate + 100, Z)
    assert interval.low == pytest.approx(low, abs=1e-9)
    assert interval.high == pytest.approx(high, abs=1e-9)


def counts(
    model: str, responses: int, brains: int, appeared: int = 10, dismissed: int = 0
) -> ModelCounts:
    return ModelCounts(model, responses, brains, appeared, dismissed)


def test_ranks_separate_only_models_whose_intervals_do_not_overlap() -> None:
    board = leaderboard(
        [
            counts("good", 1000, 900),
            counts("also-good", 1000, 880),  # overlaps "good": shares its rank
            counts("poor", 1000, 100),
            counts("new", 5, 5),  # too few responses to rank
        ],
        min_responses=30,
    )
    assert [(s.counts.model_id, s.rank) for s in board] == [
        ("good", 1),
        ("also-good", 1),
        ("poor", 3),
        ("new", None),
    ]
    new = board[-1]
    assert new.brains_per_response is not None and new.brains_per_response.rate == 1.0


def test_a_model_with_nothing_to_rate_has_no_interval() -> None:
    [s] = leaderboard([counts("x", 0, 2, appeared=0, dismissed=0)], min_responses=1)
    assert (s.rank, s.brains_per_response, s.dismissals_per_appearance) == (None, None, None)
    [d] = leaderboard([counts("y", 40, 0, appeared=2, dismissed=3)], min_responses=1)
    assert d.dismissals_per_appearance is not None and d.dismissals_per_appearance.rate == 1.0


def test_a_call_pays_the_newest_price_from_no_later_than_its_time() -> None:
    cheap, dear, dearer = (PriceInForce(Decimal(p), Decimal(p), False) for p in "123")
    history = [(T0, cheap), (T0 + timedelta(hours=1), dear), (T0 + timedelta(hours=1), dearer)]
    assert price_at(history, T0 - timedelta(seconds=1)) is None  # before any price
    assert price_at(history, T0) is cheap  # in force from its own time on
    assert price_at(history, T0 + timedelta(minutes=59)) is cheap
    assert price_at(history, T0 + timedelta(hours=1)) is dearer  # a tie: the last listed
    assert price_at(history, T0 + timedelta(days=9)) is dearer
    assert price_at([], T0) is None


def test_only_calls_without_their_own_cost_are_looked_up_over_the_span_of_their_times() -> None:
    calls = [done("a", "s", 5), done("a", "s", 1), done("b", "s", 3, cost="1"), done("c", "s", 2)]
    assert calls_to_price(calls) == {
        "a": (T0 + timedelta(minutes=1), T0 + timedelta(minutes=5)),
        "c": (T0 + timedelta(minutes=2), T0 + timedelta(minutes=2)),
    }
