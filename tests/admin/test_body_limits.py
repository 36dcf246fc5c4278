"""A request body is refused before it is read: 401 without the token, 413 over the limit
(declared, or counted as a chunked body arrives). Sent as an attacker sends it: raw HTTP
over a socket to a real uvicorn server, with the body held back, so that the answer can
only have come from the headers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from starlette.types import Message

from admin_api.app import create_app
from admin_api.body_guard import MAX_BODY, BodyGuard
from admin_api.server import AdminServer

from .conftest import TOKEN, LiveSite

HUGE = 100 * 1024 * 1024  # the 100 MB body of the report
WAIT = 5.0


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data


@pytest.fixture
async def port(site: LiveSite) -> AsyncIterator[int]:
    server = AdminServer(create_app(site.services), "127.0.0.1", 0)
    try:
        yield await server.start()
    finally:
        await server.stop()


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: admin", *headers, "", ""]
    return "\r\n".join(lines).encode()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines if h)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(int(status_line.split()[1]), headers, body)


async def ask(port: int, request: bytes) -> tuple[Answer, bool]:
    """Send ``request`` (headers, and whatever body part it has), read the answer; and
    whether the server then closed the connection (ask with ``Connection: close`` when
    the answer is not a refusal, or this waits for the keep-alive timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), WAIT)
        closed = await asyncio.wait_for(reader.read(1), WAIT) == b""
        return answer, closed
    finally:
        writer.close()


AUTH = f"Authorization: Bearer {TOKEN}"
JSON = "Content-Type: application/json"
CLOSE = "Connection: close"


@pytest.mark.parametrize(
    "auth", ["", "Authorization: Bearer wrong", f"Authorization: Basic {TOKEN}"]
)
async def test_a_huge_body_without_the_token_is_refused_from_the_headers(
    port: int, auth: str
) -> None:
    # Headers only: the 100 MB are never sent, so the answer comes before any body.
    headers = [JSON, f"Content-Length: {HUGE}", *([auth] if auth else [])]
    answer, closed = await ask(port, head("POST", "/users", *headers))
    assert answer.status == 401
    assert answer.json() == {"message": "missing or wrong bearer token"}
    assert answer.headers["www-authenticate"] == "Bearer"
    assert closed  # the server does not wait for (or read) the rest


async def test_a_client_waiting_for_100_continue_never_gets_to_send(port: int) -> None:
    request = head("PUT", "/users/alice", JSON, f"Content-Length: {HUGE}", "Expect: 100-continue")
    answer, closed = await ask(port, request)
    assert answer.status == 401 and closed  # no "100 Continue" came first


async def test_a_declared_size_over_the_limit_is_413_from_the_headers(port: int) -> None:
    request = head("POST", "/users", AUTH, JSON, f"Content-Length: {HUGE}")
    answer, closed = await ask(port, request)
    assert answer.status == 413
    assert answer.json() == {"message": f"request body larger than {MAX_BODY} bytes"}
    assert closed
    # One byte over is over; the limit itself is not (then the JSON is merely invalid).
    over = head("POST", "/users", AUTH, JSON, f"Content-Length: {MAX_BODY + 1}")
    assert (await ask(port, over))[0].status == 413
    body = b" " * (MAX_BODY - 2) + b"{}"
    at = head("POST", "/users", AUTH, JSON, CLOSE, f"Content-Length: {len(body)}") + body
    assert (await ask(port, at))[0].status == 422


async def test_a_chunked_body_without_the_token_is_refused_from_the_headers(port: int) -> None:
    answer, closed = await ask(port, head("POST", "/users", JSON, "Transfer-Encoding: chunked"))
    assert answer.status == 401 and closed


