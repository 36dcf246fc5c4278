"""GET /health (the process answers) and GET /ready (it can serve); no token needed."""

from __future__ import annotations

from fastapi import APIRouter, Response

from .schemas import CheckOut, HealthOut, ReadyOut
from .services import AdminServices


def router(services: AdminServices) -> APIRouter:
    r = APIRouter(tags=["health"])

    @r.get("/health", summary="Liveness: the site's event loop answers")
    async def health() -> HealthOut:
        return HealthOut(status="ok")

    @r.get(
        "/ready",
        summary="Readiness: SIP listening, DHT joined, Redis reachable (when configured)",
        responses={503: {"model": ReadyOut, "description": "not ready, with the reasons"}},
    )
    async def ready(response: Response) -> ReadyOut:
        checks = await services.readiness()
        failed = [c for c in checks if not c.ok]
        body = ReadyOut(
            ready=not failed,
            message="; ".join(f"{c.name}: {c.detail}" for c in failed) or "ready",
            checks=[CheckOut(name=c.name, ok=c.ok, detail=c.detail) for c in checks],
        )
        if failed:
            response.status_code = 503
        return body

    return r
