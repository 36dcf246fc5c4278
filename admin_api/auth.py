"""The bearer token that every route but /health and /ready asks for."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import Unauthorized

bearer = HTTPBearer(
    auto_error=False,
    description="the site's admin token (--admin-token, P2PSIP_ADMIN_TOKEN)",
)


def bearer_credentials(authorization: str | None) -> str:
    """The credentials of an ``Authorization: Bearer ...`` header value ("" if none), read
    as ``HTTPBearer`` reads them."""
    scheme, _, credentials = (authorization or "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


def token_matches(given: str, expected: bytes) -> bool:
    # Constant time: the comparison must not tell how much of a guess was right.
    return hmac.compare_digest(given.encode("utf-8"), expected)


def token_checker(token: str) -> Callable[..., Awaitable[None]]:
    """A dependency that answers 401 unless the request carries ``token``."""
    if not token:
        raise ValueError("the admin API needs a token")
    expected = token.encode("utf-8")

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = "" if credentials is None else credentials.credentials
        if not token_matches(given, expected):
            raise Unauthorized("missing or wrong bearer token")

    return check
