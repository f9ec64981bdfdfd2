"""The fleet's one price-cap rule (contracts.events): sync's selection and API filter and
benchmark's price guard all judge a price by it."""

from __future__ import annotations

from decimal import Decimal as D

from contracts.events import highest_prices, within_price_cap


def test_the_highest_prices_are_taken_over_the_base_and_every_tier_separately() -> None:
    tiers = [(D("3"), D("1")), (D("2"), D("9"))]
    assert highest_prices(D("1"), D("4"), tiers) == (D("3"), D("9"))
    assert highest_prices(D("1"), D("4")) == (D("1"), D("4"))


def test_a_null_base_price_is_unknown_whatever_the_tiers_say() -> None:
    assert highest_prices(None, D("1"), [(D("1"), D("1"))]) is None
    assert highest_prices(D("1"), None) is None


def test_the_cap_holds_for_prompt_and_completion_inclusive() -> None:
    cap = D("10")
    assert within_price_cap((D("10"), D("10")), cap)
    assert not within_price_cap((D("10.000001"), D("0")), cap)
    assert not within_price_cap((D("0"), D("10.000001")), cap)


def test_an_unknown_price_is_never_within_a_cap() -> None:
    assert not within_price_cap(None, D("1000000"))
