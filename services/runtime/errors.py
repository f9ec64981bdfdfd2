"""One error shape for every service, and the checks every request passes before a route.

Every 4xx and 5xx answer is

    {"error": {"code": "not_found", "message": "no plan p-1",
               "fields": [{"loc": ["body", "subtasks", 0, "sequence_number"],
                           "message": "Input should be less than or equal to 2147483647",
                           "value_prefix": "2147483648"}]}}

`fields` names what was wrong in the request (empty when nothing in particular); a bad
value is shown only by its first `VALUE_PREFIX_CHARS` characters, so a 10 MB request never
gets a 10 MB answer. A failure that is not the request's fault says so: 503 `unavailable`
with `Retry-After` while PostgreSQL or NATS cannot be reached, 500 `internal` (no internal
detail; the log line carries the trace id the message gives) for anything else.

Before a route sees a request, `RequestChecks` refuses: a body over `HTTP_MAX_BODY_BYTES`
(413); a NUL byte in the path, the query or any JSON string or key, `NaN`/`Infinity` or a
number too large for a float, JSON nested deeper than `HTTP_MAX_JSON_DEPTH`, and JSON that
does not parse (422). PostgreSQL cannot store a NUL in text nor a non-finite number in
JSON, and Python's json module accepts both, so they are stopped here for every service.
"""

from __future__ import annotations

import json
import logging
import math
import reprlib
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.runtime.faults import unavailable

log = logging.getLogger(__name__)

VALUE_PREFIX_CHARS = 40
MAX_FIELDS = 20  # a list of 10,000 bad items is named by its first few
RETRY_AFTER_S = 5


class RequestLimits(BaseSettings):
    """Limits every service applies to requests (environment variables, upper case)."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    http_max_body_bytes: int = Field(1 << 20, ge=1, description="Larger bodies get 413.")
    http_max_json_depth: int = Field(32, ge=1, description="Deeper JSON bodies get 422.")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query, path or header, then names.")
    message: str
    value_prefix: str | None = Field(
        None, description=f"The start of the bad value (at most {VALUE_PREFIX_CHARS} chars)."
    )


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, for programs: not_found, invalid_request, …")
    message: str = Field(description="For people.")
    fields: list[FieldError] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """The answer of every service to a request it refuses or cannot serve."""

    error: ErrorBody


_AS_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
# `content` is explicit: a route whose answers are text or HTML still refuses in JSON
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorResponse,
        "content": _AS_JSON,
        "description": "Refused: `error.code` says why",
    },
    "5XX": {
        "model": ErrorResponse,
        "content": _AS_JSON,
        "description": "Not served: `unavailable` (retry after `Retry-After` seconds) or "
        "`internal`",
    },
}

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ApiError(Exception):
    """Raised by a route to answer in the one shape with a code of its own."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        fields: Sequence[FieldError] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.fields, self.headers = list(fields), headers


def error_response(
    status: int,
    code: str,
    message: str,
    fields: Iterable[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(code=code, message=message, fields=list(fields)))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


_short = reprlib.Repr()  # looks at a few items of a container only, however large
_short.maxlevel, _short.maxdict, _short.maxlist = 2, 4, 4
_short.maxstring = _short.maxother = VALUE_PREFIX_CHARS + 2


def value_prefix(value: Any) -> str:
    """The start of a value, computed in bounded time whatever its size."""
    if isinstance(value, str):
        return value[:VALUE_PREFIX_CHARS]
    try:
        text = _short.repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        text = f"<{type(value).__name__}>"
    return text[:VALUE_PREFIX_CHARS]


def field_errors(errors: Sequence[Any]) -> list[FieldError]:
    found = []
    for e in errors[:MAX_FIELDS]:
        shown = e.get("type") != "missing" and "input" in e  # a missing field's input is
        found.append(  # its parent: nothing to show
            FieldError(
                loc=[p if isinstance(p, int) else str(p) for p in e.get("loc", ())],
                message=str(e.get("msg", "invalid")),
                value_prefix=value_prefix(e["input"]) if shown else None,
            )
        )
    return found


def _summary(fields: Sequence[FieldError], total: int) -> str:
    named = "; ".join(f"{'.'.join(map(str, f.loc)) or 'request'}: {f.message}" for f in fields)
    more = f" (and {total - len(fields)} more)" if total > len(fields) else ""
    return f"invalid request: {named}{more}"


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    fields = field_errors(errors)
    return error_response(422, "invalid_request", _summary(fields, len(errors)), fields)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODES.get(exc.status_code, f"http_{exc.status_code}")
    detail: Any = exc.detail
    if isinstance(detail, dict) and isinstance(detail.get("error"), str):
        # a route's own code, as in {"error": "sync_in_progress", "run_id": …}
        code = detail["error"]
        rest = ", ".join(f"{k}={v}" for k, v in detail.items() if k != "error")
        message = f"{code}: {rest}" if rest else code
    elif isinstance(detail, str) and detail:
        message = detail
    else:
        message = _CODES.get(exc.status_code, code).replace("_", " ")
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.code, exc.message, exc.fields, exc.headers)


