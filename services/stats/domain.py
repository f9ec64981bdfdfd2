"""Pure decisions of stats: what an event adds to the work records, what a call cost, and
how a leaderboard is ranked with honest uncertainty."""

from __future__ import annotations

import math
import uuid
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

from contracts.events import (
    ModelDismissed,
    ModelRewarded,
    PriceTier,
    SubtaskCompleted,
)

MILLION = Decimal(1_000_000)
# Beyond these an event is garbage, not work: its sums would overflow the records' bigint.
MAX_TOKENS_PER_CALL = 10**12
MAX_BRAINS_PER_REWARD = 10**9


class PriceSource(StrEnum):
    EVENT = "event"  # the event carried cost_usd
    CATALOG = "catalog"  # priced by stats from model.synced, at the price of the call's time
    UNKNOWN = "unknown"  # no price: cost_usd is null and unknown_reason says why


class UnknownReason(StrEnum):
    NO_PRICE_YET = "no_catalog_price_at_call_time"
    VARIABLE_PRICE = "variable_price"
    NOT_PRICED_PER_TOKEN = "not_priced_per_token"


class Unacceptable(ValueError):
    """An event that can never be applied (its numbers are beyond any real call)."""


# --- costs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceInForce:
    """A model's catalog price at some moment (from the newest model.synced before it)."""

    prompt_price_per_1m: Decimal | None
    completion_price_per_1m: Decimal | None
    variable_price: bool
    price_tiers: tuple[PriceTier, ...] = ()


@dataclass(frozen=True)
class CostEntry:
    """One row of the ledger (llm_costs): a call and what it cost."""

    event_id: object
    user_id: str
    model_id: str
    session_id: str
    called_at: datetime
    prompt_tokens: int
    completion_tokens: int
    prompt_price_per_1m: Decimal | None
    completion_price_per_1m: Decimal | None
    cost_usd: Decimal | None
    price_source: PriceSource
    unknown_reason: UnknownReason | None


def calls_to_price(events: Iterable[SubtaskCompleted]) -> dict[str, tuple[datetime, datetime]]:
    """The models the catalog must price (calls without their own cost), each with the
    span of its calls' times: what one lookup of the batch's prices needs."""
    spans: dict[str, tuple[datetime, datetime]] = {}
    for e in events:
        if e.cost_usd is None:
            since, until = spans.get(e.model_id, (e.completed_at, e.completed_at))
            spans[e.model_id] = (min(since, e.completed_at), max(until, e.completed_at))
    return spans


def price_at(history: Sequence[tuple[datetime, PriceInForce]], at: datetime) -> PriceInForce | None:
    """The price in force at `at`: the newest of `history` (oldest first, each from its
    time on) from no later than `at`; the last listed wins a tie. None: none yet."""
    i = bisect_right(history, at, key=lambda entry: entry[0])
    return history[i - 1][1] if i else None


def unit_prices(price: PriceInForce, prompt_tokens: int) -> tuple[Decimal, Decimal] | None:
    """The per-1M prices a call of `prompt_tokens` pays: the highest tier it reaches by
    prompt length, else the base prices. Tiers with another condition (a time window) are
    not known to apply, so they are not used. None: no per-token price."""
    if price.variable_price or price.prompt_price_per_1m is None:
        return None
    if price.completion_price_per_1m is None:
        return None
    reached = [
        t
        for t in price.price_tiers
        if t.min_prompt_tokens is not None and prompt_tokens >= t.min_prompt_tokens
    ]
    if reached:
        tier = max(reached, key=lambda t: t.min_prompt_tokens or 0)
        return tier.prompt_price_per_1m, tier.completion_price_per_1m
    return price.prompt_price_per_1m, price.completion_price_per_1m


def price_call(event: SubtaskCompleted, price: PriceInForce | None) -> CostEntry:
    """What one call cost: the event's own cost when it carries one, else the catalog price
    in force at the call's time, else unknown with the reason (never 0)."""
    check_tokens(event)
    prompt = completion = cost = None
    reason: UnknownReason | None = None
    if event.cost_usd is not None:
        source, cost = PriceSource.EVENT, event.cost_usd
    elif price is None:
        source, reason = PriceSource.UNKNOWN, UnknownReason.NO_PRICE_YET
    elif (prices := unit_prices(price, event.prompt_tokens)) is None:
        source = PriceSource.UNKNOWN
        reason = (
            UnknownReason.VARIABLE_PRICE
            if price.variable_price
            else UnknownReason.NOT_PRICED_PER_TOKEN
        )
    else:
        prompt, completion = prices
        source = PriceSource.CATALOG
        cost = (event.prompt_tokens * prompt + event.completion_tokens * completion) / MILLION
    return CostEntry(
        event.event_id,
        event.user_id,
        event.model_id,
        event.session_id,
        event.completed_at,
        event.prompt_tokens,
        event.completion_tokens,
        prompt,
        completion,
        cost,
        source,
        reason,
    )