async def test_a_chunked_body_is_cut_off_past_the_limit(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answered = asyncio.ensure_future(read_answer(reader))
    chunk = b"x" * 4096
    sent = 0
    try:
        writer.write(head("POST", "/users", AUTH, JSON, "Transfer-Encoding: chunked"))
        while not answered.done() and sent < 16 * MAX_BODY:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            try:
                await writer.drain()
            except ConnectionError:
                break  # closed after answering: the answer is in our buffer
            await asyncio.wait([answered], timeout=0.02)
        answer = await asyncio.wait_for(answered, WAIT)
    finally:
        answered.cancel()
        writer.close()
    assert answer.status == 413
    assert answer.json() == {"message": f"request body larger than {MAX_BODY} bytes"}
    # The answer came as the limit was passed, not after what the client meant to send.
    assert MAX_BODY < sent <= 4 * MAX_BODY, sent


async def test_bodies_within_the_limit_reach_the_routes(port: int) -> None:
    body = json.dumps({"username": "alice", "password": "wonderland"}).encode()
    request = head("POST", "/users", AUTH, JSON, CLOSE, f"Content-Length: {len(body)}") + body
    answer, _ = await ask(port, request)
    assert answer.status == 201 and answer.json()["username"] == "alice"
    # Chunked, in two pieces.
    body = json.dumps({"password": "looking-glass"}).encode()
    request = head("PUT", "/users/bob", AUTH, JSON, CLOSE, "Transfer-Encoding: chunked") + b"".join(
        b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:5], body[5:], b"")
    )
    answer, _ = await ask(port, request)
    assert answer.status == 201 and answer.json()["username"] == "bob"
    # Requests without a body pass as before: the route checks the token.
    assert (await ask(port, head("GET", "/users", CLOSE)))[0].status == 401
    assert (await ask(port, head("GET", "/health", CLOSE)))[0].status == 200


# --- the middleware alone: it never calls receive() before refusing ---------------------


async def run_guard(
    headers: list[tuple[bytes, bytes]], chunks: list[bytes], max_body: int = 10
) -> tuple[list[Message], int, bytes | None]:
    """Run BodyGuard over an app that echoes the body it reads: (messages sent, how many
    times receive() was called, what the app read (None if it was never called))."""
    pending = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    received = 0
    seen: bytes | None = None

    async def receive() -> Message:
        nonlocal received
        received += 1
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def app(scope: object, receive: Callable[[], Awaitable[Message]], send: object) -> None:
        nonlocal seen
        seen = b""
        while True:
            message = await receive()
            seen += message.get("body", b"")
            if not message.get("more_body"):
                return

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/users", "headers": headers}
    await BodyGuard(app, token=TOKEN, max_body=max_body)(scope, receive, send)
    return sent, received, seen


AUTH_HEADER = (b"authorization", f"Bearer {TOKEN}".encode())


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([(b"content-length", b"5")], 401),
        ([(b"transfer-encoding", b"chunked")], 401),
        ([(b"content-length", b"5"), (b"authorization", b"Bearer nope")], 401),
        ([(b"content-length", b"11"), AUTH_HEADER], 413),
        ([(b"content-length", b"5"), (b"content-length", b"6"), AUTH_HEADER], 400),
        ([(b"content-length", b"-1"), AUTH_HEADER], 400),
    ],
)
async def test_refusals_read_nothing(headers: list[tuple[bytes, bytes]], status: int) -> None:
    sent, received, seen = await run_guard(headers, [b"hello"])
    assert sent[0]["status"] == status
    assert (b"connection", b"close") in sent[0]["headers"]
    assert received == 0 and seen is None


async def test_counted_chunks_and_the_body_passed_on() -> None:
    chunked = [(b"transfer-encoding", b"chunked"), AUTH_HEADER]
    sent, received, seen = await run_guard(chunked, [b"12345", b"67890", b"x", b"more"])
    assert sent[0]["status"] == 413 and received == 3 and seen is None  # stopped at byte 11
    sent, _, seen = await run_guard(chunked, [b"12345", b"67890"])
    assert sent == [] and seen == b"1234567890"  # exactly the limit: the app gets it all
    _, received, seen = await run_guard([(b"content-length", b"0")], [b""])
    assert seen == b"" and received == 1  # no body: untouched, the app reads for itself
