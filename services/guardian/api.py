"""HTTP routes of guardian: the seed's /api/health and /api/guardian/*, and the incidents.

`/api/health` (and `/api/metrics`) are open, as load balancers and probes call them and
they show no user's data; the rest needs a token, and acting (control, smoke, reports that
hold log lines) the operator role.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field

from services.guardian import db
from services.guardian.handlers import Guardian
from services.runtime.auth import OperatorDep


class Control(BaseModel):
    action: Literal["pause", "resume", "reset"] = Field(
        description="pause: keep watching but take no action (no events, restarts or "
        "escalations); resume: act again; reset: release an escalated service."
    )
    service: str | None = Field(None, max_length=100, description="For reset: which service.")


def build_open_router(guardian: Guardian) -> APIRouter:
    """What anyone may call: the fleet's health, for probes and load balancers."""
    router = APIRouter(tags=["guardian"])

    @router.get(
        "/api/health",
        summary="Health of the whole fleet (200 healthy or degraded, 503 unhealthy)",
        responses={
            503: {
                "description": "unhealthy: NATS or PostgreSQL unreachable, or every "
                "watched service down"
            }
        },
    )
    async def health() -> JSONResponse:
        if guardian.runtime is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        body = await guardian.health()
        return JSONResponse(body, status_code=503 if body["status"] == "unhealthy" else 200)

    @router.get(
        "/api/metrics",
        summary="Prometheus metrics (the seed's path for /metrics)",
        response_class=PlainTextResponse,
    )
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def build_router(guardian: Guardian) -> APIRouter:
    """What needs a token; acting needs the operator role."""
    router = APIRouter(tags=["guardian"])

    @router.get("/api/guardian/status", summary="This replica: leadership, mode, each service")
    async def status() -> dict[str, Any]:
        return await guardian.status()

    @router.post("/api/guardian/control", summary="Pause or resume acting, reset a service")
    async def control(request: Control, who: OperatorDep) -> dict[str, Any]:
        by = who.user_id
        runtime = guardian.rt()
        async with runtime.pool.acquire() as conn:
            if request.action in ("pause", "resume"):
                await db.set_paused(conn, request.action == "pause")
                return {"action": request.action, "paused": request.action == "pause"}
            service = request.service
            if service is None or service not in guardian.watch.services:
                raise HTTPException(404, f"no watched service {str(service)[:100]!r}")
            if not await db.request_reset(conn, service, by):
                raise HTTPException(409, f"{service} is not escalated: nothing to reset")
        return {"action": "reset", "service": service, "status": "requested"}

    @router.post(
        "/api/guardian/run-smoke",
        summary="Run the smoke canary (not yet: 501)",
        status_code=501,
        responses={501: {"description": "The smoke canary is not built yet."}},
    )
    async def run_smoke(_: OperatorDep) -> JSONResponse:
        return JSONResponse(
            {
                "error": "not_implemented",
                "detail": "the smoke canary through the pipeline is not built yet; "
                "GET /api/health tells each service's state meanwhile",
            },
            status_code=501,
        )

    @router.get("/api/guardian/incidents", summary="Incidents, newest first")
    async def incidents(
        service: Annotated[str | None, Query(max_length=100)] = None,
        open: bool = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[dict[str, Any]]:
        async with guardian.rt().pool.acquire() as conn:
            return await db.incidents(conn, limit, service, open)

    @router.get("/api/guardian/incidents/{incident_id}", summary="One incident's record")
    async def incident(incident_id: uuid.UUID) -> dict[str, Any]:
        async with guardian.rt().pool.acquire() as conn:
            found = await db.incident(conn, incident_id)
        if found is None:
            raise HTTPException(404, f"no incident {incident_id}")
        found.pop("report", None)
        return found

    @router.get(
        "/api/guardian/incidents/{incident_id}/report",
        summary="An escalated incident's report (markdown; it holds log lines: operators only)",
        response_class=PlainTextResponse,
    )
    async def report(incident_id: uuid.UUID, _: OperatorDep) -> Response:
        async with guardian.rt().pool.acquire() as conn:
            found = await db.incident(conn, incident_id)
        if found is None or not found.get("report"):
            raise HTTPException(404, f"no report for incident {incident_id}")
        return PlainTextResponse(found["report"], media_type="text/markdown; charset=utf-8")

    return router
