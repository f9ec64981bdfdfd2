"""Every SQL statement of stats."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal

import asyncpg
from pydantic_core import to_json

from contracts.events import CANARY_USER_PREFIX, ModelSynced, PriceTier
from services.runtime.db import Connection
from services.stats.domain import Batch, CostEntry, ModelCounts, PriceInForce

# --- writes: one statement per table per batch, rows in key order ------------------------
#
# A batch goes to PostgreSQL as one JSON document per statement, unpacked by
# json_to_recordset: asyncpg encoding a dozen arrays of 500 values each cost more than
# the statements themselves (a check of every value against collections.abc.Iterable).


def _json_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A batch's rows as JSON text (numbers, decimals as strings, ISO times, uuid text)."""
    return to_json(rows).decode()


def _recordset(columns: dict[str, str], param: int = 1) -> str:
    """`json_to_recordset($n)` typed by `columns` (name: SQL type), in their order."""
    types = ", ".join(f"{c} {t}" for c, t in columns.items())
    return f"json_to_recordset(${param}::text::json) AS x({types})"


async def add_prices(conn: Connection, events: Sequence[ModelSynced]) -> None:
    """Each model.synced is a price in force from its time on (history kept)."""
    await conn.execute(
        """
        INSERT INTO model_prices (model_id, valid_from, event_id, prompt_price_per_1m,
            completion_price_per_1m, variable_price, price_tiers)
        SELECT m, v, e, p, c, var, tiers::jsonb
        FROM unnest($1::text[], $2::timestamptz[], $3::uuid[], $4::numeric[],
                    $5::numeric[], $6::bool[], $7::text[]) AS x(m, v, e, p, c, var, tiers)
        ON CONFLICT DO NOTHING
        """,
        [e.model_id for e in events],
        [e.occurred_at for e in events],
        [e.event_id for e in events],
        [e.prompt_price_per_1m for e in events],
        [e.completion_price_per_1m for e in events],
        [e.variable_price for e in events],
        [json.dumps([t.model_dump(mode="json") for t in e.price_tiers]) for e in events],
    )


async def price_histories(
    conn: Connection, spans: dict[str, tuple[datetime, datetime]]
) -> dict[str, list[tuple[datetime, PriceInForce]]]:
    """For each model and the span of its calls' times in a batch: the prices in force at
    some time of the span (the newest from before its start, and every later one up to its
    end), oldest first. One set-based lookup per batch, whatever the number of calls."""
    rows = await conn.fetch(
        """
        SELECT m.model_id, p.valid_from, p.prompt_price_per_1m, p.completion_price_per_1m,
               p.variable_price, p.price_tiers
        FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS m(model_id, since, until)
        JOIN LATERAL (
            SELECT * FROM model_prices p
            WHERE p.model_id = m.model_id AND p.valid_from <= m.until
              AND p.valid_from >= coalesce((
                  SELECT max(q.valid_from) FROM model_prices q
                  WHERE q.model_id = m.model_id AND q.valid_from <= m.since
              ), '-infinity')
        ) p ON true
        ORDER BY m.model_id, p.valid_from, p.event_id
        """,
        list(spans),
        [since for since, _ in spans.values()],
        [until for _, until in spans.values()],
    )
    histories: dict[str, list[tuple[datetime, PriceInForce]]] = {}
    for r in rows:
        histories.setdefault(r["model_id"], []).append(
            (
                r["valid_from"],
                PriceInForce(
                    r["prompt_price_per_1m"],
                    r["completion_price_per_1m"],
                    r["variable_price"],
                    tuple(PriceTier.model_validate(t) for t in _json(r["price_tiers"])),
                ),
            )
        )
    return histories


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


COST_COLUMNS = {
    "event_id": "uuid",
    "user_id": "text",
    "model_id": "text",
    "session_id": "text",
    "called_at": "timestamptz",
    "prompt_tokens": "bigint",
    "completion_tokens": "bigint",
    "prompt_price_per_1m": "numeric",
    "completion_price_per_1m": "numeric",
    "cost_usd": "numeric",
    "price_source": "text",
    "unknown_reason": "text",
}