def _trace_id(scope: Scope) -> str:
    """The request's trace id: the current span's, the caller's `traceparent`, or new."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        return format(context.trace_id, "032x")
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            parts: list[str] = value.decode("latin-1").split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                return parts[1]
    return secrets.token_hex(16)


class JsonRefused(Exception):
    def __init__(self, message: str, loc: Sequence[str | int] = (), value: Any = None) -> None:
        super().__init__(message)
        self.field = FieldError(
            loc=["body", *loc],
            message=message,
            value_prefix=None if value is None else value_prefix(value),
        )


def check_json(body: bytes, max_depth: int) -> None:
    """Parse a JSON body and refuse what PostgreSQL or the routes cannot take."""
    try:
        value = json.loads(body)  # NaN, Infinity and 1e999 become floats the walk refuses
    except RecursionError:
        raise JsonRefused(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # not JSON, not UTF-8, an int of too many digits
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise JsonRefused(f"not valid JSON: {message}"[:200]) from None
    check_value(value, max_depth)


def check_value(value: Any, max_depth: int, loc: Sequence[str | int] = ()) -> None:
    """Refuse NUL bytes in strings and keys, non-finite numbers and nesting deeper than
    `max_depth`, walking without recursion (bodies are untrusted)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, list(loc))]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                raise JsonRefused("a NUL byte is not allowed", where, item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise JsonRefused("the number is not finite", where, item)
        elif isinstance(item, dict | list):
            if len(where) - len(loc) >= max_depth:
                raise JsonRefused(f"nested deeper than {max_depth} levels", where)
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and "\x00" in key:
                    raise JsonRefused("a NUL byte is not allowed in a key", where, key)
                stack.append((child, [*where, key]))


def bounded_json(max_bytes: int, max_depth: int) -> Callable[[Any], Any]:
    """A pydantic after-validator for free-form JSON (such as a plan's metadata): at most
    `max_depth` levels and `max_bytes` as compact JSON, no NUL, no NaN or Infinity."""

    def check(value: Any) -> Any:
        try:
            check_value(value, max_depth)
        except JsonRefused as exc:
            raise ValueError(str(exc)) from None
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
        if size > max_bytes:
            raise ValueError(f"{size} bytes as JSON; at most {max_bytes}")
        return value

    return check


def _is_json(scope: Scope) -> bool:
    """Whether FastAPI would parse this body as JSON (no content type, or a JSON one)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            media: bytes = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or (
                media.startswith(b"application/") and media.endswith(b"+json")
            )
    return True


def _target_refusal(scope: Scope) -> FieldError | None:
    path: str = scope.get("path", "")
    if "\x00" in path:
        return FieldError(loc=["path"], message="a NUL byte is not allowed", value_prefix=path)
    query: bytes = scope.get("query_string", b"")
    if b"\x00" in query or b"%00" in query.lower():
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name or "\x00" in value:
                shown = value if "\x00" in value else name
                return FieldError(
                    loc=["query", name.replace("\x00", "")],
                    message="a NUL byte is not allowed",
                    value_prefix=value_prefix(shown),
                )
    return None


class RequestChecks:
    """ASGI middleware: the request checks above, then the 500/503 of anything a route
    raised that no exception handler took. (Starlette's own handler for `Exception` sends
    its answer and raises again, which a server logs as a crash and an in-process client
    sees as an exception; here the answer is the last word.)"""

    def __init__(self, app: ASGIApp, limits: RequestLimits | None = None) -> None:
        self.app = app
        self.limits = limits or RequestLimits()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            refused = _target_refusal(scope)
            if refused is not None:
                await error_response(
                    422,
                    "invalid_request",
                    f"{'.'.join(map(str, refused.loc))}: {refused.message}",
                    [refused],
                )(scope, receive, send)
                return
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            await self.app(scope, _replay(body, receive), tracking)
        except Exception as exc:
            if started:
                raise
            await self._failed(exc, scope)(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None once a refusal was sent."""
        limit = self.limits.http_max_body_bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._too_large(scope, receive, send)
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(scope, receive, send)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if body and _is_json(scope):
            try:
                check_json(body, self.limits.http_max_json_depth)
            except JsonRefused as exc:
                await error_response(
                    422, "invalid_request", f"invalid request: {exc}", [exc.field]
                )(scope, receive, send)
                return None
        return body

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.http_max_body_bytes
        await error_response(413, "too_large", f"the body is larger than {limit} bytes")(
            scope, receive, send
        )

    def _failed(self, exc: Exception, scope: Scope) -> JSONResponse:
        trace_id = _trace_id(scope)
        where = f"{scope.get('method')} {scope.get('path')}"
        if unavailable(exc):
            log.warning(
                "%s: a dependency is unavailable: %s %s",
                where,
                type(exc).__name__,
                exc,
                extra={"trace_id": trace_id},
            )
            return error_response(
                503,
                "unavailable",
                "the database or the message bus is unavailable; try again shortly",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        log.error("%s failed", where, exc_info=exc, extra={"trace_id": trace_id})
        return error_response(500, "internal", f"internal error (trace id {trace_id})")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replayed


def install(app: FastAPI, limits: RequestLimits | None = None) -> None:
    """Answer every error of `app` in the one shape and check requests before routes."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_middleware(RequestChecks, limits=limits)
