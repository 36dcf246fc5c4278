"""Redis fails under a running site: a real redis-server killed, restarted, emptied.

While Redis is away, REGISTER answers 503 with Retry-After (nothing is acknowledged that
was not stored), calls reach the phones the site holds in memory, and /ready says why;
service returns by itself when Redis does. When Redis comes back empty (no persistence,
FLUSHALL), the site writes back its bindings and users, so the users' passwords keep
working and calls keep reaching the phones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from dht_adaptor.cached_store import CachedStore
from dht_adaptor.location import MemoryStore
from dht_adaptor.redis_store import RedisStore
from proxy.location import Binding, LocationError
from proxy.sip.auth import digest_response, ha1, parse_credentials
from proxy.sip.message import Response
from tests.admin.conftest import LiveSite, live_site
from tests.admin.sip_ua import BUSY, DOMAIN, HOST, UdpUa
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

BOB = f"sip:bob@{DOMAIN}"
PASSWORD = "correct horse"
WITHIN = 15.0  # seconds for the site to notice and repair (it checks every second or so)


async def register(ua: UdpUa, user: str, password: str) -> Response:
    """REGISTER as ``UdpUa.register`` does, answering one 401; the final response."""
    call_id = f"reg-{uuid.uuid4().hex}"
    ua.send(ua._register(user, call_id, 300, None))
    resp = await ua.final_response(call_id)
    if resp.status != 401:
        return resp
    challenge = parse_credentials(resp.headers.get("WWW-Authenticate") or "")[0]
    algorithm = challenge.get("algorithm") or "MD5"
    realm, nonce = challenge.get("realm") or "", challenge.get("nonce") or ""
    uri, cnonce, nc = f"sip:{DOMAIN}", uuid.uuid4().hex[:8], "00000001"
    digest = digest_response(
        algorithm=algorithm, ha1_hex=ha1(user, realm, password, algorithm), nonce=nonce,
        method="REGISTER", uri=uri, qop="auth", nc=nc, cnonce=cnonce,
    )  # fmt: skip
    authorization = (
        f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
        f'response="{digest}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}"'
    )
    ua.send(ua._register(user, call_id, 300, authorization))
    return await ua.final_response(call_id)


async def call(ua: UdpUa, user: str) -> int:
    """INVITE sip:user@example.com from a caller outside the site (who needs no
    credentials to call a user here); the final status (BUSY: the phone was reached)."""
    call_id, branch = f"inv-{uuid.uuid4().hex}", f"z9hG4bK{uuid.uuid4().hex[:16]}"
    via = f"Via: SIP/2.0/UDP {HOST}:{ua.port};branch={branch};rport"
    common = (
        f"Max-Forwards: 70\r\nFrom: <sip:caller@outside.test>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\nCall-ID: {call_id}\r\n"
    )
    ua.send(
        f"INVITE sip:{user}@{DOMAIN} SIP/2.0\r\n{via}\r\n{common}CSeq: 1 INVITE\r\n"
        f"Contact: <sip:caller@{HOST}:{ua.port}>\r\nContent-Length: 0\r\n\r\n".encode()
    )
    resp = await ua.final_response(call_id)
    to = resp.headers.get("To")
    common = common.replace(f"To: <sip:{user}@{DOMAIN}>", f"To: {to}")
    # RFC 3261 §17.1.1.3: the ACK of a non-2xx final response is hop by hop.
    ua.send(
        f"ACK sip:{user}@{DOMAIN} SIP/2.0\r\n{via}\r\n{common}CSeq: 1 ACK\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    return resp.status


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WITHIN
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WITHIN} s: {what}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def raw_client(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def ready(site: LiveSite) -> tuple[int, dict[str, tuple[bool, str]]]:
    r = await site.client.get("/ready")
    return r.status_code, {c["name"]: (c["ok"], c["detail"]) for c in r.json()["checks"]}


@pytest.fixture
async def site(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[LiveSite]:
    """A site on the test's Redis with user bob, whose phone is registered."""
    async with live_site(tmp_path, redis_url=redis_server.url) as s:
        r = await s.client.put("/users/bob", json={"password": PASSWORD})
        assert r.status_code == 201
        phone = await s.ua()
        assert (await register(phone, "bob", PASSWORD)).status == 200
        yield s


