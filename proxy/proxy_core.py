"""Stateful proxying (RFC 3261 §16): from a received request to forked client transactions.

``ProxyCore.route`` decides the targets (Route set, registered bindings, or the
Request-URI itself) and their flows; ``ProxyContext`` runs one forked request: one
client transaction per branch, §16.7 response selection, CANCEL and Timer C.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dht_adaptor.node import DhtError

from dht_adaptor.location import Binding, LocationError

from .dht_routing import STALE_STATUSES, DhtRouter, is_relayed
from .sip import transaction as tx
from .sip.errors import SipError
from .sip.forwarding import (
    DIALOG_CREATING,
    ProxyIdentity,
    check_loop,
    check_routable,
    forward_copy,
    loop_hash,
    make_branch,
    next_hop_uri,
    preprocess_routes,
)
from .sip.headers import Headers
from .sip.message import Request, Response, make_response
from .sip.registrar import contact_key
from .sip.response_context import ResponseContext
from .sip.uri import SipUri, TelUri, aor_of
from .transport import Flow

if TYPE_CHECKING:
    from .server import ClientTx, ServerTx, SipServer

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, PRACK, UPDATE, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER"


class RoutingError(SipError):
    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status_code = status
        self.reason = reason
        self.retry_after = retry_after


@dataclass(slots=True)
class Target:
    uri: str | None  # new Request-URI, or None to keep it
    flow: Flow
    path: tuple[str, ...] = ()
    # Set for a home proxy found in the DHT (see proxy.dht_routing).
    dht_aor: str | None = None
    dht_ruri: SipUri | None = None
    from_cache: bool = False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class ProxyCore:
    def __init__(self, server: SipServer) -> None:
        self.server = server
        cfg = server.config
        self.domains = cfg.domains
        self.me = ProxyIdentity(cfg.advertise or cfg.sip_listen.host, cfg.sip_listen.port, cfg.domains)
        self.auth: Any | None = None
        self.dht: DhtRouter | None = None
        self._dns: dict[str, tuple[float, str]] = {}

    def set_address(self, port: int) -> None:
        cfg = self.server.config
        host = cfg.advertise or cfg.sip_listen.host
        if host in ("0.0.0.0", "::"):
            host = _primary_address()
        aliases = {(host.lower(), port)}
        if cfg.sip_listen.host not in ("0.0.0.0", "::"):
            aliases.add((cfg.sip_listen.host.lower(), port))
        self.me = ProxyIdentity(host, port, self.domains, frozenset(aliases))

    # --- classification ----------------------------------------------------------------

    def serves(self, uri: SipUri) -> bool:
        host = uri.host.lower()
        if host in self.domains or self.me.is_my_address(uri):
            return True
        return not self.domains and not _is_ip(host)

    def is_for_registrar(self, req: Request) -> bool:
        return req.method == "REGISTER"

    def is_for_me(self, req: Request) -> bool:
        ruri = req.ruri
        if not isinstance(ruri, SipUri) or ruri.user is not None:
            return False
        if not (self.me.is_my_address(ruri) or ruri.host.lower() in self.domains):
            return False
        routes = req.headers.values("Route")
        return all(self._route_is_me(r) for r in routes)

    def _route_is_me(self, value: str) -> bool:
        from .sip.headers import parse_name_addr

        uri = parse_name_addr(value).uri
        return isinstance(uri, SipUri) and self.me.is_my_address(uri)

    def answer_locally(self, stx: ServerTx) -> None:
        req = stx.request
        if req.method == "OPTIONS":
            extra = [("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", "path")]
            self.server.respond(stx, make_response(req, 200, to_tag=stx.to_tag, extra=extra))
        else:
            self.server.respond(
                stx, make_response(req, 405, to_tag=stx.to_tag, extra=[("Allow", "OPTIONS, REGISTER")])
            )

    # --- routing -----------------------------------------------------------------------

    async def route(self, stx: ServerTx) -> None:
        req = stx.request
        check_routable(req)
        h = loop_hash(req)
        check_loop(req, self.me, h)
        preprocess_routes(req, self.me)
        in_dialog = req.to.tag is not None
        relayed = is_relayed(req.ruri)
        # A request relayed by another site's proxy was authenticated there; it can only
        # reach local bindings here (never the DHT), like any call from outside.
        if (
            self.auth is not None
            and not in_dialog
            and not relayed
            and req.method in ("INVITE", "MESSAGE", "SUBSCRIBE", "REFER")
            and self._from_local_user(req)
        ):
            if self.auth.authenticate(stx, proxy=True) is None:
                return
        self.start_context(stx, req, h, await self._targets(req, in_dialog, relayed))

    def start_context(self, stx: ServerTx, req: Request, h: str, targets: list[Target]) -> None:
        ctx = ProxyContext(self, stx, req, targets, h)
        stx.context = ctx
        ctx.start()

    async def retry_dht(self, ctx: ProxyContext) -> None:
        """RFC-wise a new set of branches of the same request: the cached bindings of
        ``ctx`` failed, so look the AOR up afresh and try the home proxies found."""
        assert self.dht is not None and ctx.dht_aor is not None and ctx.dht_ruri is not None
        try:
            found = await self.dht.route(ctx.dht_aor, ctx.dht_ruri, fresh=True)
        except (DhtError, TimeoutError) as exc:
            log.warning("DHT lookup of %s failed: %s", ctx.dht_aor, exc)
            found = None
        tried = {b.flow for b in ctx.branches}
        if found is None or ctx.cancelled or {t.flow for t in found.targets} <= tried:
            # Nothing new to try (the same home proxies failed): answer now, within
            # the one Timer B/F the caller already waited.
            ctx.forward_held()
            return
        self.server.stats.inc("dht_retries")
        self.start_context(ctx.stx, ctx.request, ctx.hash, found.targets)

    def _from_local_user(self, req: Request) -> bool:
        uri = req.from_.uri
        return isinstance(uri, SipUri) and self.serves(uri)

    async def _targets(self, req: Request, in_dialog: bool, relayed: bool) -> list[Target]:
        hop = next_hop_uri(req)
        if hop is not None:
            return [Target(None, await self.resolve(hop))]
        ruri = req.ruri
        if isinstance(ruri, TelUri) and self.domains:
            ruri = SipUri("sip", ruri.number, self.domains[0])
        if not in_dialog and isinstance(ruri, SipUri) and ruri.user and self.serves(ruri):
            return await self._lookup(aor_of(ruri), ruri, req, relayed)
        if not isinstance(ruri, SipUri):
            raise RoutingError(404, "Not Found")
        return [Target(None, await self.flow_for_uri(ruri))]

    async def _lookup(self, aor: str, ruri: SipUri, req: Request, relayed: bool) -> list[Target]:
        registrar = self.server.registrar
        try:
            bindings = await registrar.lookup(aor)
        except LocationError as exc:
            log.error("lookup %s failed: %s", aor, exc)
            raise RoutingError(503, "Location Service Unavailable") from None
        if not bindings:
            # Local bindings win; with none, the DHT may know the user's home proxies.
            if self.dht is not None and not relayed:
                targets = await self._dht_targets(aor, ruri, req)
                if targets:
                    return targets
            if registrar.is_known(aor):
                raise RoutingError(480, "Temporarily Unavailable")
            raise RoutingError(404, "Not Found")
        self.server.stats.inc("calls_routed_local")
        targets = []
        for b in sorted(bindings, key=lambda b: -b.q):
            try:
                targets.append(Target(b.contact, await self.flow_for_binding(b), b.path))
            except RoutingError as exc:
                log.info("skipping binding %s of %s: %s", b.contact, aor, exc)
        if not targets:
            raise RoutingError(480, "Temporarily Unavailable")
        return targets

    async def _dht_targets(self, aor: str, ruri: SipUri, req: Request) -> list[Target]:
        assert self.dht is not None
        try:
            found = await self.dht.route(aor, ruri)
        except (DhtError, TimeoutError) as exc:
            log.warning("%s %s: DHT lookup of %s failed: %s", req.method, req.call_id, aor, exc)
            raise RoutingError(503, "Location Service Unavailable", retry_after=5) from None
        if found is None:
            return []
        self.server.stats.inc("calls_routed_dht")
        for t in found.targets:
            t.dht_aor, t.dht_ruri, t.from_cache = aor, ruri, found.from_cache
        return found.targets

    async def flow_for_binding(self, b: Binding) -> Flow:
        from .sip.headers import parse_name_addr

        uri = parse_name_addr(f"<{b.contact}>").uri
        if not isinstance(uri, SipUri):
            raise RoutingError(416, "Unsupported URI Scheme")
        return await self._via_flow(b.source, uri)

    async def flow_for_uri(self, uri: SipUri) -> Flow:
        source = self.server.registrar.contact_flows.get(str(uri)) or self.server.registrar.contact_flows.get(
            contact_key(str(uri))
        )
        return await self._via_flow(source, uri)

    async def _via_flow(self, source: str | None, uri: SipUri) -> Flow:
        """The phone's own flow when we hold one (NAT-safe, RFC 5626 spirit), else the URI."""
        if source:
            flow = Flow.parse(source)
            if flow.transport == "udp":
                # A UDP source only helps a phone behind NAT, whose Contact names another
                # host than the REGISTER came from. A Contact on the source host says where
                # the phone listens (it may have registered from another port, or a third
                # party registered it): RFC 3261 §16.5 targets that contact.
                if uri.transport == "udp" and uri.host.strip("[]") != flow.host:
                    return flow
            elif self.server.transport.has_connection(flow.host, flow.port):
                return flow
        return await self.resolve(uri)

    async def resolve(self, uri: SipUri) -> Flow:
        """RFC 3263, simplified: maddr or host, A/AAAA lookup, port 5060, transport param."""
        transport = uri.transport
        if transport not in ("udp", "tcp"):
            raise RoutingError(503, f"Transport {transport} Not Supported")
        host = (uri.param("maddr") or uri.host).strip("[]")
        port = uri.port or 5060
        if not _is_ip(host):
            host = await self._lookup_host(host)
        return Flow(transport, host, port)

    async def _lookup_host(self, name: str) -> str:
        now = time.monotonic()
        cached = self._dns.get(name)
        if cached is not None and cached[0] > now:
            return cached[1]
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(name, None, type=socket.SOCK_DGRAM), 5.0)
        except (OSError, TimeoutError):
            raise RoutingError(503, "DNS Lookup Failed") from None
        if not infos:
            raise RoutingError(503, "DNS Lookup Failed")
        addr = str(infos[0][4][0])
        self._dns[name] = (now + 60.0, addr)
        return addr

    # --- stateless parts ---------------------------------------------------------------

    def forward_ack(self, req: Request, flow: Flow) -> None:
        """An ACK for a 2xx is its own end-to-end request; forward it statelessly (§16.11)."""
        self.server.spawn(self._forward_ack(req, flow))

    async def _forward_ack(self, req: Request, flow: Flow) -> None:
        try:
            check_routable(req)
            preprocess_routes(req, self.me)
            hop = next_hop_uri(req)
            ruri = req.ruri
            if hop is not None:
                dest = await self.resolve(hop)
            elif isinstance(ruri, SipUri):
                dest = await self.flow_for_uri(ruri)
            else:
                return
        except SipError as exc:
            log.debug("dropping ACK %s: %s", req.call_id, exc)
            return
        # Deterministic branch: a retransmitted ACK gets the same one (§16.11).
        unique = hashlib.sha1((req.top_via.branch or req.call_id).encode()).hexdigest()[:10]
        fwd = forward_copy(
            req, None, self.me, branch=make_branch(loop_hash(req), unique),
            out_transport=dest.transport, in_transport=flow.transport, record_route=False,
        )
        self.server.transport.send(dest, fwd.to_bytes())

    def forward_stray_response(self, resp: Response) -> None:
        top = resp.top_via
        if top.host.lower() != self.me.host.lower() or (top.port or 5060) != self.me.port:
            return
        vias = resp.vias
        if len(vias) < 2:
            return
        fwd = resp.copy()
        fwd.headers.pop_first_value("Via")
        nxt = vias[1]
        host = nxt.received or nxt.host
        port = int(nxt.rport) if nxt.rport else (nxt.port or 5060)
        self.server.transport.send(Flow(nxt.transport.lower(), host, port), fwd.to_bytes())


