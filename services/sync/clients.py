"""What sync asks over HTTP: OpenRouter's catalog and each Ollama device."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass

import httpx
from prometheus_client import Histogram
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from services.runtime.faults import backoff_seconds
from services.sync.config import SyncSettings
from services.sync.domain import DeviceCheck, parse_tags, parse_version

log = logging.getLogger(__name__)

FETCH_SECONDS = Histogram(
    "sync_openrouter_fetch_seconds",
    "Time to get OpenRouter's catalog, retries included",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


class FetchDeadlineExceeded(Exception):
    """The whole fetch, retries included, took longer than OPENROUTER_FETCH_DEADLINE_S."""

    def __init__(self, seconds: float) -> None:
        super().__init__(
            f"no complete answer within the fetch deadline of {seconds:g}s "
            "(OPENROUTER_FETCH_DEADLINE_S)"
        )


class UpstreamError(Exception):
    """OpenRouter answered with an error status."""

    def __init__(self, status_code: int, reason: str) -> None:
        super().__init__(f"OpenRouter answered {status_code} {reason}".strip())
        self.status_code = status_code


@dataclass(frozen=True)
class CatalogResponse:
    not_modified: bool
    body: bytes = b""
    etag: str | None = None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, UpstreamError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, httpx.TransportError)  # timeouts, refused, reset, cut-off bodies


def describe(exc: BaseException) -> str:
    """An error as a person reads it (httpx's timeouts carry no message of their own)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.HTTPStatusError):
        r = exc.response
        return f"{r.request.url.path} answered {r.status_code} {r.reason_phrase}".strip()
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0
    log.warning(
        "OpenRouter fetch attempt %d failed (%s); retrying in %.1fs",
        state.attempt_number,
        describe(exc) if exc else "?",
        wait,
    )


async def fetch_catalog(settings: SyncSettings, etag: str | None) -> CatalogResponse:
    """GET /api/v1/models, conditional on `etag`; network errors, 429 and 5xx are retried
    with exponential backoff and full jitter, then the last error is raised. httpx's timeout
    bounds each read, not a body that keeps trickling in, so the whole fetch also has a
    deadline (FetchDeadlineExceeded)."""
    headers = {"Accept": "application/json"}
    if settings.openrouter_api_key:
        headers["Authorization"] = f"Bearer {settings.openrouter_api_key.get_secret_value()}"
    if etag:
        headers["If-None-Match"] = etag
    retrying = AsyncRetrying(
        stop=stop_after_attempt(settings.openrouter_retry_attempts),
        wait=lambda state: random.uniform(  # full jitter over the project's backoff
            0,
            backoff_seconds(
                state.attempt_number,
                settings.openrouter_retry_backoff_s,
                settings.openrouter_retry_max_backoff_s,
            ),
        ),
        retry=retry_if_exception(_transient),
        before_sleep=_log_retry,
        reraise=True,
    )
    t0 = time.perf_counter()
    try:
        async with (
            asyncio.timeout(settings.openrouter_fetch_deadline_s) as deadline,
            httpx.AsyncClient(
                base_url=settings.openrouter_base_url, timeout=settings.openrouter_timeout_s
            ) as client,
        ):
            async for attempt in retrying:
                with attempt:
                    response = await client.get("/api/v1/models", headers=headers)
                    if response.status_code == 304:
                        return CatalogResponse(not_modified=True, etag=etag)
                    if response.status_code != 200:
                        raise UpstreamError(response.status_code, response.reason_phrase)
                    return CatalogResponse(
                        not_modified=False,
                        body=response.content,
                        etag=response.headers.get("etag"),
                    )
        raise AssertionError("unreachable: tenacity reraises the last error")
    except TimeoutError:
        if deadline.expired():
            raise FetchDeadlineExceeded(settings.openrouter_fetch_deadline_s) from None
        raise
    finally:
        FETCH_SECONDS.observe(time.perf_counter() - t0)


async def check_device(device: str, base_url: str, timeout: float) -> DeviceCheck:
    """Ask one Ollama device for its version and models; no complete answer within `timeout`
    (both requests together) and the device is offline."""
    try:
        async with (
            asyncio.timeout(timeout),
            httpx.AsyncClient(base_url=base_url, timeout=timeout) as client,
        ):
            version_response = await client.get("/api/version")
            version_response.raise_for_status()
            tags_response = await client.get("/api/tags")
            tags_response.raise_for_status()
            version = parse_version(version_response.json())
            models = parse_tags(device, tags_response.json())
    except TimeoutError:
        return DeviceCheck(device, base_url, error=f"no answer within {timeout:g}s")
    except (httpx.HTTPError, ValueError) as exc:
        return DeviceCheck(device, base_url, error=describe(exc))
    return DeviceCheck(device, base_url, version=version, models=models)
