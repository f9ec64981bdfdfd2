from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from contracts.events import SubtaskCompleted
from services.stats.domain import response_deltas

T0 = datetime(2026, 4, 2, 12, 0, tzinfo=UTC)


def done(
    model: str, session: str, minutes: int, tokens: int = 1, cost: str | None = None
) -> SubtaskCompleted:
    return SubtaskCompleted(
        plan_id="p",
        subtask_id=f"{model}{minutes}",
        model_id=model,
        user_id="u",
        session_id=session,
        prompt_tokens=tokens,
        completion_tokens=2 * tokens,
        completed_at=T0 + timedelta(minutes=minutes),
        cost_usd=Decimal(cost) if cost else None,
    )


def test_a_batch_folds_into_one_delta_per_user_model_and_session() -> None:
    deltas = response_deltas(
        [
            done("a", "s1", 5, tokens=3, cost="0.1"),
            done("a", "s1", 1, cost="0.2"),
            done("a", "s2", 2),
            done("b", "s1", 3),
        ]
    )
    by_key = {(d.model_id, d.session_id): d for d in deltas}
    assert set(by_key) == {("a", "s1"), ("a", "s2"), ("b", "s1")}
    a1 = by_key[("a", "s1")]
    assert (a1.responses, a1.prompt_tokens, a1.completion_tokens) == (2, 4, 8)
    assert a1.cost_usd == Decimal("0.3")
    assert a1.first_used_at == T0 + timedelta(minutes=1)  # order of arrival does not matter
    assert a1.last_used_at == T0 + timedelta(minutes=5)
    assert by_key[("b", "s1")].cost_usd == Decimal(0)


def test_no_events_no_deltas() -> None:
    assert response_deltas([]) == []