def forget_everything(server: RedisServer) -> None:
    """Kill redis-server and start it again without its data (a crash, no persistence)."""
    server.stop(graceful=False)
    shutil.rmtree(server.dir / "appendonlydir", ignore_errors=True)
    (server.dir / "dump.rdb").unlink(missing_ok=True)
    server.restart()


# --- Redis away ---------------------------------------------------------------------------


async def test_while_redis_is_away_calls_work_and_register_is_503(
    site: LiveSite, redis_server: RedisServer
) -> None:
    caller, newcomer = await site.ua(), await site.ua()
    redis_server.stop(graceful=False)

    resp = await register(newcomer, "bob", PASSWORD)
    assert resp.status == 503
    assert int(resp.headers.get("Retry-After") or 0) > 0
    # The phone registered before the outage is still reached.
    assert await call(caller, "bob") == BUSY

    status, checks = await ready(site)
    assert status == 503
    ok, detail = checks["redis"]
    assert not ok and detail.startswith("unreachable: ")
    assert "calls reach the 1 AOR(s) held in memory" in detail
    assert checks["users"][0]  # the users are still in memory: 200 for the right password

    # Redis returns (with its data): service returns, without a restart.
    redis_server.restart()

    async def registers() -> bool:
        return (await register(newcomer, "bob", PASSWORD)).status == 200

    await eventually(registers, "REGISTER works again")
    assert (await ready(site))[0] == 200
    contacts = {b["contact"] for b in (await site.client.get(f"/registrations/{BOB}")).json()[
        "bindings"
    ]}  # fmt: skip
    assert newcomer.contact in contacts
    assert await call(caller, "bob") == BUSY


async def test_a_refused_register_leaves_nothing_behind(
    site: LiveSite, redis_server: RedisServer
) -> None:
    r = await site.client.put("/users/alice", json={"password": PASSWORD})
    assert r.status_code == 201
    phone = await site.ua()
    redis_server.stop(graceful=False)
    assert (await register(phone, "alice", PASSWORD)).status == 503
    redis_server.restart()
    store = site.site.store
    assert isinstance(store, CachedStore)
    await eventually(lambda: _true(store.available), "the store is up again")
    # The 503 acknowledged nothing: alice has no binding, in Redis or in memory.
    assert (await site.client.get(f"/registrations/sip:alice@{DOMAIN}")).status_code == 404
    redis_server.stop(graceful=False)
    with pytest.raises(LocationError):
        await store.load(f"sip:alice@{DOMAIN}", time.time())


async def test_a_stuck_redis_costs_one_timeout_then_calls_come_from_memory(
    site: LiveSite, redis_server: RedisServer
) -> None:
    caller = await site.ua()
    process = redis_server._process  # SIGSTOP: connections hang instead of being refused
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)
    try:
        assert await call(caller, "bob") == BUSY  # after one command timeout (2 s)
        store = site.site.store
        assert isinstance(store, CachedStore)
        await eventually(lambda: _false(store.available), "the store is known to be down")
        started = time.monotonic()
        assert await call(caller, "bob") == BUSY
        assert time.monotonic() - started < 1.0  # no Redis round trip any more
    finally:
        os.kill(process.pid, signal.SIGCONT)
    await eventually(lambda: _true(store.available), "the store is up again")


async def _true(value: bool) -> bool:
    return value


async def _false(value: bool) -> bool:
    return not value


