"""A minimal SIP user agent on a UDP socket, for in-process tests of the admin API:
REGISTER (answering a digest challenge when it gets one) and INVITE."""

from __future__ import annotations

import asyncio
import time
import uuid

from proxy.sip.auth import digest_response, ha1, parse_credentials
from proxy.sip.message import Request, Response, make_response, parse_message

HOST = "127.0.0.1"
DOMAIN = "example.com"
WAIT = 5.0
BUSY = 486  # what a UA answers every INVITE with


class UdpUa(asyncio.DatagramProtocol):
    def __init__(self, proxy_port: int) -> None:
        self.proxy_port = proxy_port
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None
        self.cseq = 0

    @classmethod
    async def open(cls, proxy_port: int) -> UdpUa:
        loop = asyncio.get_running_loop()
        _, ua = await loop.create_datagram_endpoint(lambda: cls(proxy_port), local_addr=(HOST, 0))
        return ua

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if not data.strip():
            return
        msg = parse_message(data)
        if isinstance(msg, Request) and msg.method == "INVITE":
            # The phone is reached: it answers busy, a final response that needs no dialog.
            assert self.transport is not None
            self.transport.sendto(make_response(msg, BUSY, to_tag="callee").to_bytes(), addr)
            return
        self.inbox.put_nowait(msg)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    @property
    def contact(self) -> str:
        return f"sip:ua@{HOST}:{self.port}"

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, self.proxy_port))

    async def final_response(self, call_id: str, timeout: float = WAIT) -> Response:
        """The first final response for ``call_id`` (skipping 1xx and anything else)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.inbox.get(), max(0.01, deadline - time.monotonic()))
            if isinstance(msg, Response) and msg.call_id == call_id and msg.status >= 200:
                return msg

    def _register(self, user: str, call_id: str, expires: int, authorization: str | None) -> bytes:
        self.cseq += 1
        lines = [
            f"REGISTER sip:{DOMAIN} SIP/2.0",
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch=z9hG4bK{uuid.uuid4().hex[:16]};rport",
            "Max-Forwards: 70",
            f"From: <sip:{user}@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}",
            f"To: <sip:{user}@{DOMAIN}>",
            f"Call-ID: {call_id}",
            f"CSeq: {self.cseq} REGISTER",
            f"Contact: <{self.contact}>",
            f"Expires: {expires}",
        ]
        if authorization:
            lines.append(f"Authorization: {authorization}")
        return ("\r\n".join(lines) + "\r\nContent-Length: 0\r\n\r\n").encode()

    async def register(self, user: str, password: str | None = None, expires: int = 300) -> int:
        """REGISTER sip:user@example.com; answer one 401 with ``password``. The status."""
        call_id = f"reg-{uuid.uuid4().hex}"
        self.send(self._register(user, call_id, expires, None))
        resp = await self.final_response(call_id)
        if resp.status != 401 or password is None:
            return resp.status
        challenge = parse_credentials(resp.headers.get("WWW-Authenticate") or "")[0]
        algorithm = challenge.get("algorithm") or "MD5"
        realm = challenge.get("realm") or ""
        nonce = challenge.get("nonce") or ""
        uri = f"sip:{DOMAIN}"
        cnonce, nc = uuid.uuid4().hex[:8], "00000001"
        digest = digest_response(
            algorithm=algorithm, ha1_hex=ha1(user, realm, password, algorithm), nonce=nonce,
            method="REGISTER", uri=uri, qop="auth", nc=nc, cnonce=cnonce,
        )  # fmt: skip
        authorization = (
            f'Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{digest}", algorithm={algorithm}, qop=auth, nc={nc}, cnonce="{cnonce}"'
        )
        self.send(self._register(user, call_id, expires, authorization))
        return (await self.final_response(call_id)).status

    async def invite(self, user: str) -> int:
        """INVITE sip:user@example.com through the proxy; the final status it gets
        (BUSY when it reached a registered UdpUa, which answers every INVITE so)."""
        call_id = f"inv-{uuid.uuid4().hex}"
        branch = f"z9hG4bK{uuid.uuid4().hex[:16]}"
        msg = (
            f"INVITE sip:{user}@{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:caller@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{user}@{DOMAIN}>\r\n"
            f"Call-ID: {call_id}\r\n"
            "CSeq: 1 INVITE\r\n"
            f"Contact: <{self.contact}>\r\n"
            "Content-Length: 0\r\n\r\n"
        ).encode()
        self.send(msg)
        resp = await self.final_response(call_id)
        ack = (
            f"ACK sip:{user}@{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{self.port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: {resp.headers.get('From')}\r\nTo: {resp.headers.get('To')}\r\n"
            f"Call-ID: {call_id}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        if resp.status >= 300:
            self.send(ack)  # RFC 3261 §17.1.1.3: the ACK of a non-2xx is hop by hop
        return resp.status