def _cost_rows(entries: Sequence[CostEntry]) -> list[dict[str, Any]]:
    return [
        {
            "event_id": e.event_id,
            "user_id": e.user_id,
            "model_id": e.model_id,
            "session_id": e.session_id,
            "called_at": e.called_at,
            "prompt_tokens": e.prompt_tokens,
            "completion_tokens": e.completion_tokens,
            "prompt_price_per_1m": e.prompt_price_per_1m,
            "completion_price_per_1m": e.completion_price_per_1m,
            "cost_usd": e.cost_usd,
            "price_source": e.price_source.value,
            "unknown_reason": e.unknown_reason.value if e.unknown_reason else None,
        }
        for e in entries
    ]


COUNTERS = (
    "response_count",
    "total_brains",
    "dismissal_count",
    "sessions_appeared",
    "sessions_dismissed",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
    "unpriced_calls",
)
_ADDED = ", ".join(f"{c} = a.{c} + EXCLUDED.{c}" for c in COUNTERS)
_SUMMED = ", ".join(f"sum({c}) AS {c}" for c in COUNTERS)
_WIDENED = (
    "first_used_at = LEAST(a.first_used_at, EXCLUDED.first_used_at),"
    " last_used_at = GREATEST(a.last_used_at, EXCLUDED.last_used_at)"
)

