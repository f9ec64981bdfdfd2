"""Every SQL statement of stats."""

from __future__ import annotations

import asyncpg

from services.runtime.db import Connection
from services.stats.domain import ResponseDelta


async def add_responses(conn: Connection, deltas: list[ResponseDelta]) -> None:
    """One statement for the whole batch: unnest the columns, upsert by record key."""
    await conn.execute(
        """
        INSERT INTO model_statistics AS s (user_id, model_id, session_id, response_count,
            prompt_tokens, completion_tokens, cost_usd, first_used_at, last_used_at)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::bigint[],
                             $6::bigint[], $7::numeric[], $8::timestamptz[], $9::timestamptz[])
        ON CONFLICT (user_id, model_id, session_id) DO UPDATE SET
            response_count    = s.response_count + EXCLUDED.response_count,
            prompt_tokens     = s.prompt_tokens + EXCLUDED.prompt_tokens,
            completion_tokens = s.completion_tokens + EXCLUDED.completion_tokens,
            cost_usd          = s.cost_usd + EXCLUDED.cost_usd,
            first_used_at     = LEAST(s.first_used_at, EXCLUDED.first_used_at),
            last_used_at      = GREATEST(s.last_used_at, EXCLUDED.last_used_at),
            updated_at        = now()
        """,
        [d.user_id for d in deltas],
        [d.model_id for d in deltas],
        [d.session_id for d in deltas],
        [d.responses for d in deltas],
        [d.prompt_tokens for d in deltas],
        [d.completion_tokens for d in deltas],
        [d.cost_usd for d in deltas],
        [d.first_used_at for d in deltas],
        [d.last_used_at for d in deltas],
    )


async def model_records(conn: Connection, user_id: str, model_id: str) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT session_id, response_count, total_brains, dismissal_count, prompt_tokens,"
        " completion_tokens, cost_usd, first_used_at, last_used_at"
        " FROM model_statistics WHERE user_id = $1 AND model_id = $2 ORDER BY first_used_at",
        user_id,
        model_id,
    )
