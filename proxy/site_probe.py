"""Asks every member site's home proxy for an answer (SIP OPTIONS) every few seconds, so
that this site knows which sites are reachable before a call needs them
(:mod:`proxy.sites`), and how long they take to answer."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable

from .resolver import Resolver
from .sip.errors import SipError
from .sip.forwarding import ProxyIdentity, make_branch
from .sip.headers import Headers, parse_name_addr
from .sip.message import Request, Response
from .sip.uri import SipUri
from .sites import SiteDirectory
from .transactions import Transactions

log = logging.getLogger(__name__)


class SiteProber:
    def __init__(
        self,
        sites: SiteDirectory,
        transactions: Transactions,
        resolver: Resolver,
        identity: ProxyIdentity,
        *,
        clock: Callable[[], float] = time.time,
        interval: float = 5.0,
        timeout: float = 1.5,
    ) -> None:
        self._sites = sites
        self._transactions = transactions
        self._resolver = resolver
        self._me = identity
        self._clock = clock
        self.interval = interval
        self.timeout = timeout

    async def run(self) -> None:
        while True:
            now = self._clock()
            self._sites.sweep(now)
            for home in self._sites.homes():
                await self.probe(home)
            await asyncio.sleep(self.interval)

    async def probe(self, home: str) -> None:
        try:
            uri = parse_name_addr(f"<{home}>").uri
            if not isinstance(uri, SipUri):
                return
            flow = await self._resolver.resolve(uri)
        except SipError as exc:
            log.debug("cannot probe %s: %s", home, exc)
            self._sites.missed(home, self._clock())
            return
        loop = asyncio.get_running_loop()
        sent = loop.time()
        answered = False

        def on_response(resp: Response) -> None:
            nonlocal answered
            if not answered:
                answered = True
                self._sites.answered(home, self._clock(), loop.time() - sent)

        def expired() -> None:
            if not answered:
                self._sites.missed(home, self._clock())

        self._transactions.start_client(
            self._options(uri, flow.transport), flow, on_response, lambda: None
        )
        loop.call_later(self.timeout, expired)

    def _options(self, uri: SipUri, transport: str) -> Request:
        target = str(SipUri("sip", None, uri.host, uri.port, uri.params))
        headers = Headers()
        me = self._me
        headers.add("Via", me.via(transport, make_branch("probe", secrets.token_hex(8))))
        headers.add("Max-Forwards", "70")
        headers.add("From", f"<sip:p2psip@{me.host}:{me.port}>;tag={secrets.token_hex(4)}")
        headers.add("To", f"<{target}>")
        headers.add("Call-ID", f"{secrets.token_hex(10)}@{me.host}")
        headers.add("CSeq", "1 OPTIONS")
        headers.add("Content-Length", "0")
        return Request("OPTIONS", target, headers)