# --- Redis back, but empty -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["flushall", "restart without persistence"])
async def test_an_empty_redis_gets_the_bindings_and_users_back(
    site: LiveSite, redis_server: RedisServer, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caller, other = await site.ua(), await site.ua()
    async with raw_client(redis_server) as raw:
        before = await raw.hgetall("p2psip:user:bob")
        assert before and await raw.exists(f"p2psip:aor:{BOB}")
        if how == "flushall":
            await raw.flushall()
    if how != "flushall":
        forget_everything(redis_server)
    async with raw_client(redis_server) as raw:

        async def restored() -> bool:
            # Meanwhile the site never forgets bob: his password keeps working.
            assert site.users.get("bob") is not None
            return (
                await raw.hgetall("p2psip:user:bob") == before
                and await raw.exists(f"p2psip:aor:{BOB}") == 1
            )

        await eventually(restored, "bob's user and binding are back in Redis")
    assert await call(caller, "bob") == BUSY
    assert (await register(other, "bob", PASSWORD)).status == 200
    assert (await register(other, "bob", "wrong")).status == 403
    status, checks = await ready(site)
    assert status == 200, checks
    assert checks["users"] == (True, "1 user(s), digest authentication on")
    # Redis really had lost both (they were written back, not found), and the site said so.
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("had lost its data; wrote back 1 AOR(s) with 1 binding(s)" in m for m in lines)
    assert any("had lost them; wrote back 1 user(s)" in m for m in lines)


async def test_no_users_with_authentication_on_is_not_ready(site: LiveSite) -> None:
    assert (await site.client.delete("/users/bob")).status_code == 204
    status, checks = await ready(site)
    assert status == 503
    ok, detail = checks["users"]
    assert not ok and "no users: every REGISTER is refused" in detail
    assert (await register(await site.ua(), "bob", PASSWORD)).status == 403


# --- several processes on one Redis -----------------------------------------------------------


def binding(aor: str, contact: str, now: float) -> Binding:
    return Binding(aor=aor, contact=contact, expires_at=now + 300, call_id=contact, cseq=1)


async def test_processes_sharing_redis_each_write_back_what_they_hold(
    redis_server: RedisServer,
) -> None:
    now = time.time()
    alice, carol = f"sip:alice@{DOMAIN}", f"sip:carol@{DOMAIN}"
    first = CachedStore(RedisStore(redis_server.url), check_interval=0.1)
    # The second checks only when told (a load that disagrees with memory tells it).
    second = CachedStore(RedisStore(redis_server.url), check_interval=3600)
    await first.start()
    await second.start()
    try:
        await first.save(alice, [binding(alice, "sip:a@192.0.2.1", now)], now)
        await second.save(carol, [binding(carol, "sip:c@192.0.2.3", now)], now)
        # Reads go to Redis: each sees what the other saved, and holds it from then on.
        assert [b.contact for b in await second.load(alice, now)] == ["sip:a@192.0.2.1"]
        async with raw_client(redis_server) as raw:
            await raw.flushall()
            await eventually(
                lambda: _exists(raw, f"p2psip:aor:{alice}"), "the first wrote alice back"
            )
            # carol was saved through the second only: the first never held her.
            assert not await raw.exists(f"p2psip:aor:{carol}")
            # The first set a new marker; the second, told by a load that disagrees with
            # what it holds, still writes back what it holds.
            assert [b.contact for b in await second.load(carol, now)] == ["sip:c@192.0.2.3"]
            await eventually(
                lambda: _exists(raw, f"p2psip:aor:{carol}"), "the second wrote carol back"
            )
    finally:
        await first.close()
        await second.close()


async def _exists(raw: aioredis.Redis, key: str) -> bool:
    return bool(await raw.exists(key))


async def test_another_process_removing_bindings_is_not_undone(
    redis_server: RedisServer,
) -> None:
    now = time.time()
    alice = f"sip:alice@{DOMAIN}"
    first = CachedStore(RedisStore(redis_server.url), check_interval=0.1)
    second = CachedStore(RedisStore(redis_server.url), check_interval=0.1)
    await first.start()
    await second.start()
    try:
        await first.save(alice, [binding(alice, "sip:a@192.0.2.1", now)], now)
        assert await second.load(alice, now)
        await second.save(alice, [], now)  # unregistered through the other process
        assert await first.load(alice, now) == []  # Redis is right: the marker is intact
        async with raw_client(redis_server) as raw:
            await raw.flushall()
            await eventually(lambda: _exists(raw, "p2psip:marker:bindings"), "marked again")
            await asyncio.sleep(0.3)
            assert not await raw.exists(f"p2psip:aor:{alice}")
    finally:
        await first.close()
        await second.close()


async def test_memory_is_bounded(redis_server: RedisServer) -> None:
    now = time.time()
    store = CachedStore(RedisStore(redis_server.url), max_aors=2, check_interval=3600)
    await store.start()
    try:
        aors = [f"sip:u{i}@{DOMAIN}" for i in range(3)]
        for i, aor in enumerate(aors):
            await store.save(aor, [binding(aor, f"sip:{i}@192.0.2.{i}", now)], now)
        assert store.held == 2 and store.evicted == 1
        # The least recently used went: while Redis is away only the others are served.
        redis_server.stop(graceful=False)
        with pytest.raises(LocationError):
            await store.load(aors[0], now)
        assert [b.contact for b in await store.load(aors[2], now)] == ["sip:2@192.0.2.2"]
    finally:
        await store.close()


# --- the view's own rules, over a backend in memory that can fail or stall --------------


class FakeBackend(MemoryStore):
    where = "fake backend"

    def __init__(self) -> None:
        super().__init__()
        self.up = True
        self.token: str | None = None  # the marker
        self.gate: asyncio.Event | None = None  # loads read, then wait for it to open

    def _answer(self) -> None:
        if not self.up:
            raise LocationError("fake backend: down")

    async def load(self, aor: str, now: float) -> list[Binding]:
        self._answer()
        found = await super().load(aor, now)
        if self.gate is not None:
            await self.gate.wait()
        return found

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        self._answer()
        await super().save(aor, bindings, now)

    async def aors(self) -> AsyncIterator[str]:
        self._answer()
        async for aor in super().aors():
            yield aor

    async def ping(self) -> None:
        self._answer()

    async def marker(self) -> str | None:
        self._answer()
        return self.token

    async def ensure_marker(self) -> str:
        self._answer()
        self.token = self.token or uuid.uuid4().hex
        return self.token

    async def restore(self, aor: str, bindings: Sequence[Binding], now: float) -> bool:
        self._answer()
        if await super().load(aor, now):
            return False
        await super().save(aor, bindings, now)
        return True


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeBackend, CachedStore]]:
    backend = FakeBackend()
    store = CachedStore(backend, check_interval=3600)  # the watcher runs only when woken
    await store.start()
    try:
        yield backend, store
    finally:
        await store.close()


