"""A raw SIP client on a UDP socket for attack tests: it sends exactly what the test
writes (spoofed headers included) and answers digest challenges when given a password."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from proxy.sip.auth import digest_response, ha1, parse_credentials
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.transaction import make_ack

WAIT = 5.0


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that records what arrives; as a phone it answers INVITEs 486 and
    other requests 200 (so that a request reaching it is visible to the test)."""

    def __init__(self, answer: bool = True, invite_status: int = 486) -> None:
        self.answer = answer
        self.invite_status = invite_status
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.received: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(
        cls, host: str = "127.0.0.1", *, answer: bool = True, invite_status: int = 486
    ) -> Endpoint:
        loop = asyncio.get_running_loop()
        _, ep = await loop.create_datagram_endpoint(
            lambda: cls(answer, invite_status), local_addr=(host, 0)
        )
        return ep

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    @property
    def host(self) -> str:
        assert self.transport is not None
        return str(self.transport.get_extra_info("sockname")[0])

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not data.strip():
            return
        self.received.append(data)
        msg = parse_message(data)
        if isinstance(msg, Request) and self.answer and msg.method != "ACK":
            status = self.invite_status if msg.method == "INVITE" else 200
            contact = [("Contact", f"<sip:ep@{self.host}:{self.port}>")]
            resp = make_response(msg, status, to_tag="ep", extra=contact)
            assert self.transport is not None
            self.transport.sendto(resp.to_bytes(), addr)
        self.inbox.put_nowait(msg)

    def requests(self) -> list[Request]:
        out = []
        for data in self.received:
            msg = parse_message(data)
            if isinstance(msg, Request):
                out.append(msg)
        return out

    def sendto(self, data: bytes, host: str, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (host, port))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@dataclass
class Sip:
    """Builds requests from this endpoint to a proxy and waits for their answers."""

    ep: Endpoint
    proxy: tuple[str, int]
    cseq: int = 0
    last_request: bytes = field(default=b"", repr=False)

    def build(
        self,
        method: str,
        ruri: str,
        *,
        from_: str,
        to: str,
        call_id: str | None = None,
        to_tag: str | None = None,
        extra: tuple[str, ...] = (),
        cseq_method: str | None = None,
    ) -> tuple[bytes, str]:
        self.cseq += 1
        call_id = call_id or uuid.uuid4().hex
        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        to_header = f"<{to}>" + (f";tag={to_tag}" if to_tag else "")
        lines = [
            f"{method} {ruri} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.ep.host}:{self.ep.port};branch={branch};rport",
            "Max-Forwards: 70",
            f"From: <{from_}>;tag={uuid.uuid4().hex[:8]}",
            f"To: {to_header}",
            f"Call-ID: {call_id}",
            f"CSeq: {self.cseq} {cseq_method or method}",
            f"Contact: <sip:ua@{self.ep.host}:{self.ep.port}>",
            *extra,
        ]
        return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode(), call_id

    async def final(self, call_id: str, cseq: int, timeout: float = WAIT) -> Response:
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.01, deadline - time.monotonic())
            msg = await asyncio.wait_for(self.ep.inbox.get(), left)
            if (
                isinstance(msg, Response)
                and msg.call_id == call_id
                and msg.cseq.number == cseq
                and msg.status >= 200
            ):
                return msg

    async def _send(self, data: bytes, call_id: str) -> Response:
        self.last_request = data
        self.ep.sendto(data, *self.proxy)
        sent = parse_message(data)
        assert isinstance(sent, Request)
        resp = await self.final(call_id, sent.cseq.number)
        if sent.method == "INVITE" and resp.status >= 300:
            # RFC 3261 §17.1.1.3: the ACK of a non-2xx answer, hop by hop.
            ack = make_ack(sent, resp)
            self.ep.sendto(ack.to_bytes(), *self.proxy)
        return resp

    async def request(
        self,
        method: str,
        ruri: str,
        *,
        from_: str,
        to: str | None = None,
        password: str | None = None,
        username: str | None = None,
        to_tag: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> Response:
        """Send one request (and its ACK for a non-2xx INVITE answer); with a password,
        answer a 401/407 once. The final response."""
        to = to or ruri
        data, call_id = self.build(method, ruri, from_=from_, to=to, to_tag=to_tag, extra=extra)
        resp = await self._send(data, call_id)
        if resp.status in (401, 407) and password is not None:
            header = "WWW-Authenticate" if resp.status == 401 else "Proxy-Authenticate"
            reply = "Authorization" if resp.status == 401 else "Proxy-Authorization"
            challenge = parse_credentials(resp.headers.get(header) or "")[0]
            algorithm = challenge.get("algorithm") or "MD5"
            realm = challenge.get("realm") or ""
            nonce = challenge.get("nonce") or ""
            user = username or from_.split(":", 1)[1].split("@")[0]
            cnonce, nc = uuid.uuid4().hex[:8], "00000001"
            digest = digest_response(
                algorithm=algorithm, ha1_hex=ha1(user, realm, password, algorithm),
                nonce=nonce, method=method, uri=ruri, qop="auth", nc=nc, cnonce=cnonce,
            )  # fmt: skip
            creds = (
                f'{reply}: Digest username="{user}", realm="{realm}", nonce="{nonce}", '
                f'uri="{ruri}", response="{digest}", algorithm={algorithm}, qop=auth, '
                f'nc={nc}, cnonce="{cnonce}"'
            )
            data, _ = self.build(method, ruri, from_=from_, to=to, call_id=call_id,
                                 to_tag=to_tag, extra=(*extra, creds))  # fmt: skip
            resp = await self._send(data, call_id)
        return resp