# A batch's contributions, folded and written in one statement, which also records the
# events in the inbox and counts only those recorded there now (an event applied before
# adds nothing): the statement is the batch's whole transaction. Then the per-session
# records and roster, then each user's days (the main INSERT), then each user's totals, the global
# days' pending rows and the calls' rows of the cost ledger (insert only). The same
# statement for every consumer, so every transaction locks the tables in the same order,
# and the rows of each in key order: none deadlocks another. A roster change (a model newly
# on a session's panel, or dismissed there for the first time) counts on the day it
# happened, as returned by the records' upsert.
APPLY = f"""
WITH claimed AS (
    INSERT INTO inbox (consumer, event_id) SELECT * FROM unnest($4::text[], $5::uuid[])
    ON CONFLICT DO NOTHING RETURNING consumer, event_id
), c AS (
    SELECT * FROM json_to_recordset($1::text::json) AS x(n int, consumer text, event_id uuid,
        user_id text, model_id text, session_id text, at timestamptz, responses bigint,
        brains bigint, dismissals bigint, prompt_tokens bigint, completion_tokens bigint,
        cost_usd numeric, unpriced_calls bigint, dismissal_reason text)
    WHERE (consumer, event_id) IN (SELECT consumer, event_id FROM claimed)
), sessions AS (
    INSERT INTO model_statistics AS s (user_id, model_id, session_id, response_count,
        total_brains, dismissal_count, prompt_tokens, completion_tokens, cost_usd,
        unpriced_calls, first_used_at, last_used_at, appeared_at, dismissed_at,
        dismissal_reason)
    SELECT user_id, model_id, session_id, sum(responses), sum(brains), sum(dismissals),
        sum(prompt_tokens), sum(completion_tokens), sum(cost_usd), sum(unpriced_calls),
        -- a use is a response (a reward or a dismissal is not); the panel, any event
        min(at) FILTER (WHERE responses > 0), max(at) FILTER (WHERE responses > 0), min(at),
        -- the earliest dismissal says when and why, whatever the order of arrival
        min(at) FILTER (WHERE dismissals > 0),
        (array_agg(dismissal_reason ORDER BY at, n) FILTER (WHERE dismissals > 0))[1]
    FROM c GROUP BY user_id, model_id, session_id ORDER BY user_id, model_id, session_id
    ON CONFLICT (user_id, model_id, session_id) DO UPDATE SET
        response_count    = s.response_count + EXCLUDED.response_count,
        total_brains      = s.total_brains + EXCLUDED.total_brains,
        dismissal_count   = s.dismissal_count + EXCLUDED.dismissal_count,
        prompt_tokens     = s.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = s.completion_tokens + EXCLUDED.completion_tokens,
        cost_usd          = s.cost_usd + EXCLUDED.cost_usd,
        unpriced_calls    = s.unpriced_calls + EXCLUDED.unpriced_calls,
        first_used_at     = LEAST(s.first_used_at, EXCLUDED.first_used_at),
        last_used_at      = GREATEST(s.last_used_at, EXCLUDED.last_used_at),
        appeared_at       = LEAST(s.appeared_at, EXCLUDED.appeared_at),
        dismissed_at      = LEAST(s.dismissed_at, EXCLUDED.dismissed_at),
        dismissal_reason  = CASE WHEN EXCLUDED.dismissed_at < s.dismissed_at
                                   OR s.dismissed_at IS NULL
                                 THEN EXCLUDED.dismissal_reason
                                 ELSE s.dismissal_reason END,
        updated_at        = now()
    RETURNING new.user_id, new.model_id,
        CASE WHEN old.id IS NULL THEN new.appeared_at END AS appeared_at,
        CASE WHEN old.dismissed_at IS NULL THEN new.dismissed_at END AS first_dismissed_at
), days AS (
    SELECT user_id, model_id, day, {_SUMMED},
        min(used_at) AS first_used_at, max(used_at) AS last_used_at
    FROM (
        SELECT user_id, model_id, (at AT TIME ZONE 'UTC')::date AS day,
            responses AS response_count, brains AS total_brains,
            dismissals AS dismissal_count, 0 AS sessions_appeared, 0 AS sessions_dismissed,
            prompt_tokens, completion_tokens, cost_usd, unpriced_calls,
            CASE WHEN responses > 0 THEN at END AS used_at
        FROM c
        UNION ALL
        SELECT user_id, model_id, (appeared_at AT TIME ZONE 'UTC')::date,
            0, 0, 0, 1, 0, 0, 0, 0, 0, NULL FROM sessions WHERE appeared_at IS NOT NULL
        UNION ALL
        SELECT user_id, model_id, (first_dismissed_at AT TIME ZONE 'UTC')::date,
            0, 0, 0, 0, 1, 0, 0, 0, 0, NULL FROM sessions WHERE first_dismissed_at IS NOT NULL
    ) d GROUP BY user_id, model_id, day
), totals AS (
    INSERT INTO user_model_totals AS a (user_id, model_id, {", ".join(COUNTERS)},
        first_used_at, last_used_at)
    SELECT user_id, model_id, {_SUMMED}, min(first_used_at), max(last_used_at)
    FROM days GROUP BY user_id, model_id ORDER BY user_id, model_id
    ON CONFLICT (user_id, model_id) DO UPDATE SET {_ADDED}, {_WIDENED}
), global_days AS (
    -- every user's days but the canaries', appended (folded later by fold_global_days)
    INSERT INTO model_daily_pending (day, model_id, {", ".join(COUNTERS)})
    SELECT day, model_id, {_SUMMED} FROM days WHERE NOT starts_with(user_id, $2)
    GROUP BY day, model_id
), costs AS (
    INSERT INTO llm_costs ({", ".join(COST_COLUMNS)})
    SELECT * FROM {_recordset(COST_COLUMNS, param=3)}
    WHERE event_id IN (SELECT event_id FROM claimed)
), user_days AS (
    INSERT INTO user_model_daily AS a (user_id, day, model_id, {", ".join(COUNTERS)})
    SELECT user_id, day, model_id, {", ".join(COUNTERS)} FROM days
    ORDER BY user_id, day, model_id
    ON CONFLICT (user_id, day, model_id) DO UPDATE SET {_ADDED}
)
SELECT consumer, count(*) AS applied FROM claimed GROUP BY consumer
"""


