"""Pure decisions of stats: how a batch of completed subtasks changes the work records."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from contracts.events import SubtaskCompleted


@dataclass
class ResponseDelta:
    """What one batch adds to one (user, model, session) record."""

    user_id: str
    model_id: str
    session_id: str
    responses: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    first_used_at: datetime
    last_used_at: datetime


def response_deltas(events: Iterable[SubtaskCompleted]) -> list[ResponseDelta]:
    """Fold events into one delta per record, so a batch costs one row write per record."""
    deltas: dict[tuple[str, str, str], ResponseDelta] = {}
    for e in events:
        key = (e.user_id, e.model_id, e.session_id)
        used_at = e.completed_at
        d = deltas.get(key)
        if d is None:
            deltas[key] = ResponseDelta(
                e.user_id,
                e.model_id,
                e.session_id,
                1,
                e.prompt_tokens,
                e.completion_tokens,
                e.cost_usd or Decimal(0),
                used_at,
                used_at,
            )
            continue
        d.responses += 1
        d.prompt_tokens += e.prompt_tokens
        d.completion_tokens += e.completion_tokens
        d.cost_usd += e.cost_usd or Decimal(0)
        d.first_used_at = min(d.first_used_at, used_at)
        d.last_used_at = max(d.last_used_at, used_at)
    return list(deltas.values())
