"""Users for digest authentication. Passwords go in, are hashed at once (HA1 for MD5 and
SHA-256 in the site's realm) and never come out; neither do the HA1s."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Response

from .schemas import (
    USERNAME_PATTERN,
    ErrorOut,
    Ha1Secret,
    NewUser,
    PasswordSecret,
    Responses,
    UserListOut,
    UserOut,
    UserSecret,
)
from .services import AdminServices, Conflict, NotFound, UserChange
from .views import user_out

AnyUsername = Annotated[str, Path(min_length=1, max_length=256, examples=["alice"])]
NewUsername = Annotated[str, Path(pattern=USERNAME_PATTERN, examples=["alice"])]
_404: Responses = {404: {"model": ErrorOut, "description": "no such user"}}
_503: Responses = {503: {"model": ErrorOut, "description": "the users could not be written"}}


def _change(username: str, secret: PasswordSecret | Ha1Secret) -> UserChange:
    if isinstance(secret, PasswordSecret):
        return UserChange(username, password=secret.password)
    return UserChange(username, ha1_md5=secret.ha1_md5, ha1_sha256=secret.ha1_sha256)


def router(services: AdminServices) -> APIRouter:
    r = APIRouter(prefix="/users", tags=["users"])

    @r.get("", summary="Every user (names and digest algorithms, never secrets)")
    async def list_users() -> UserListOut:
        return UserListOut(users=[user_out(u, services.realm) for u in services.users()])

    @r.post(
        "",
        status_code=201,
        summary="Create a user; it can register at once",
        responses={409: {"model": ErrorOut, "description": "the user exists"}, **_503},
    )
    async def create_user(body: Annotated[NewUser, Body()]) -> UserOut:
        if services.user(body.username) is not None:
            raise Conflict(f"user {body.username!r} exists (PUT /users/{body.username} replaces)")
        record, _ = await services.save_user(_change(body.username, body))
        return user_out(record, services.realm)

    @r.get("/{username}", summary="One user", responses={**_404})
    async def get_user(username: AnyUsername) -> UserOut:
        record = services.user(username)
        if record is None:
            raise NotFound(f"no user {username!r}")
        return user_out(record, services.realm)

    @r.put(
        "/{username}",
        summary="Create or replace a user's secret (a new password or HA1s)",
        responses={201: {"model": UserOut, "description": "created"}, **_503},
    )
    async def put_user(
        username: NewUsername, body: Annotated[UserSecret, Body()], response: Response
    ) -> UserOut:
        record, created = await services.save_user(_change(username, body))
        if created:
            response.status_code = 201
        return user_out(record, services.realm)

    @r.delete("/{username}", status_code=204, summary="Delete a user", responses={**_404, **_503})
    async def delete_user(username: AnyUsername) -> Response:
        if not await services.delete_user(username):
            raise NotFound(f"no user {username!r}")
        return Response(status_code=204)

    return r