async def apply(conn: Connection, batches: Sequence[Batch]) -> dict[str, int]:
    """Record the batches' events in their consumers' inboxes and add those not applied
    before to the records, the roster and every aggregate, and their calls to the cost
    ledger, in one statement (APPLY); how many each consumer's batches added."""
    rows = [
        (b.consumer, event_id, c)
        for b in batches
        for event_id, c in zip(b.event_ids, b.contributions, strict=True)
    ]
    applied = await conn.fetch(
        APPLY,
        _json_rows(
            [
                {
                    "n": n,
                    "consumer": consumer,
                    "event_id": event_id,
                    "user_id": c.user_id,
                    "model_id": c.model_id,
                    "session_id": c.session_id,
                    "at": c.at,
                    "responses": c.responses,
                    "brains": c.brains,
                    "dismissals": c.dismissals,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "cost_usd": c.cost_usd,
                    "unpriced_calls": c.unpriced_calls,
                    "dismissal_reason": c.dismissal_reason,
                }
                for n, (consumer, event_id, c) in enumerate(rows)
            ]
        ),
        CANARY_USER_PREFIX,
        _json_rows(_cost_rows([cost for b in batches for cost in b.costs])),
        [consumer for consumer, _, _ in rows],
        [event_id for _, event_id, _ in rows],
    )
    return {r["consumer"]: r["applied"] for r in applied}


_COUNTER_SUMS = ", ".join(f"sum({c})" for c in COUNTERS)
FOLD_GLOBAL_DAYS = f"""
    WITH moved AS (DELETE FROM model_daily_pending RETURNING *)
    INSERT INTO model_daily AS a (day, model_id, {", ".join(COUNTERS)})
    SELECT day, model_id, {_COUNTER_SUMS} FROM moved GROUP BY day, model_id
    ORDER BY day, model_id
    ON CONFLICT (day, model_id) DO UPDATE SET
        {", ".join(f"{c} = a.{c} + EXCLUDED.{c}" for c in COUNTERS)}
"""


async def fold_global_days(conn: Connection) -> None:
    """Move what the consumers appended into model_daily, in one statement (rows deleted
    by a concurrent fold are skipped by this one, so nothing is added twice)."""
    await conn.execute(FOLD_GLOBAL_DAYS)


# --- reads (a user's through Runtime.as_user: row-level security applies) ---------------

SESSION_COLUMNS = (
    "session_id, response_count, total_brains, dismissal_count, prompt_tokens,"
    " completion_tokens, cost_usd, unpriced_calls, first_used_at, last_used_at,"
    " appeared_at, dismissed_at, dismissal_reason"
)


async def model_records(conn: Connection, user_id: str, model_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {SESSION_COLUMNS} FROM model_statistics"
        " WHERE user_id = $1 AND model_id = $2 ORDER BY appeared_at, session_id",
        user_id,
        model_id,
    )


async def model_totals(conn: Connection, user_id: str, model_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM user_model_totals WHERE user_id = $1 AND model_id = $2",
        user_id,
        model_id,
    )


async def roster(conn: Connection, user_id: str, session_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT model_id, appeared_at, dismissed_at, dismissal_reason, response_count,"
        " total_brains, last_used_at FROM model_statistics"
        " WHERE user_id = $1 AND session_id = $2 ORDER BY appeared_at, model_id",
        user_id,
        session_id,
    )


RecordOrder = Literal[
    "response_count", "total_brains", "dismissal_count", "cost_usd", "first_used_at", "last_used_at"
]


async def all_models(
    conn: Connection, user_id: str, order: RecordOrder, descending: bool, limit: int
) -> list[asyncpg.Record]:
    # `order` is one of RecordOrder's literals (the API checks it), never free text
    direction = "DESC NULLS LAST" if descending else "ASC NULLS LAST"
    return await conn.fetch(
        f"SELECT * FROM user_model_totals WHERE user_id = $1"
        f" ORDER BY {order} {direction}, model_id LIMIT $2",
        user_id,
        limit,
    )