@dataclass(eq=False)
class Branch:
    request: Request
    flow: Flow
    client: ClientTx | None = None
    provisional: bool = False
    done: bool = False
    cancel_wanted: bool = False
    timer_c: asyncio.TimerHandle | None = field(default=None, repr=False)


class ProxyContext:
    def __init__(
        self, core: ProxyCore, stx: ServerTx, req: Request, targets: list[Target], hash_: str
    ) -> None:
        self.core = core
        self.server = core.server
        self.stx = stx
        self.request = req
        self.targets = targets
        self.hash = hash_
        self.branches: list[Branch] = []
        self.responses = ResponseContext(len(targets))
        self.cancelled = False
        # Routed through the DHT: a stale-looking failure drops the cached lookup, and
        # if the targets came from the cache, the final response waits for one retry.
        first = targets[0] if targets else None
        self.dht_aor = first.dht_aor if first is not None else None
        self.dht_ruri = first.dht_ruri if first is not None else None
        self.from_cache = first is not None and first.from_cache
        self.stale = False
        self.held_final: Response | None = None

    def start(self) -> None:
        req = self.request
        rr = req.method in DIALOG_CREATING and req.to.tag is None
        for i, t in enumerate(self.targets):
            fwd = forward_copy(
                req, t.uri, self.core.me,
                branch=make_branch(self.hash, secrets.token_hex(6)),
                out_transport=t.flow.transport, in_transport=self.stx.flow.transport,
                record_route=rr, path=t.path,
            )
            branch = Branch(fwd, t.flow)
            self.branches.append(branch)
            branch.client = self.server.start_client(
                fwd, t.flow,
                on_response=functools.partial(self._on_response, i),
                on_timeout=functools.partial(self._on_timeout, i),
            )
            if req.method == "INVITE":
                self._arm_timer_c(i)

    def _arm_timer_c(self, i: int) -> None:
        b = self.branches[i]
        if b.timer_c is not None:
            b.timer_c.cancel()
        b.timer_c = asyncio.get_running_loop().call_later(
            self.server.config.timer_c, self._timer_c_fired, i
        )

    def _timer_c_fired(self, i: int) -> None:
        # RFC 3261 §16.8: no final response in time: CANCEL if it rang, else a 408.
        b = self.branches[i]
        b.timer_c = None
        if b.done:
            return
        if b.provisional:
            self._send_cancel(i)
        else:
            self._on_timeout(i)

    def _on_response(self, i: int, resp: Response) -> None:
        b = self.branches[i]
        if b.done:
            return
        up = resp.copy()
        up.headers.pop_first_value("Via")
        status = resp.status
        if status in STALE_STATUSES:
            self._saw_stale()
        if status < 200:
            if not b.provisional:
                b.provisional = True
                if b.cancel_wanted:
                    self._send_cancel(i)
            if status > 100 and self.request.method == "INVITE":
                self._arm_timer_c(i)  # §16.7 step 2: provisionals reset Timer C
        else:
            b.done = True
            if b.timer_c is not None:
                b.timer_c.cancel()
        self._apply(self.responses.on_response(i, up))

    def _on_timeout(self, i: int) -> None:
        b = self.branches[i]
        if b.done:
            return
        b.done = True
        if b.timer_c is not None:
            b.timer_c.cancel()
        status = 487 if self.cancelled else 408
        self._saw_stale()
        self._apply(self.responses.on_response(i, make_response(self.request, status)))

    def _saw_stale(self) -> None:
        if self.dht_aor is not None and self.core.dht is not None:
            self.stale = True
            self.core.dht.failed(self.dht_aor)

    def _apply(self, decision: Any) -> None:
        for resp in decision.forward:
            if self.cancelled and resp.status == 408:
                resp = make_response(self.request, 487)
            if resp.status >= 300 and self.stale and self.from_cache and not self.cancelled:
                self.held_final = resp
                self.server.spawn(self.core.retry_dht(self))
                continue
            self.server.respond(self.stx, resp)
        if decision.cancel_pending:
            self.cancel()

    def forward_held(self) -> None:
        resp = self.held_final
        if resp is not None:
            self.held_final = None
            self.server.respond(self.stx, make_response(self.request, 487) if self.cancelled else resp)

    def cancel(self) -> None:
        """CANCEL every branch still pending (§16.10); one without a provisional waits."""
        self.cancelled = True
        for i, b in enumerate(self.branches):
            if b.done or b.cancel_wanted:
                continue
            b.cancel_wanted = True
            if b.provisional:
                self._send_cancel(i)

    def _send_cancel(self, i: int) -> None:
        b = self.branches[i]
        if self.request.method != "INVITE":
            return
        fwd = b.request
        headers = Headers()
        headers.add("Via", fwd.headers.values("Via")[0])
        for r in fwd.headers.get_all("Route"):
            headers.add("Route", r)
        for name in ("From", "To", "Call-ID"):
            headers.add(name, fwd.headers.get(name) or "")
        headers.add("CSeq", f"{fwd.cseq.number} CANCEL")
        headers.add("Max-Forwards", "70")
        cancel = Request("CANCEL", fwd.uri, headers)
        self.server.start_client(cancel, b.flow, on_response=lambda r: None, on_timeout=lambda: None)


def _primary_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


__all__ = ["ProxyContext", "ProxyCore", "RoutingError", "tx"]
