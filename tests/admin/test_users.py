"""Users through the API: hashed at once, never shown, kept in the users file or Redis,
and in force for REGISTER at once (digest authentication switches on by itself)."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.user_store import RedisUserStore
from tests.support.redis_server import RedisServer

from .conftest import LiveSite
from .sip_ua import DOMAIN

MakeSite = Callable[..., AbstractAsyncContextManager[LiveSite]]


def md5_ha1(user: str, password: str) -> str:
    return hashlib.md5(f"{user}:{DOMAIN}:{password}".encode()).hexdigest()


@pytest.fixture(params=["file", "redis"])
async def any_site(request: pytest.FixtureRequest, make_site: MakeSite) -> AsyncIterator[LiveSite]:
    """The same tests with users in DATA_DIR/users.toml and in Redis."""
    kw: dict[str, Any] = {}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        kw["redis_url"] = server.url
    async with make_site(**kw) as s:
        yield s


async def test_first_user_switches_authentication_on(any_site: LiveSite) -> None:
    site = any_site
    ua = await site.ua()
    assert not site.auth.enabled
    assert await ua.register("walkin") == 200  # no users: registration is open

    r = await site.client.post("/users", json={"username": "alice", "password": "wonderland"})
    assert r.status_code == 201
    assert r.json() == {"username": "alice", "realm": DOMAIN, "algorithms": ["MD5", "SHA-256"]}
    assert "wonderland" not in r.text

    assert await ua.register("alice") == 401  # challenged now
    assert await ua.register("alice", "wonderland") == 200
    assert await ua.register("alice", "guess") == 403
    assert await ua.register("walkin") == 401  # the open door is closed

    # Deleting every user does not open registration again.
    assert (await site.client.delete("/users/alice")).status_code == 204
    assert await ua.register("alice", "wonderland") == 403


async def test_put_replaces_a_password_and_creates_a_user(any_site: LiveSite) -> None:
    site = any_site
    ua = await site.ua()
    assert (await site.client.put("/users/bob", json={"password": "old"})).status_code == 201
    assert await ua.register("bob", "old") == 200
    r = await site.client.put("/users/bob", json={"password": "new"})
    assert r.status_code == 200
    assert await ua.register("bob", "old") == 403
    assert await ua.register("bob", "new") == 200


async def test_list_get_delete(any_site: LiveSite) -> None:
    c = any_site.client
    for name in ("carol", "alice"):
        assert (await c.post("/users", json={"username": name, "password": "x"})).status_code == 201
    listed = (await c.get("/users")).json()["users"]
    assert [u["username"] for u in listed] == ["alice", "carol"]
    assert (await c.get("/users/carol")).json()["username"] == "carol"
    assert (await c.delete("/users/carol")).status_code == 204
    gone = await c.get("/users/carol")
    assert gone.status_code == 404 and gone.json()["message"] == "no user 'carol'"
    assert (await c.delete("/users/carol")).status_code == 404


async def test_md5_only_user_from_an_ha1(any_site: LiveSite) -> None:
    site = any_site
    r = await site.client.post(
        "/users", json={"username": "dave", "ha1_md5": md5_ha1("dave", "pw").upper()}
    )
    assert r.status_code == 201 and r.json()["algorithms"] == ["MD5"]
    ua = await site.ua()
    # The challenge offers MD5 only (the user has no SHA-256 HA1), and it works.
    assert await ua.register("dave", "pw") == 200


async def test_creating_an_existing_user_is_409(site: LiveSite) -> None:
    body = {"username": "alice", "password": "x"}
    assert (await site.client.post("/users", json=body)).status_code == 201
    r = await site.client.post("/users", json=body)
    assert r.status_code == 409 and "exists" in r.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"username": "alice"},
        {"username": "alice", "password": ""},
        {"username": "alice", "password": "x", "ha1_md5": "0" * 32},
        {"username": "alice", "ha1_md5": "0" * 31},
        {"username": "alice", "ha1_sha256": "g" * 64},
        {"username": "alice", "ha1_md5": None},
        {"username": "al ice", "password": "x"},
        {"username": "", "password": "x"},
        {"username": "a" * 65, "password": "x"},
        {"username": ".hidden", "password": "x"},
        {"password": "x"},
        {"username": "alice", "password": "x", "admin": True},
        [],
        "alice",
    ],
)
async def test_bad_user_bodies_are_422_json(site: LiveSite, body: object) -> None:
    r = await site.client.post("/users", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("invalid request")
    assert (await site.client.get("/users")).json() == {"users": []}


async def test_not_json_is_422(site: LiveSite) -> None:
    r = await site.client.post(
        "/users", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "message" in r.json()


async def test_users_file_holds_only_ha1s(make_site: MakeSite, tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = "wonderland"\n')
    async with make_site(users_file=users) as site:
        assert site.auth.enabled  # a users file: on from the start
        r = await site.client.put("/users/bob", json={"password": "builder"})
        assert r.status_code == 201
        ua = await site.ua()
        assert await ua.register("alice", "wonderland") == 200
        assert await ua.register("bob", "builder") == 200
    text = users.read_text()
    assert "wonderland" not in text and "builder" not in text and "password =" not in text
    doc = tomllib.loads(text)
    assert set(doc["users"]) == {"alice", "bob"}
    assert doc["users"]["bob"]["ha1_md5"] == md5_ha1("bob", "builder")
    assert users.stat().st_mode & 0o077 == 0  # HA1s are password-equivalent
    # A restart reads the same users back.
    async with make_site(users_file=users) as again:
        assert again.users.usernames() == ["alice", "bob"]


async def test_users_created_without_a_file_persist_in_the_data_dir(
    make_site: MakeSite, tmp_path: Path
) -> None:
    async with make_site() as site:
        await site.client.post("/users", json={"username": "alice", "password": "x"})
    assert (tmp_path / "data" / "users.toml").exists()
    async with make_site() as site:
        assert site.auth.enabled
        assert site.users.usernames() == ["alice"]


async def test_users_in_redis_are_hashes_and_other_processes_see_them(
    make_site: MakeSite, redis_server: RedisServer
) -> None:
    async with make_site(redis_url=redis_server.url) as site:
        await site.client.post("/users", json={"username": "alice", "password": "wonderland"})
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            fields = await client.hgetall("p2psip:user:alice")
        finally:
            await client.aclose()
        assert fields == {
            "realm": DOMAIN,
            "ha1_md5": md5_ha1("alice", "wonderland"),
            "ha1_sha256": hashlib.sha256(f"alice:{DOMAIN}:wonderland".encode()).hexdigest(),
        }
        # Another proxy process sharing the Redis: it sees alice, and its changes reach us.
        other = RedisUserStore(redis_server.url, DOMAIN)
        try:
            await other.refresh()
            assert other.usernames() == ["alice"]
            assert await other.delete("alice")
        finally:
            await other.close()
        assert isinstance(site.users, RedisUserStore)
        await site.users.refresh()  # what its background reload does every few seconds
        assert (await site.client.get("/users/alice")).status_code == 404


async def test_a_users_file_seeds_an_empty_redis(
    make_site: MakeSite, redis_server: RedisServer, tmp_path: Path
) -> None:
    users = tmp_path / "users.toml"
    users.write_text('[users."alice"]\npassword = "wonderland"\n')
    async with make_site(redis_url=redis_server.url, users_file=users) as site:
        assert site.users.usernames() == ["alice"]
        await site.client.delete("/users/alice")
        await site.client.put("/users/bob", json={"password": "x"})
    # Redis is where the users live now: the file seeds only a Redis without users.
    async with make_site(redis_url=redis_server.url, users_file=users) as site:
        assert site.users.usernames() == ["bob"]


async def test_redis_down_is_503_json(make_site: MakeSite, redis_server: RedisServer) -> None:
    async with make_site(redis_url=redis_server.url) as site:
        redis_server.stop()
        r = await site.client.put("/users/alice", json={"password": "x"})
        assert r.status_code == 503
        assert "redis" in r.json()["message"]
        ready = await site.client.get("/ready")
        assert ready.status_code == 503
        assert "redis" in ready.json()["message"]
