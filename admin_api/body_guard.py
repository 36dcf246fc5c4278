"""Request bodies are checked before anything reads them: the bearer token, then the size.

FastAPI reads and parses a body before the route's dependencies run, so the token
dependency alone would answer 401 only after taking in whatever an anonymous client
sent (100 MB took 300 MB of memory). This ASGI middleware sits in front of the app and,
for a request that has a body (a Content-Length above 0, or Transfer-Encoding):

* answers 401 without the right bearer token, from the headers alone;
* answers 413 for a declared Content-Length over ``max_body``, from the headers alone;
* otherwise reads the body itself, counting bytes as they arrive, and answers 413 as soon
  as they pass ``max_body`` (a chunked body declares no size); the app then gets the
  body, at most ``max_body`` bytes, as one message.

Its own answers are JSON with a ``message``, as every error of the API, and close the
connection (``Connection: close``), so the server does not go on reading what the
client still sends. Without ``Expect: 100-continue`` the client has no reason to
wait, so the answer may come while it is still sending; with it, the client is told
before it sends anything. Requests without a body (every GET) pass untouched: the
routes check their token as before, and /health and /ready stay open.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import bearer_credentials, token_matches
from .errors import error_response

MAX_BODY = 64 * 1024  # bytes; the largest body the API takes (a user is a few hundred)


class BodyGuard:
    def __init__(self, app: ASGIApp, *, token: str, max_body: int = MAX_BODY) -> None:
        if not token:
            raise ValueError("the admin API needs a token")
        if max_body < 0:
            raise ValueError(f"max_body must not be negative, got {max_body}")
        self.app = app
        self._token = token.encode("utf-8")
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        lengths = {value.strip() for name, value in headers if name == b"content-length"}
        chunked = any(name == b"transfer-encoding" for name, _ in headers)
        if not chunked and lengths <= {b"0"}:
            await self.app(scope, receive, send)  # no body
            return
        declared = None
        if lengths:
            if len(lengths) > 1 or not next(iter(lengths)).isdigit():
                await _refuse(scope, receive, send, 400, "invalid Content-Length")
                return
            declared = int(next(iter(lengths)))
        authorization = next(
            (value.decode("latin-1") for name, value in headers if name == b"authorization"),
            None,
        )
        if not token_matches(bearer_credentials(authorization), self._token):
            await _refuse(scope, receive, send, 401, "missing or wrong bearer token")
            return
        if declared is not None and declared > self.max_body:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_body:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"request body larger than {self.max_body} bytes"
        await _refuse(scope, receive, send, 413, message)


async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str) -> None:
    headers = {"Connection": "close"}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    await error_response(status, message, headers)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app: the body read already, then the server's (disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
