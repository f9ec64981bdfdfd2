"""Which failures are a dependency's fault rather than a message's or a request's.

A consumer pauses on these instead of spending a message's deliveries, an API answers them
with 503, and a loop retries them with backoff. Everything else is the input's (or the
code's) fault and is handled as such.
"""

from __future__ import annotations

import asyncpg
import nats.errors
import nats.js.errors

# SQLSTATE classes: 08 connection exception, 53 insufficient resources (too many
# connections, disk full), 57 operator intervention (shutdown, cannot connect now),
# 40 transaction rollback (serialization failure, deadlock: trying again succeeds).
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "40"})

_NATS_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)


def unavailable(exc: BaseException) -> bool:
    """True when `exc` says PostgreSQL or NATS cannot be used right now (trying later helps)."""
    if isinstance(exc, BaseExceptionGroup):  # from a task group: all of them, or it is a bug
        return all(unavailable(e) for e in exc.exceptions)
    if isinstance(exc, asyncpg.PostgresError):
        return (exc.sqlstate or "")[:2] in _TRANSIENT_SQLSTATE_CLASSES
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # the client's protocol state broke ("cannot switch to state 15; another operation
        # is in progress"): what a connection does when the server dies in mid-query
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        # asyncpg says "connection is closed" / "pool is closing" with this class only; its
        # other InterfaceErrors (bad arguments, misuse) are not an outage
        return not isinstance(exc, ValueError) and "clos" in str(exc)
    # OSError: refused, reset, unreachable; TimeoutError (nats' included): no answer in
    # time, a pool exhausted
    return isinstance(exc, (OSError, TimeoutError, *_NATS_UNAVAILABLE))


def permanent(exc: BaseException) -> bool:
    """True when the input itself can never be stored (a NUL byte in text, a value out of its
    column's range, a string too long for an index): retrying cannot help."""
    if isinstance(exc, asyncpg.InterfaceError) and isinstance(exc, ValueError):
        return True  # asyncpg refused to encode an argument (an int out of int32 range)
    return isinstance(exc, asyncpg.DataError | asyncpg.ProgramLimitExceededError)


def describe(exc: BaseException) -> str:
    """A short, single-line description for a log line or a readiness check."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff_seconds(failures: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Capped exponential backoff: `base` after the first failure, doubling, at most `cap`
    (the project's one formula: consumers, crashed loops, planner retries, guardian's
    restarts, sync's fetches)."""
    doublings = min(max(0, failures - 1), 64)  # 2**64 bases are past any cap; no overflow
    return float(min(cap, base * 2**doublings))