SpendGroup = Literal["model", "session", "day"]


async def spend(
    conn: Connection, user_id: str, group: SpendGroup, since: date | None
) -> list[asyncpg.Record]:
    """Known cost and the number of calls without a known cost, per group."""
    sums = (
        "sum(cost_usd) AS cost_usd, sum(unpriced_calls) AS unpriced_calls,"
        " sum(response_count) AS calls, sum(prompt_tokens) AS prompt_tokens,"
        " sum(completion_tokens) AS completion_tokens"
    )
    if group == "model" and since is None:
        query = (
            "SELECT model_id AS key, cost_usd, unpriced_calls, response_count AS calls,"
            " prompt_tokens, completion_tokens FROM user_model_totals WHERE user_id = $1"
            " ORDER BY model_id"
        )
        return await conn.fetch(query, user_id)
    if group == "session":
        query = (
            f"SELECT session_id AS key, {sums} FROM model_statistics WHERE user_id = $1"
            " AND ($2::date IS NULL OR last_used_at >= $2::date) GROUP BY session_id ORDER BY 1"
        )
    else:
        column = "day::text" if group == "day" else "model_id"
        query = (
            f"SELECT {column} AS key, {sums} FROM user_model_daily WHERE user_id = $1"
            f" AND day >= coalesce($2::date, '-infinity'::date) GROUP BY 1 ORDER BY 1"
        )
    return await conn.fetch(query, user_id, since)


async def cost_ledger(
    conn: Connection, user_id: str, before: datetime | None, session_id: str | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT * FROM llm_costs WHERE user_id = $1"
        " AND ($2::timestamptz IS NULL OR called_at < $2)"
        " AND ($3::text IS NULL OR session_id = $3)"
        " ORDER BY called_at DESC, event_id DESC LIMIT $4",
        user_id,
        before,
        session_id,
        limit,
    )


def _counts(rows: Sequence[asyncpg.Record]) -> list[ModelCounts]:
    return [
        ModelCounts(
            r["model_id"],
            int(r["responses"]),
            int(r["brains"]),
            int(r["appeared"]),
            int(r["dismissed"]),
        )
        for r in rows
    ]


_DAY_COLUMNS = "day, model_id, response_count, total_brains, sessions_appeared, sessions_dismissed"
_LEADERBOARD_SUMS = (
    "model_id, sum(response_count) AS responses, sum(total_brains) AS brains,"
    " sum(sessions_appeared) AS appeared, sum(sessions_dismissed) AS dismissed"
)


async def user_leaderboard(conn: Connection, user_id: str, since: date | None) -> list[ModelCounts]:
    if since is None:
        rows = await conn.fetch(
            "SELECT model_id, response_count AS responses, total_brains AS brains,"
            " sessions_appeared AS appeared, sessions_dismissed AS dismissed"
            " FROM user_model_totals WHERE user_id = $1",
            user_id,
        )
    else:
        rows = await conn.fetch(
            f"SELECT {_LEADERBOARD_SUMS} FROM user_model_daily"
            " WHERE user_id = $1 AND day >= $2 GROUP BY model_id",
            user_id,
            since,
        )
    return _counts(rows)


async def global_leaderboard(conn: Connection, since: date | None) -> list[ModelCounts]:
    # the folded days and what is still pending: exact whenever it is read
    rows = await conn.fetch(
        f"SELECT {_LEADERBOARD_SUMS} FROM ("
        f"  SELECT {_DAY_COLUMNS} FROM model_daily"
        f"  UNION ALL SELECT {_DAY_COLUMNS} FROM model_daily_pending"
        ") d WHERE day >= coalesce($1::date, '-infinity'::date) GROUP BY model_id",
        since,
    )
    return _counts(rows)
