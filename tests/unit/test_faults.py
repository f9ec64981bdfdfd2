"""Whose fault a failure is: the dependency's (pause, 503, retry) or the input's."""

from __future__ import annotations

import asyncpg
import nats.errors
import pytest

from services.runtime.faults import backoff_seconds, permanent, unavailable


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("the database system is starting up"),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.TooManyConnectionsError("sorry, too many clients already"),
        asyncpg.SerializationError("could not serialize access"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.InterfaceError("connection is closed"),
        nats.errors.ConnectionClosedError(),
        nats.errors.NoRespondersError(),
        nats.errors.TimeoutError(),
        asyncpg.exceptions.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
        ExceptionGroup("tasks", [OSError("reset"), nats.errors.ConnectionClosedError()]),
    ],
    ids=repr,
)
def test_an_outage_is_the_dependencys_fault(exc: BaseException) -> None:
    assert unavailable(exc)
    assert not permanent(exc)


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.CharacterNotInRepertoireError("invalid byte sequence for encoding UTF8: 0x00"),
        asyncpg.NumericValueOutOfRangeError("numeric field overflow"),
        asyncpg.exceptions._base.DataError("invalid input for query argument $1"),
    ],
    ids=repr,
)
def test_values_the_database_refuses_are_the_inputs_fault(exc: BaseException) -> None:
    assert permanent(exc)
    assert not unavailable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("a bug"),
        KeyError("x"),
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
        ExceptionGroup("tasks", [OSError("reset"), ValueError("a bug")]),
    ],
    ids=repr,
)
def test_a_bug_is_neither(exc: BaseException) -> None:
    assert not unavailable(exc)
    assert not permanent(exc)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(n, base=0.1, cap=1.0) for n in (1, 2, 3, 4, 5)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
    ]