def check_tokens(event: SubtaskCompleted) -> None:
    if max(event.prompt_tokens, event.completion_tokens) > MAX_TOKENS_PER_CALL:
        raise Unacceptable(f"more than {MAX_TOKENS_PER_CALL} tokens in one call")


# --- what events add to the records ------------------------------------------------------


@dataclass(frozen=True)
class Contribution:
    """What one event adds to one (user, model, session), at the event's time."""

    user_id: str
    model_id: str
    session_id: str
    at: datetime
    responses: int = 0
    brains: int = 0
    dismissals: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_calls: int = 0
    dismissal_reason: str | None = None


@dataclass(frozen=True)
class Batch:
    """What one consumer's batch adds: each event's contribution (`event_ids[i]` is the
    event of `contributions[i]`), and the calls of the cost ledger among them."""

    consumer: str
    event_ids: Sequence[uuid.UUID]
    contributions: Sequence[Contribution]
    costs: Sequence[CostEntry] = ()


def from_call(entry: CostEntry) -> Contribution:
    return Contribution(
        entry.user_id,
        entry.model_id,
        entry.session_id,
        entry.called_at,
        responses=1,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        cost_usd=entry.cost_usd if entry.cost_usd is not None else Decimal(0),
        unpriced_calls=1 if entry.cost_usd is None else 0,
    )


def from_reward(event: ModelRewarded) -> Contribution:
    if event.brains > MAX_BRAINS_PER_REWARD:
        raise Unacceptable(f"more than {MAX_BRAINS_PER_REWARD} brains in one reward")
    return Contribution(
        event.user_id, event.model_id, event.session_id, event.occurred_at, brains=event.brains
    )


def from_dismissal(event: ModelDismissed) -> Contribution:
    return Contribution(
        event.user_id,
        event.model_id,
        event.session_id,
        event.occurred_at,
        dismissals=1,
        dismissal_reason=event.reason,
    )


# --- the leaderboard ---------------------------------------------------------------------

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval


@dataclass(frozen=True)
class Interval:
    rate: float
    low: float
    high: float


def wilson(successes: int, trials: int, z: float = Z95) -> Interval:
    """Wilson's score interval of a proportion (good at small counts and near 0 and 1,
    where the normal approximation's interval leaves [0, 1] or collapses to a point)."""
    if trials <= 0:
        raise ValueError("no trials")
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials)) / (1 + z2n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def poisson_score(events: int, exposure: int, z: float = Z95) -> Interval:
    """The score interval of a rate of events per unit of exposure (Wilson's construction
    for a Poisson count): brains per response is not a proportion, since one response may
    earn several brains, so it cannot have a binomial interval."""
    if exposure <= 0:
        raise ValueError("no exposure")
    half = z * math.sqrt(events + z * z / 4)
    centre = events + z * z / 2
    return Interval(
        events / exposure, max(0.0, (centre - half) / exposure), (centre + half) / exposure
    )


@dataclass(frozen=True)
class ModelCounts:
    model_id: str
    responses: int
    brains: int
    sessions_appeared: int
    sessions_dismissed: int


@dataclass(frozen=True)
class Standing:
    """A model's line on a leaderboard; rank None: not enough data to rank it."""

    counts: ModelCounts
    brains_per_response: Interval | None
    dismissals_per_appearance: Interval | None
    rank: int | None


def leaderboard(models: Sequence[ModelCounts], min_responses: int) -> list[Standing]:
    """Rank models by brains per response the way LMArena ranks: a model's rank is one plus
    the number of models whose interval lies wholly above its own, so models whose intervals
    overlap share ranks. Models with fewer than `min_responses` responses are listed, unranked
    ("not enough data"), after the ranked ones."""
    ranked: list[tuple[ModelCounts, Interval, Interval | None]] = []
    unranked: list[Standing] = []
    for m in models:
        brains = poisson_score(m.brains, m.responses) if m.responses else None
        # a window may hold a dismissal of a session that appeared before it
        appearances = max(m.sessions_appeared, m.sessions_dismissed)
        dismissals = wilson(m.sessions_dismissed, appearances) if appearances else None
        if brains is not None and m.responses >= min_responses:
            ranked.append((m, brains, dismissals))
        else:
            unranked.append(Standing(m, brains, dismissals, None))
    lows = [brains.low for _, brains, _ in ranked]
    result = [
        Standing(m, brains, dismissals, 1 + sum(low > brains.high for low in lows))
        for m, brains, dismissals in ranked
    ]
    result.sort(
        key=lambda s: (s.rank or 0, -s.counts.brains, -s.counts.responses, s.counts.model_id)
    )
    unranked.sort(key=lambda s: (-s.counts.responses, s.counts.model_id))
    return result + unranked
