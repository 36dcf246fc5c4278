"""``create_app(services)``: the admin REST API of one site, as a FastAPI app.

Everything but ``/health`` and ``/ready`` (the OpenAPI schema too) needs the bearer
token; a request body is refused (401, 413) before it is read unless it comes with the
token and within ``max_body`` bytes (:mod:`admin_api.body_guard`). Every error is JSON
with a ``message``. The app keeps no state of its own beyond its metrics registry; it
talks only to ``services``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import (
    routes_dht,
    routes_health,
    routes_registrations,
    routes_stats,
    routes_trust,
    routes_users,
)
from .auth import token_checker
from .body_guard import MAX_BODY, BodyGuard
from .errors import install_error_handlers
from .metrics import SiteMetrics
from .schemas import ErrorOut, ValidationErrorOut
from .services import AdminServices

API_VERSION = "1.0.0"
DESCRIPTION = """\
Registrations, users, the DHT and statistics of one p2psip site.

Every path except `/health` and `/ready` needs `Authorization: Bearer <admin token>`.
A request body is refused before it is read without the token (401) or when larger than
{max_body} bytes (413). Errors are JSON objects with a `message`.
"""


async def refuse_unknown_query(request: Request) -> None:
    """422 for a query parameter the route does not take (``?limt=10`` is a typo, not a
    request for the default page size)."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    known = {f.alias for f in dependant.query_params} if dependant is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [{"type": "extra_forbidden", "loc": ("query", unknown[0]), "msg": "unknown parameter"}]
        )


def create_app(services: AdminServices, *, max_body: int = MAX_BODY) -> FastAPI:
    """The API over ``services``; request bodies above ``max_body`` bytes get 413."""
    app = FastAPI(
        title="p2psip admin API",
        version=API_VERSION,
        description=DESCRIPTION.format(max_body=max_body),
        openapi_url=None,  # served below, behind the token
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.add_middleware(BodyGuard, token=services.token, max_body=max_body)
    auth = [Depends(token_checker(services.token))]
    checked = [*auth, Depends(refuse_unknown_query)]
    protected: dict[int | str, dict[str, Any]] = {
        400: {"model": ErrorOut, "description": "a body that cannot be read as JSON text"},
        401: {"model": ErrorOut, "description": "no token, or the wrong one"},
        413: {"model": ErrorOut, "description": "a request body over the size limit"},
        422: {"model": ValidationErrorOut, "description": "invalid input"},
    }
    metrics = SiteMetrics(services)
    app.include_router(routes_health.router(services))
    for router in (
        routes_registrations.router(services),
        routes_users.router(services),
        routes_dht.router(services),
        routes_dht.sites_router(services),
        routes_trust.router(services),
        routes_stats.router(services, metrics),
    ):
        app.include_router(router, dependencies=checked, responses=protected)

    @app.get("/openapi.json", include_in_schema=False, dependencies=auth)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
