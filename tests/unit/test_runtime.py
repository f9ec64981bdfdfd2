from __future__ import annotations

from services.runtime.faults import backoff_seconds
from services.stack import _hide_password


def test_backoff_doubles_from_half_a_second_and_is_capped() -> None:
    assert [backoff_seconds(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_seconds(50) == 30.0


def test_status_never_prints_a_database_password() -> None:
    assert (
        _hide_password("postgresql://fleet:s3cret@db:5432/fleet")
        == "postgresql://fleet:***@db:5432/fleet"
    )
    assert (
        _hide_password("postgresql://postgres@127.0.0.1:5432/postgres")
        == "postgresql://postgres@127.0.0.1:5432/postgres"
    )
