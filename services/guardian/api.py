"""HTTP routes of guardian: the seed's /api/health and /api/guardian/*, the incidents, and
the status page at `/` (the seed's diagnostics page).

`/api/health`, `/api/metrics` and the status page are open, as load balancers, probes and
operators on call read them and they show no user's data; the rest needs a token, and acting
(control, smoke, reports that hold log lines) the operator role. The page's buttons send the
operator's token, pasted into the page and kept in the tab's sessionStorage.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.templating import Jinja2Templates
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field

from services.guardian import db
from services.guardian.config import GuardianSettings
from services.guardian.domain import SMOKE
from services.guardian.watcher import Guardian
from services.runtime.auth import OperatorDep
from services.runtime.service import Runtime, runtime_of

RuntimeDep = Annotated[Runtime[GuardianSettings], Depends(runtime_of)]


class Control(BaseModel):
    action: Literal["pause", "resume", "reset"] = Field(
        description="pause: keep watching but take no action (no events, restarts or "
        "escalations); resume: act again; reset: release an escalated service."
    )
    service: str | None = Field(None, max_length=100, description="For reset: which service.")


TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")


async def page(guardian: Guardian, runtime: Runtime[GuardianSettings]) -> dict[str, Any]:
    """What the status page shows: states, instances, incidents, the last smoke run, links.
    No user's data: service names, guardian's own reasons and times."""
    incidents: list[dict[str, Any]] = []
    last_smoke = guardian.last_smoke
    try:
        async with runtime.pool.acquire() as conn:
            incidents = await db.incidents(conn, 20)
            if last_smoke is None:
                runs = await db.smoke_runs(conn, 1)
                last_smoke = runs[0] if runs else None
    except Exception as exc:  # the page still shows what guardian sees
        incidents = [{"service": "guardian", "reason": f"incidents unavailable: {exc}"[:200]}]
    services = []
    for name, s in guardian.watch.services.items():
        url = guardian.probe_url(name)
        services.append(
            {
                "name": name,
                "status": s.status,
                "since": s.changed_at,
                "reason": s.reason,
                "instances": sorted(s.instances),
                "restarts": s.restarts,
                "held": s.held,
                "docs": f"{url}/docs" if url else None,
            }
        )
    return {
        "services": services,
        "open_incidents": [i for i in incidents if i.get("opened_at") and not i["closed_at"]],
        "recent_incidents": [i for i in incidents if i.get("closed_at")][:10],
        "smoke": last_smoke,
        "smoke_service": SMOKE,
        "leader": guardian.leader,
        "paused": guardian.paused,
        "instance": runtime.instance,
        "grafana": guardian.settings.guardian_grafana_url or None,
        "smoke_interval_s": guardian.settings.guardian_smoke_interval_s,
    }


def build_open_router(guardian: Guardian) -> APIRouter:
    """What anyone may call: the fleet's health, for probes and load balancers, and the
    status page."""
    router = APIRouter(tags=["guardian"])

    @router.get("/", summary="The status page (HTML)", response_class=HTMLResponse)
    async def status_page(request: Request, runtime: RuntimeDep) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "status.html", await page(guardian, runtime))

    @router.get(
        "/status/live",
        summary="The status page's live part (HTML), fetched by the page every second",
        response_class=HTMLResponse,
    )
    async def status_live(request: Request, runtime: RuntimeDep) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, "live.html", await page(guardian, runtime))

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
    async def health(runtime: RuntimeDep) -> JSONResponse:
        body = await guardian.health(runtime)
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
    async def status(runtime: RuntimeDep) -> dict[str, Any]:
        return await guardian.status(runtime)

    @router.post("/api/guardian/control", summary="Pause or resume acting, reset a service")
    async def control(request: Control, who: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
        by = who.user_id
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
        summary="Run the smoke canary now and answer its result (a failure opens the `smoke` "
        "incident, as a scheduled run's does)",
    )
    async def run_smoke(who: OperatorDep, runtime: RuntimeDep) -> dict[str, Any]:
        return await guardian.run_smoke(runtime, "operator", who.user_id)

    @router.get("/api/guardian/smoke", summary="Smoke canary runs, newest first")
    async def smoke_runs(
        runtime: RuntimeDep,
        limit: Annotated[int, Query(ge=1, le=500)] = 20,
    ) -> list[dict[str, Any]]:
        async with runtime.pool.acquire() as conn:
            return await db.smoke_runs(conn, limit)

    @router.get("/api/guardian/incidents", summary="Incidents, newest first")
    async def incidents(
        runtime: RuntimeDep,
        service: Annotated[str | None, Query(max_length=100)] = None,
        open: bool = False,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[dict[str, Any]]:
        async with runtime.pool.acquire() as conn:
            return await db.incidents(conn, limit, service, open)

    @router.get("/api/guardian/incidents/{incident_id}", summary="One incident's record")
    async def incident(incident_id: uuid.UUID, runtime: RuntimeDep) -> dict[str, Any]:
        async with runtime.pool.acquire() as conn:
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
    async def report(incident_id: uuid.UUID, _: OperatorDep, runtime: RuntimeDep) -> Response:
        async with runtime.pool.acquire() as conn:
            found = await db.incident(conn, incident_id)
        if found is None or not found.get("report"):
            raise HTTPException(404, f"no report for incident {incident_id}")
        return PlainTextResponse(found["report"], media_type="text/markdown; charset=utf-8")

    return router
