"""stats on real NATS and PostgreSQL: dismissals, brains, responses and costs counted once
however often they are delivered; the roster, the record, spend and leaderboards are each
user's own; every new table is held to row-level security."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest
from nats.js import JetStreamContext

from contracts.events import (
    Event,
    ModelDismissed,
    ModelRewarded,
    ModelSynced,
    SubtaskCompleted,
)
from services.runtime.db import Login, acting_for, create_pool
from services.runtime.service import Runtime
from services.stats import db
from services.stats.app import build
from services.stats.config import StatsSettings
from services.stats.domain import (
    Batch,
    Contribution,
    from_call,
    from_dismissal,
    from_reward,
    price_call,
)
from services.stats.handlers import Writer
from tests.conftest import Infra, bearer, eventually, running

ALICE, BOB = bearer("alice", "user"), bearer("bob", "user")
OPERATOR = bearer("ops", "operator")
NOW = datetime.now(UTC).replace(microsecond=0)
T_PRICE_1, T_PRICE_2 = NOW - timedelta(hours=3), NOW - timedelta(hours=2)


async def publish(js: JetStreamContext, *events: Event, copies: int = 1) -> None:
    """Each event `copies` times under different message ids, as a client retrying past
    JetStream's duplicate window would: only the consumers' inboxes can drop the copies."""
    for event in events:
        for _ in range(copies):
            await js.publish(
                event.subject,
                event.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(uuid.uuid4())},
            )


def call(user: str, model: str, session: str, at: datetime, **kw: Any) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p",
        subtask_id=str(uuid.uuid4()),
        model_id=model,
        user_id=user,
        session_id=session,
        completed_at=at,
        **kw,
    )


def price(
    model: str, at: datetime, prompt: str | None, completion: str | None, **kw: Any
) -> ModelSynced:
    return ModelSynced(
        occurred_at=at,
        provider="openrouter",
        model_id=model,
        name=model,
        change="changed",
        status="active",
        prompt_price_per_1m=Decimal(prompt) if prompt else None,
        completion_price_per_1m=Decimal(completion) if completion else None,
        **kw,
    )


@pytest.fixture
async def stats(
    infra: Infra, database_url: str, js: JetStreamContext
) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    settings = StatsSettings(
        nats_url=infra.nats_url, database_url=database_url, stats_leaderboard_min_responses=3
    )
    async with running(build(settings)) as started:
        yield started


async def inbox_count(runtime: Runtime) -> int:
    async with runtime.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT count(*) FROM inbox"))


async def test_every_event_counts_once_and_the_record_roster_and_spend_show_it(
    stats: tuple[Runtime, httpx.AsyncClient], js: JetStreamContext
) -> None:
    runtime, client = stats
    # prices first (the catalog), then the calls they price
    await publish(
        js,
        price("m/a", T_PRICE_1, "1", "2"),
        price("m/a", T_PRICE_2, "10", "20"),  # a price change: later calls pay this
        price("router/auto", T_PRICE_1, None, None, variable_price=True),
    )
    await eventually(lambda: _count(runtime, "model_prices", 3), what="the price table")
    events: list[Event] = [
        call("alice", "m/a", "s1", T_PRICE_1 + timedelta(minutes=1), prompt_tokens=1_000_000),
        call("alice", "m/a", "s1", T_PRICE_2 + timedelta(minutes=1), completion_tokens=1_000_000),
        call("alice", "m/a", "s1", NOW, cost_usd=Decimal("0.5")),
        call("alice", "router/auto", "s1", NOW, prompt_tokens=10),
        call("alice", "m/b", "s1", NOW, prompt_tokens=10),  # never in the catalog
        ModelRewarded(user_id="alice", session_id="s1", model_id="m/a", brains=2),
        ModelRewarded(user_id="alice", session_id="s1", model_id="m/a", brains=1),
        ModelDismissed(user_id="alice", session_id="s1", model_id="m/b", reason="too slow"),
        call("bob", "m/a", "s1", NOW, prompt_tokens=7),
        ModelDismissed(user_id="bob", session_id="s1", model_id="m/a", reason="bob's reason"),
    ]
    await publish(js, *events, copies=3)
    await eventually(lambda: _inbox_has(runtime, 3 + len(events)), what="every event applied")

    record = (await client.get("/v1/models/m/a/stats", headers=ALICE)).json()
    assert (record["response_count"], record["total_brains"], record["dismissal_count"]) == (
        3,
        3,
        0,
    )
    assert (record["user_id"], record["sessions_appeared"]) == ("alice", 1)
    # 1M prompt tokens at 1/1M, then 1M completion tokens at 20/1M, then the event's 0.5
    assert Decimal(record["cost_usd"]) == Decimal("21.5")
    assert record["unpriced_calls"] == 0
    [session] = record["sessions"]
    assert (session["session_id"], session["total_brains"]) == ("s1", 3)

    roster = (await client.get("/v1/sessions/s1/roster", headers=ALICE)).json()
    status = {m["model_id"]: (m["status"], m["dismissal_reason"]) for m in roster["models"]}
    assert status == {
        "m/a": ("on_panel", None),
        "router/auto": ("on_panel", None),
        "m/b": ("dismissed", "too slow"),
    }
    bob_roster = (await client.get("/v1/sessions/s1/roster", headers=BOB)).json()
    assert [(m["model_id"], m["status"]) for m in bob_roster["models"]] == [("m/a", "dismissed")]
    assert (
        await client.get("/v1/sessions/s1/roster", headers=bearer("carol", "user"))
    ).status_code == 404

    ledger = (await client.get("/v1/costs", headers=ALICE)).json()
    assert len(ledger) == 5
    by_model = {(c["model_id"], c["price_source"], c["unknown_reason"]) for c in ledger}
    assert ("router/auto", "unknown", "variable_price") in by_model
    assert ("m/b", "unknown", "no_catalog_price_at_call_time") in by_model
    assert all(c["cost_usd"] is None for c in ledger if c["price_source"] == "unknown")
    catalog = sorted(
        (c["prompt_price_per_1m"], c["cost_usd"]) for c in ledger if c["price_source"] == "catalog"
    )
    assert [(Decimal(p), Decimal(c)) for p, c in catalog] == [
        (Decimal(1), Decimal(1)),
        (Decimal(10), Decimal(20)),
    ]

    spend = (await client.get("/v1/spend", params={"group_by": "model"}, headers=ALICE)).json()
    assert Decimal(spend["total"]["cost_usd"]) == Decimal("21.5")
    assert (spend["total"]["calls"], spend["total"]["unpriced_calls"]) == (5, 2)
    assert {g["key"] for g in spend["groups"]} == {"m/a", "m/b", "router/auto"}
    for group_by in ("session", "day"):
        r = await client.get("/v1/spend", params={"group_by": group_by, "days": 7}, headers=ALICE)
        assert Decimal(r.json()["total"]["cost_usd"]) == Decimal("21.5"), group_by
    bob_spend = (await client.get("/v1/spend", headers=BOB)).json()
    assert (bob_spend["total"]["calls"], bob_spend["total"]["unpriced_calls"]) == (1, 0)

    mine = (await client.get("/v1/stats/models", params={"sort": "cost_usd"}, headers=ALICE)).json()
    assert mine[0]["model_id"] == "m/a"
    assert {m["model_id"] for m in mine} == {"m/a", "m/b", "router/auto"}
    assert (
        await client.get("/v1/stats/models", params={"sort": "user_id"}, headers=ALICE)
    ).status_code == 422


async def test_leaderboards_rank_a_users_own_models_and_operators_see_everyone_but_canaries(
    stats: tuple[Runtime, httpx.AsyncClient], js: JetStreamContext
) -> None:
    runtime, client = stats
    events: list[Event] = []
    for user in ("alice", "canary:guardian"):
        for i in range(20):
            events.append(call(user, "m/good", f"s{i % 4}", NOW))
            events.append(ModelRewarded(user_id=user, session_id=f"s{i % 4}", model_id="m/good"))
            events.append(call(user, "m/poor", f"s{i % 4}", NOW))
        events.append(call(user, "m/new", "s0", NOW))
        events.append(ModelDismissed(user_id=user, session_id="s0", model_id="m/poor"))
    await publish(js, *events)
    await eventually(lambda: _inbox_has(runtime, len(events)), what="every event applied")

    for window in ("7d", "30d", "all"):
        board = (
            await client.get("/v1/leaderboard", params={"window": window}, headers=ALICE)
        ).json()
        lines = {m["model_id"]: m for m in board["models"]}
        assert [m["model_id"] for m in board["models"]] == ["m/good", "m/poor", "m/new"], window
        assert (lines["m/good"]["rank"], lines["m/poor"]["rank"]) == (1, 2)
        assert (lines["m/new"]["rank"], lines["m/new"]["status"]) == (None, "not_enough_data")
        poor = lines["m/poor"]
        assert (poor["sessions_appeared"], poor["sessions_dismissed"]) == (4, 1)
        assert poor["dismissals_per_appearance"]["rate"] == 0.25
        good = lines["m/good"]["brains_per_response"]
        assert good["low"] < 1.0 == good["rate"] < good["high"]

    assert (await client.get("/v1/leaderboard", headers=BOB)).json()["models"] == []
    assert (await client.get("/v1/leaderboard/global", headers=ALICE)).status_code == 403
    everyone = (await client.get("/v1/leaderboard/global", headers=OPERATOR)).json()
    # the canary sent the same again: counted for itself, never in the global board
    assert {m["model_id"]: m["responses"] for m in everyone["models"]} == {
        "m/good": 20,
        "m/poor": 20,
        "m/new": 1,
    }
    canary = (await client.get("/v1/leaderboard", headers=bearer("canary:guardian", "user"))).json()
    assert {m["model_id"] for m in canary["models"]} == {"m/good", "m/poor", "m/new"}
    # the consumers only append the global days; the fold moves them, the board is the same
    await eventually(lambda: _count(runtime, "model_daily_pending", 0), what="the global fold")
    assert (await client.get("/v1/leaderboard/global", headers=OPERATOR)).json() == everyone
    async with runtime.pool.acquire() as conn:
        folded = await conn.fetchval("SELECT sum(response_count) FROM model_daily")
    assert folded == 41


async def test_concurrent_folds_move_each_pending_global_row_once(
    stats: tuple[Runtime, httpx.AsyncClient],
) -> None:
    runtime, client = stats
    rows = [(NOW.date() - timedelta(days=i % 3), f"m/{i % 5}", i) for i in range(1, 301)]
    async with runtime.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO model_daily_pending (day, model_id, response_count, total_brains)"
            " VALUES ($1, $2, 1, $3)",
            rows,
        )
    before = (await client.get("/v1/leaderboard/global", headers=OPERATOR)).json()

    async def fold() -> None:
        async with runtime.pool.acquire() as conn, conn.transaction():
            await db.fold_global_days(conn)

    await asyncio.gather(*(fold() for _ in range(4)))
    async with runtime.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM model_daily_pending") == 0
        folded = await conn.fetch(
            "SELECT sum(response_count) AS responses, sum(total_brains) AS brains FROM model_daily"
        )
    assert [tuple(r) for r in folded] == [(300, sum(range(1, 301)))]
    assert (await client.get("/v1/leaderboard/global", headers=OPERATOR)).json() == before


async def test_every_new_table_shows_a_user_their_own_rows_only_through_sql(
    stats: tuple[Runtime, httpx.AsyncClient], js: JetStreamContext, database_url: str
) -> None:
    runtime, _ = stats
    events: list[Event] = []
    for user in ("alice", "bob"):
        events += [
            call(user, "m/a", "s", NOW, prompt_tokens=1),
            ModelRewarded(user_id=user, session_id="s", model_id="m/a"),
            ModelDismissed(user_id=user, session_id="s", model_id="m/a"),
        ]
    await publish(js, price("m/a", T_PRICE_1, "1", "1"), *events)
    await eventually(lambda: _inbox_has(runtime, 1 + len(events)), what="every event applied")
    pool = await create_pool(Login(database_url, "stats", "stats_app"), 1, "test")
    try:
        for table in ("model_statistics", "llm_costs", "user_model_totals", "user_model_daily"):
            for user in ("alice", "bob"):
                async with acting_for(pool, "stats", {"sub": user}) as conn:
                    seen = await conn.fetch(f"SELECT DISTINCT user_id FROM {table}")
                    assert [r["user_id"] for r in seen] == [user], table
                    other = "bob" if user == "alice" else "alice"
                    rows = await conn.fetchval(
                        f"SELECT count(*) FROM {table} WHERE user_id = $1", other
                    )
                    assert rows == 0, table
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("SET LOCAL ROLE stats_user")  # no claims: nothing
                assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table
        # the catalog's prices and the global aggregate are no user's: not for stats_user
        for table in ("model_prices", "model_daily", "model_daily_pending"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with acting_for(pool, "stats", {"sub": "alice"}) as conn:
                    await conn.fetch(f"SELECT * FROM {table}")
    finally:
        await pool.close()


async def test_garbage_numbers_are_dead_lettered_not_counted(
    stats: tuple[Runtime, httpx.AsyncClient], js: JetStreamContext
) -> None:
    runtime, client = stats
    huge = ModelRewarded(user_id="alice", session_id="s", model_id="m/a", brains=10**30)
    fine = ModelRewarded(user_id="alice", session_id="s", model_id="m/a", brains=2)
    await publish(js, huge, fine)
    await eventually(lambda: _inbox_has(runtime, 1), what="the good reward applied")
    record = (await client.get("/v1/models/m/a/stats", headers=ALICE)).json()
    assert record["total_brains"] == 2

    async def parked() -> bool:
        info = await js.stream_info("DEADLETTER")
        return info.state.messages == 1

    await eventually(parked, what="the huge reward dead-lettered")


async def _count(runtime: Runtime, table: str, expected: int) -> bool:
    async with runtime.pool.acquire() as conn:
        return bool(await conn.fetchval(f"SELECT count(*) FROM {table}") == expected)


async def _inbox_has(runtime: Runtime, expected: int) -> bool:
    """Every distinct event applied, and every copy of every message delivered and acked
    (so a copy counted twice would already show)."""
    n = await inbox_count(runtime)
    assert n <= expected, f"{n} events applied, {expected} sent"
    if n != expected:
        return False
    for name, stream in CONSUMERS:
        info = await runtime.js.consumer_info(stream, name)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


CONSUMERS = (
    ("stats-subtask-completed", "PLANS"),
    ("stats-model-rewarded", "FEEDBACK"),
    ("stats-model-dismissed", "FEEDBACK"),
    ("stats-model-synced", "CATALOG"),
)


async def test_hostile_input_is_refused_or_finds_nothing_never_a_server_error(
    stats: tuple[Runtime, httpx.AsyncClient],
) -> None:
    _, client = stats
    for url, params in [
        ("/v1/sessions/a%00b/roster", {}),
        ("/v1/models/a%00b/stats", {}),
        ("/v1/costs", {"session_id": "a\x00b"}),
        ("/v1/costs", {"before": "2026-01-01T00:00:00"}),  # no time zone
        ("/v1/costs", {"before": "NaN"}),
        ("/v1/costs", {"limit": str(10**30)}),
        ("/v1/spend", {"days": str(10**30)}),
        ("/v1/spend", {"group_by": "user"}),
        ("/v1/leaderboard", {"window": "1y"}),
        ("/v1/stats/models", {"sort": "model_id; DROP TABLE llm_costs"}),
        (f"/v1/sessions/{'x' * 10_000}/roster", {}),
    ]:
        r = await client.get(url, params=params, headers=ALICE)
        assert r.status_code in (200, 404, 422), (url, params, r.status_code, r.text[:200])


async def test_a_batch_folds_into_records_days_totals_and_global_days_in_one_statement(
    stats: tuple[Runtime, httpx.AsyncClient],
) -> None:
    """What db.apply adds, table by table, for a batch out of order across two days."""
    runtime, _ = stats
    t0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)

    def at(minutes: int) -> datetime:
        return t0 + timedelta(minutes=minutes)

    def done(session: str, minutes: int, tokens: int = 1, cost: str | None = None) -> Any:
        c = call("u", "a", session, at(minutes), prompt_tokens=tokens)
        c = c.model_copy(update={"completion_tokens": 2 * tokens})
        if cost:
            c = c.model_copy(update={"cost_usd": Decimal(cost)})
        return from_call(price_call(c, None))

    batch = [
        done("s1", 5, tokens=3, cost="0.1"),
        done("s1", 1, cost="0.2"),
        done("s2", 2),  # no price: unpriced, never 0
        from_reward(
            ModelRewarded(user_id="u", session_id="s1", model_id="a", brains=3, occurred_at=at(0))
        ),
        from_dismissal(
            ModelDismissed(
                user_id="u", session_id="s1", model_id="a", reason="slow", occurred_at=at(9)
            )
        ),
        from_dismissal(
            ModelDismissed(
                user_id="u", session_id="s1", model_id="a", reason="wrong", occurred_at=at(7)
            )
        ),
        done("s1", 24 * 60, cost="2"),  # the next day
        from_call(price_call(call("canary:guardian", "a", "s9", at(0), cost_usd=Decimal(4)), None)),
    ]
    ids = [uuid.uuid4() for _ in batch]
    async with runtime.pool.acquire() as conn:
        assert await db.apply(conn, [Batch("stats-test", ids, batch)]) == {"stats-test": 8}
        s1 = await conn.fetchrow(
            "SELECT * FROM model_statistics WHERE user_id = 'u' AND session_id = 's1'"
        )
        days = await conn.fetch(
            "SELECT user_id, day, response_count, sessions_appeared, sessions_dismissed,"
            " cost_usd FROM user_model_daily ORDER BY user_id, day"
        )
        totals = await conn.fetchrow("SELECT * FROM user_model_totals WHERE user_id = 'u'")
        everyone = await conn.fetch(
            "SELECT day, response_count, cost_usd FROM model_daily_pending ORDER BY day"
        )
        # the same events again add nothing (the inbox has them), whatever else is new
        assert await db.apply(conn, [Batch("stats-test", ids, batch)]) == {}
        unchanged = await conn.fetchrow("SELECT * FROM user_model_totals WHERE user_id = 'u'")
        # another event alike adds up, and changes no roster
        again_ids = [uuid.uuid4(), ids[0]]
        assert await db.apply(conn, [Batch("stats-test", again_ids, batch[:2])]) == {
            "stats-test": 1
        }
        again = await conn.fetchrow("SELECT * FROM user_model_totals WHERE user_id = 'u'")
    assert s1 is not None and totals is not None and again is not None
    assert unchanged == totals
    assert (s1["response_count"], s1["prompt_tokens"], s1["completion_tokens"]) == (3, 5, 10)
    assert (s1["total_brains"], s1["dismissal_count"], s1["cost_usd"]) == (3, 2, Decimal("2.3"))
    assert s1["appeared_at"] == at(0)  # the reward, the earliest event, put it on the panel
    assert (s1["first_used_at"], s1["last_used_at"]) == (at(1), at(24 * 60))  # a reward is no use
    # the earliest dismissal says when and why, whatever the order of arrival
    assert (s1["dismissed_at"], s1["dismissal_reason"]) == (at(7), "wrong")
    day1, day2 = t0.date(), (t0 + timedelta(days=1)).date()
    assert [tuple(r) for r in days] == [
        ("canary:guardian", day1, 1, 1, 0, Decimal(4)),
        ("u", day1, 3, 2, 1, Decimal("0.3")),  # two sessions appeared, one dismissed
        ("u", day2, 1, 0, 0, Decimal(2)),
    ]
    assert (totals["response_count"], totals["unpriced_calls"], totals["cost_usd"]) == (
        4,
        1,
        Decimal("2.3"),
    )
    assert (totals["first_used_at"], totals["last_used_at"]) == (at(1), at(24 * 60))
    assert (totals["sessions_appeared"], totals["sessions_dismissed"]) == (2, 1)
    # the global days leave the canary out
    assert [tuple(r) for r in everyone] == [(day1, 3, Decimal("0.3")), (day2, 1, Decimal(2))]
    assert (again["response_count"], again["sessions_appeared"]) == (5, 2)
    assert again["cost_usd"] == Decimal("2.4")


async def test_the_writer_writes_batches_that_wait_together_and_fails_only_the_one_at_fault(
    stats: tuple[Runtime, httpx.AsyncClient],
) -> None:
    """Four consumers' batches at once, each on its own connection: the first is written at
    once, the three that waited meanwhile in one statement; one of those is refused by
    PostgreSQL (a NUL byte in a text), and only its consumer hears of it."""
    runtime, _ = stats
    writer = Writer()

    def reward(consumer: str, user: str, brains: int) -> Batch:
        c = Contribution(user, "m/w", "w", NOW, brains=brains)
        return Batch(consumer, [uuid.uuid4()], [c])

    batches = [
        reward("c1", "writer-1", 1),
        reward("c2", "writer-2", 2),
        reward("c3", "bad\x00user", 3),
        reward("c4", "writer-4", 4),
    ]

    async def write(batch: Batch) -> int:
        async with runtime.pool.acquire() as conn:
            return await writer.apply(conn, batch)

    conns = [await runtime.pool.acquire() for _ in batches]  # all ready before any write
    try:
        outcomes = await asyncio.gather(
            *(writer.apply(c, b) for c, b in zip(conns, batches, strict=True)),
            return_exceptions=True,
        )
    finally:
        for c in conns:
            await runtime.pool.release(c)
    assert outcomes[:2] == [1, 1] and outcomes[3] == 1, outcomes
    assert isinstance(outcomes[2], asyncpg.PostgresError), outcomes[2]
    async with runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT user_id, total_brains FROM model_statistics WHERE session_id = 'w'"
            " ORDER BY user_id"
        )
        claimed = await conn.fetchval(
            "SELECT count(*) FROM inbox WHERE consumer = ANY($1)", ["c1", "c2", "c3", "c4"]
        )
    assert [tuple(r) for r in rows] == [("writer-1", 1), ("writer-2", 2), ("writer-4", 4)]
    assert claimed == 3  # the refused batch is not recorded as applied either
    # written again (a redelivery), nothing is added twice
    assert await write(batches[1]) == 0