async def test_a_save_during_a_slow_load_is_what_memory_keeps(
    fake: tuple[FakeBackend, CachedStore],
) -> None:
    backend, store = fake
    now = time.time()
    await store.save(BOB, [binding(BOB, "sip:old@192.0.2.1", now)], now)
    backend.gate = gate = asyncio.Event()
    slow = asyncio.ensure_future(store.load(BOB, now))  # reads "old", then stalls
    await asyncio.sleep(0)
    backend.gate = None
    await store.save(BOB, [binding(BOB, "sip:new@192.0.2.2", now)], now)
    gate.set()
    assert [b.contact for b in await slow] == ["sip:old@192.0.2.1"]
    backend.up = False
    assert [b.contact for b in await store.load(BOB, now)] == ["sip:new@192.0.2.2"]


async def test_right_after_a_loss_a_load_answers_from_memory(
    fake: tuple[FakeBackend, CachedStore],
) -> None:
    backend, store = fake
    now = time.time()
    await store.save(BOB, [binding(BOB, "sip:a@192.0.2.1", now)], now)
    await backend.close()  # FLUSHALL: the bindings and the marker are gone
    backend.token = None
    # A REGISTER arriving now must build on what bob had, not on nothing.
    assert [b.contact for b in await store.load(BOB, now)] == ["sip:a@192.0.2.1"]
    await eventually(lambda: _true(backend.token is not None), "the watcher wrote back")
    assert [b.contact for b in await backend.load(BOB, now)] == ["sip:a@192.0.2.1"]


async def test_while_down_saves_fail_at_once_and_unknown_aors_are_503(
    fake: tuple[FakeBackend, CachedStore],
) -> None:
    backend, store = fake
    now = time.time()
    await store.save(BOB, [binding(BOB, "sip:a@192.0.2.1", now)], now)
    backend.up = False
    with pytest.raises(LocationError):
        await store.ping()  # wakes the watcher, which finds the backend down
    await eventually(lambda: _false(store.available), "the store is known to be down")
    with pytest.raises(LocationError, match="unreachable"):
        await store.save(BOB, [], now)
    with pytest.raises(LocationError, match="not held in memory"):
        await store.load(f"sip:nobody@{DOMAIN}", now)
    with pytest.raises(LocationError):
        _ = [aor async for aor in store.aors()]
    assert len(await store.load(BOB, now)) == 1  # the failed save changed nothing
    backend.up = True
    await store.ping()
    await eventually(lambda: _true(store.available), "the store is up again")
