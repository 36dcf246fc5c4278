"""Every error the admin API sends is JSON with a ``message`` (and never a traceback)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .schemas import ErrorOut, FieldErrorOut, ValidationErrorOut
from .services import ServiceError

log = logging.getLogger(__name__)


class Unauthorized(ServiceError):
    status_code = 401


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(ErrorOut(message=message).model_dump(), status, headers=headers)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    if exc.status_code >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return error_response(exc.status_code, str(exc) or type(exc).__name__, headers)


# What a field that failed its pattern should look like (pydantic would quote the regex).
_FORMATS = {
    "aor": "an address of record, sip:user@host",
    "username": "1-64 letters, digits or ._~+- (starting with a letter or digit)",
    "ha1_md5": "32 hex digits",
    "ha1_sha256": "64 hex digits",
}


def _message(error: dict[str, object]) -> str:
    loc = error.get("loc") or ()
    field = str(loc[-1]) if isinstance(loc, tuple | list) and loc else ""
    if error.get("type") == "string_pattern_mismatch" and field in _FORMATS:
        return f"expected {_FORMATS[field]}"
    return str(error.get("msg", "invalid")).removeprefix("Value error, ")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldErrorOut(
            location=".".join(str(part) for part in e.get("loc", ())),
            message=_message(e),
        )
        for e in exc.errors()
    ]
    first = f"{errors[0].location}: {errors[0].message}" if errors else "invalid request"
    body = ValidationErrorOut(message=f"invalid request: {first}", errors=errors)
    return JSONResponse(body.model_dump(), 422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error (logged by the site)")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
