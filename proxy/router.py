"""Stateful proxying (RFC 3261 §16): where a request goes.

``Router.route`` decides the targets (the Route set, this site's bindings, the home
proxies the DHT names, or the Request-URI itself) and hands them to the forker. ACKs for
2xx and stray responses are forwarded statelessly (§16.11).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .auth_gate import AuthGate
from .dht_routing import DhtRoute, DhtRouter, is_relayed
from .directory import LocalDirectory
from .failover import Failover
from .forker import Forker, ForkRunner, Target
from .relay_auth import HEADER as RELAY_HEADER
from .relay_auth import RelayVerifier, Signer
from .relay_auth import sign as sign_relay
from .resolver import Resolver, is_ip
from .sip.binding import Binding
from .sip.errors import (
    Forbidden,
    NotFound,
    SipError,
    TemporarilyUnavailable,
    UnsupportedUriScheme,
)
from .sip.forwarding import (
    ProxyIdentity,
    check_loop,
    check_routable,
    forward_copy,
    is_sips,
    loop_hash,
    make_branch,
    next_hop_uri,
    preprocess_routes,
)
from .sip.headers import parse_name_addr
from .sip.message import Request, Response, make_response
from .sip.registrar import FlowFailed, contact_key
from .sip.tokens import DIALOG_PARAM, ProxyTokens
from .sip.uri import SipUri, TelUri, aor_of
from .sites import SiteDirectory
from .stats import SipCounters
from .transactions import ServerTx, Transactions
from .transport import Flow

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, PRACK, UPDATE, INFO, MESSAGE, SUBSCRIBE, NOTIFY, REFER"  # noqa: E501

Send = Callable[[Flow, bytes], None]
Spawn = Callable[[Coroutine[Any, Any, None]], object]


class Router:
    def __init__(
        self,
        *,
        identity: ProxyIdentity,
        transactions: Transactions,
        directory: LocalDirectory,
        auth: AuthGate,
        resolver: Resolver,
        forker: Forker,
        counters: SipCounters,
        send: Send,
        spawn: Spawn,
        tokens: ProxyTokens,
        dht: DhtRouter | None = None,
        relay_key: Signer | None = None,
        relays: RelayVerifier | None = None,
        clock: Callable[[], float] = time.time,
        sites: SiteDirectory | None = None,
        home_timeout: float = 1.2,
        failover: Failover | None = None,
        handover: Callable[[Response], bool] | None = None,
    ) -> None:
        """``relay_key`` signs the requests this site relays to other sites' home
        proxies; ``relays`` checks those other sites relay here (proxy.relay_auth).
        ``handover``: with several worker processes, takes a response whose client
        transaction another worker holds (proxy.siblings); True if it did."""
        self.me = identity
        self.domains = identity.domains
        self._transactions = transactions
        self._directory = directory
        self._auth = auth
        self._resolver = resolver
        self._forker = forker
        self._counters = counters
        self._send = send
        self._spawn = spawn
        self._tokens = tokens
        self.dht = dht
        self._relay_key = relay_key
        self._relays = relays
        self._clock = clock
        self._sites = sites
        self._home_timeout = home_timeout
        self._failover = failover
        self._handover = handover

    # --- classification ----------------------------------------------------------------

    def serves(self, uri: SipUri) -> bool:
        host = uri.host.lower().rstrip(".")
        if host in self.domains or self.me.is_my_address(uri):
            return True
        return not self.domains and not is_ip(host)

    def _names_our_address(self, uri: SipUri) -> bool:
        return uri.user is not None and bool(self.domains) and self.me.is_my_address(uri)

    def is_for_me(self, req: Request) -> bool:
        """A request to the proxy itself (OPTIONS pings), not to a user."""
        ruri = req.ruri
        if not isinstance(ruri, SipUri) or ruri.user is not None:
            return False
        if not (self.me.is_my_address(ruri) or ruri.host.lower() in self.domains):
            return False
        return all(self._route_is_me(r) for r in req.headers.values("Route"))

    def _route_is_me(self, value: str) -> bool:
        uri = parse_name_addr(value).uri
        return isinstance(uri, SipUri) and self.me.is_my_address(uri)

    def answer_locally(self, stx: ServerTx) -> None:
        req = stx.request
        if req.method == "OPTIONS":
            extra = [("Allow", ALLOW), ("Accept", "application/sdp"), ("Supported", "path")]
            resp = make_response(req, 200, to_tag=stx.to_tag, extra=extra)
        else:
            resp = make_response(
                req, 405, to_tag=stx.to_tag, extra=[("Allow", "OPTIONS, REGISTER")]
            )
        self._transactions.respond(stx, resp)

    # --- routing -----------------------------------------------------------------------

    async def route(self, stx: ServerTx) -> None:
        """Proxy a request. Raises SipError (the caller answers it).

        The relay policy (what Kamailio configs do by hand): a request goes to a user of
        a served domain for anyone, but anywhere else only for a caller authenticated as
        a local user, and only as that user. Which requests need credentials depends on
        where the request would go, decided here, never on what the caller wrote in From,
        a To tag or a URI parameter. An in-dialog request is routed on without
        credentials only when our Record-Route in it carries the dialog's token.
        """
        req = stx.request
        check_routable(req)
        h = loop_hash(req)
        check_loop(req, self.me, h)
        ours = preprocess_routes(req, self.me)
        in_dialog = req.to.tag is not None
        relayed = self._relay_from_member(req)
        # A trusted peer (a Kamailio edge, an ITSP) is taken as an authenticated caller,
        # From and P-Asserted-Identity as it wrote them.
        peer = self._auth.trusted_peer(stx)
        hop = next_hop_uri(req)
        ruri = req.ruri
        if isinstance(ruri, TelUri) and self.domains:
            ruri = SipUri("sip", ruri.number, self.domains[0])
        if not isinstance(ruri, SipUri):
            raise NotFound("no route for a non-SIP Request-URI")
        if not in_dialog and hop is None and self._names_our_address(ruri):
            # Our own address stands for our domain: sip:alice@IP:port is alice's.
            ruri = SipUri(ruri.scheme, ruri.user, self.domains[0])
        to_user = not in_dialog and hop is None and ruri.user is not None and self.serves(ruri)
        if in_dialog:
            vouched = self._dialog_vouched(req, ours) or self._reaches_our_phone(hop, ruri)
            user = None if vouched or peer else self._local_user(stx, relay=True)
        elif to_user:
            # Anyone may call a user here; one who claims to be a local user (or offers
            # credentials) proves it. A request relayed by another site was checked there.
            claims = self._auth.enabled and not (relayed or peer) and self._claims_local(req)
            user = self._local_user(stx, relay=False) if claims else None
        else:
            user = True if peer else self._local_user(stx, relay=True)
        if user is False:
            return  # challenged or refused
        self._assert_identity(req, user if isinstance(user, str) else None, relayed or peer)
        if hop is not None:
            self._forward(stx, req, h, await self._resolver.resolve_all(hop))
            return
        if not to_user:
            self._forward(stx, req, h, await self.flows_for_uri(ruri))
            return
        aor = aor_of(ruri)
        # Only local users learn that a user exists but is not reachable now (on a site
        # without users, where anyone may register, every caller is one).
        tell = isinstance(user, str) or not self._auth.enabled or peer
        try:
            targets = self._over_tls(req, await self._local_targets(aor, stx))
        except TemporarilyUnavailable:
            if tell:
                raise
            raise NotFound(f"{aor} is not reachable") from None
        if targets:
            self._counters.calls_routed_local += 1
            log.info("%s %s to %s: %d local contact(s)", req.method, req.call_id, aor,
                     len(targets))  # fmt: skip
            self._forker.start(stx, req, h, targets)
            return
        known = self._directory.is_known(aor)
        if self.dht is not None and not relayed:
            # Local bindings win; with none, the DHT may know the user's home proxies.
            found = await self.dht.route(aor, ruri)
            dht_targets = self._over_tls(req, await self._dht_targets(found, req))
            if dht_targets:
                self._counters.calls_routed_dht += 1
                log.info("%s %s to %s: through the DHT to %s%s", req.method, req.call_id,
                         aor, ", ".join(str(t.flow) for t in dht_targets),
                         " (cached)" if found.from_cache else "")  # fmt: skip
                self._fork_dht(stx, h, found, dht_targets)
                return
            known = known or found.known
        if known and tell:
            raise TemporarilyUnavailable(f"{aor} has no live binding")
        # Everyone else gets one answer for "no such user" and "not reachable now".
        raise NotFound(f"{aor} is not reachable" if known else f"{aor} is not registered")

    def _relay_from_member(self, req: Request) -> bool:
        """Was this request relayed here by a member site (``;p2psip=home`` and a proof
        that verifies)? A marker without a valid proof is refused: no site sent it. The
        proof never goes further than this proxy."""
        marked = is_relayed(req.ruri)
        kid = self._relays.verify(req, self._clock()) if marked and self._relays else None
        req.headers.remove(RELAY_HEADER)
        if marked and kid is None:
            self._counters.relay_forged += 1
            raise Forbidden("a relay marker without a member site's proof")
        if kid is not None and self._relays is not None:
            asserted = req.headers.get("P-Asserted-Identity")
            uri = _asserted_uri(asserted) if asserted else None
            if asserted and (uri is None or not self._relays.may_assert(kid, aor_of(uri))):
                # Outside the sending site's scope: the caller is not vouched for.
                log.info("%s %s: site key %s may not assert %s; removed", req.method,
                         req.call_id, kid, asserted)  # fmt: skip
                req.headers.remove("P-Asserted-Identity")
        return marked

    def _local_user(self, stx: ServerTx, *, relay: bool) -> str | bool:
        """The authenticated local user; False after answering (challenge or refusal).

        ``relay``: the request goes elsewhere, which only local users may make us do.
        """
        if not self._auth.enabled:
            if not relay:
                return True
            self._counters.relay_denied += 1
            raise Forbidden("relaying denied: no user can authenticate here")
        user = self._auth.authenticate(stx, proxy=True)
        return False if user is None else user

    def _dialog_vouched(self, req: Request, ours: list[SipUri]) -> bool:
        """Was this in-dialog request routed to us through our own Record-Route?"""
        tags = (req.from_.tag, req.to.tag)
        return any(self._tokens.dialog_ok(u.param(DIALOG_PARAM), req.call_id, tags) for u in ours)

    def _reaches_our_phone(self, hop: SipUri | None, ruri: SipUri) -> bool:
        """An in-dialog request straight to a phone registered here (no Route left)."""
        if hop is not None:
            return False
        text = str(ruri)
        return (
            self._directory.flow_of(text) or self._directory.flow_of(contact_key(text))
        ) is not None

    def _claims_local(self, req: Request) -> bool:
        """Does the request claim a local caller (From in a served domain or naming this
        proxy's host), or offer credentials for our realm?"""
        if "Proxy-Authorization" in req.headers:
            return True
        uri = req.from_.uri
        if not isinstance(uri, SipUri):
            return False
        host = uri.host.strip("[]").lower().rstrip(".")
        return self.serves(uri) or host == self.me.host.strip("[]").lower()

    def _assert_identity(self, req: Request, user: str | None, relayed: bool) -> None:
        """RFC 3325: P-Asserted-Identity is ours to write. An authenticated user must be
        who From says (403 otherwise) and is asserted; from anyone else it is removed.
        (A relay from another site, or a request from a trusted peer, keeps what it
        asserted.)"""
        if user is None:
            if not relayed:
                req.headers.remove("P-Asserted-Identity")
            return
        uri = req.from_.uri
        if not (isinstance(uri, SipUri) and uri.user == user and self.serves(uri)):
            self._counters.identity_mismatch += 1
            raise Forbidden(f"{user!r} may not send as {req.from_.uri}")
        req.headers.remove("P-Asserted-Identity")
        req.headers.remove("P-Preferred-Identity")
        req.headers.add("P-Asserted-Identity", f"<sip:{user}@{uri.host.lower().rstrip('.')}>")
        req.invalidate()

    async def _local_targets(self, aor: str, stx: ServerTx) -> list[Target]:
        bindings = await self._directory.lookup(aor)
        chosen, failed = self._directory.select(bindings)
        targets = []
        for b in sorted(chosen, key=lambda b: -b.q):
            try:
                flow = await self._flow_for_binding(b)
            except SipError as exc:
                failed += isinstance(exc, FlowFailed)
                log.info("skipping binding %s of %s: %s", b.contact, aor, exc)
                continue
            targets.append(Target(b.contact, flow, b.path))
        if failed and not targets:
            # RFC 5626 §5.3: the phone's flow is gone; it registers again over a new one.
            self._counters.flow_failed += 1
            raise FlowFailed(f"the outbound flow of every binding of {aor} has failed")
        if bindings and not targets:
            raise TemporarilyUnavailable(f"no binding of {aor} can be reached")
        return targets

    async def _flow_for_binding(self, b: Binding) -> Flow:
        if self._directory.is_outbound(b):
            return self._resolver.outbound_flow(b.source)  # with its Path, if any
        if not b.path:
            return await self._resolver.flow_for_contact(b.contact, b.source)
        # RFC 3327 §5.3: a binding registered through proxies is reached through them.
        # The first Path entry becomes the top Route, so it is the next hop (§16.6 step 7),
        # over the flow the REGISTER came on while we hold it; never the contact itself.
        hop = parse_name_addr(b.path[0]).uri
        if not isinstance(hop, SipUri):
            raise UnsupportedUriScheme(f"cannot route to a {hop.scheme} Path")
        return await self._resolver.via_flow(b.source, hop)

    async def _dht_targets(self, found: DhtRoute, req: Request) -> list[Target]:
        headers: tuple[tuple[str, str], ...] = ()
        if self._relay_key is not None:
            # Signed as it will be sent: with the home proxy's Request-URI.
            sent = req.copy()
            sent.uri = found.ruri
            headers = ((RELAY_HEADER, sign_relay(sent, self._relay_key, self._clock())),)
        # Home proxies known to be unreachable are left out while another one is up;
        # when all are down they are tried all the same (they may be back before the
        # prober notices), and a silent one still ends within home_timeout.
        homes = list(zip(found.home_names, found.homes, strict=True))
        up = [(name, home) for name, home in homes if not self._down(name)]
        if up and len(up) < len(homes):
            skipped = ", ".join(name for name, _ in homes if self._down(name))
            log.info("%s: skipping home proxies known to be unreachable: %s", found.aor, skipped)
        targets = []
        for name, home in up or homes:
            try:
                flow = await self._resolver.resolve(home)
                targets.append(Target(found.ruri, flow, headers=headers, home=name))
            except SipError as exc:
                log.info("skipping home proxy %s of %s: %s", home, found.aor, exc)
        return targets

    def _over_tls(self, req: Request, targets: list[Target]) -> list[Target]:
        """RFC 5630 §3.1.3: a SIPS request goes over TLS only. Targets reached otherwise
        are left out; with none left the answer is 480 with Warning 380."""
        if not is_sips(req):
            return targets
        kept = [t for t in targets if t.flow.transport == "tls"]
        if targets and not kept:
            where = ", ".join(str(t.flow) for t in targets)
            raise TemporarilyUnavailable(
                f"{req.ruri} is reachable only over something else than TLS ({where})",
                headers=[("Warning", f'380 {self.me.host} "SIPS Not Allowed"')],
            )
        return kept

    def _down(self, home: str) -> bool:
        return self._sites is not None and self._sites.is_down(home)

    def _site_of(self, home: str) -> str:
        return self._sites.site_of(home) if self._sites is not None else home

    def _fork_dht(self, stx: ServerTx, h: str, found: DhtRoute, targets: list[Target]) -> None:
        dht = self.dht
        assert dht is not None

        def on_stale(index: int) -> None:
            dht.failed(found.aor)

        def on_hold(runner: ForkRunner) -> None:
            self._spawn(self._retry_dht(runner, h, found))

        def on_silent(index: int) -> None:
            home = targets[index].home or ""
            log.warning("%s %s: no answer from home site %s (%s) in %.1f s",
                        stx.request.method, stx.request.call_id, self._site_of(home), home,
                        self._home_timeout)  # fmt: skip
            if self._sites is not None:
                self._sites.missed(home, self._clock(), at_once=True)

        # Home proxies from the cache that fail in a stale-looking way (404, 408, 480,
        # 503, no answer) hold the final response for one fresh lookup. An INVITE that
        # hears nothing at all from a home proxy (it answers 100 Trying at once) within
        # home_timeout gives that site up.
        invite = stx.request.method == "INVITE"
        self._forker.start(
            stx, stx.request, h, targets,
            retry_stale=found.from_cache, on_stale=on_stale, on_hold=on_hold,
            answer_within=self._home_timeout if invite else None, on_silent=on_silent,
        )  # fmt: skip

    async def _retry_dht(self, runner: ForkRunner, h: str, old: DhtRoute) -> None:
        """The cached home proxies of a call failed: look the AOR up afresh and try the
        home proxies found, within the one Timer B/F the caller already waited."""
        assert self.dht is not None
        found = None
        if not runner.fork.cancelled:
            try:
                found = await self.dht.route(old.aor, old.request_uri, fresh=True)
            except SipError as exc:
                log.warning("DHT lookup of %s failed: %s", old.aor, exc)
        if found is not None and not runner.fork.cancelled:
            targets = await self._dht_targets(found, runner.stx.request)
            if is_sips(runner.stx.request):
                targets = [t for t in targets if t.flow.transport == "tls"]
            # Nothing new to try (the same home proxies failed): answer now.
            if targets and not {t.flow for t in targets} <= runner.tried:
                self._counters.dht_retries += 1
                self._fork_dht(runner.stx, h, found, targets)
                return
        runner.release()

    def _forward(self, stx: ServerTx, req: Request, h: str, flows: list[Flow]) -> None:
        """To the next hop of a Route or a Request-URI: its first target, then (RFC 3263
        §4.3, proxy.failover) the others over the same transport, in turn."""
        targets = self._over_tls(req, [Target(None, flow) for flow in flows])
        first = targets[0].flow
        turn = [t.flow for t in targets if t.flow.transport == first.transport]
        if self._failover is None or len(turn) < 2:
            self._forker.start(stx, req, h, targets[:1])
            return
        with self._failover.targets(turn):
            self._forker.start(stx, req, h, targets[:1])

    async def flows_for_uri(self, uri: SipUri) -> list[Flow]:
        """A phone registered here over its flow; anywhere else by the resolver's rules
        for a Request-URI (static route, outbound proxy, DNS)."""
        source = self._directory.flow_of(str(uri)) or self._directory.flow_of(contact_key(str(uri)))
        if source is not None:
            return [await self._resolver.via_flow(source, uri)]
        return await self._resolver.resolve_request(uri)

    async def flow_for_uri(self, uri: SipUri) -> Flow:
        return (await self.flows_for_uri(uri))[0]

    def routing_stats(self) -> dict[str, int]:
        """DNS lookups and failovers (RFC 3263), for the site's stats."""
        out = self._resolver.stats()
        out["failovers"] = self._failover.failovers if self._failover is not None else 0
        return out

    # --- stateless parts ---------------------------------------------------------------

    def forward_ack(self, req: Request, flow: Flow) -> None:
        """An ACK for a 2xx is its own end-to-end request; forward it statelessly (§16.11)."""
        self._spawn(self._forward_ack(req, flow))

    async def _forward_ack(self, req: Request, flow: Flow) -> None:
        try:
            check_routable(req)
            ours = preprocess_routes(req, self.me)
            hop = next_hop_uri(req)
            ruri = req.ruri
            if not isinstance(ruri, SipUri):
                return
            if not (self._dialog_vouched(req, ours) or self._reaches_our_phone(hop, ruri)):
                # Not a dialog we record-routed: an ACK is never answered, so drop it.
                log.debug("dropping ACK %s: not for a dialog through this proxy", req.call_id)
                return
            dest = (
                await self._resolver.resolve(hop)
                if hop is not None
                else (await self.flow_for_uri(ruri))
            )
        except SipError as exc:
            log.debug("dropping ACK %s: %s", req.call_id, exc)
            return
        # Deterministic branch: a retransmitted ACK gets the same one (§16.11).
        unique = hashlib.sha1((req.top_via.branch or req.call_id).encode()).hexdigest()[:10]
        fwd = forward_copy(
            req, None, self.me, branch=make_branch(loop_hash(req), unique),
            out_transport=dest.transport, in_transport=flow.transport, record_route=False,
        )  # fmt: skip
        log.debug("forwarding ACK %s to %s", req.call_id, dest)
        self._send(dest, fwd.to_bytes())

    def forward_stray_response(self, resp: Response) -> None:
        """RFC 3261 §16.7 step 5: a 2xx to an INVITE whose client transaction has ended
        (a retransmission, or another branch's answer) still goes upstream. Only a 2xx
        to an INVITE, and only along a Via our branch vouches for: anything else that
        names us on top is made up, and would make us send packets anywhere."""
        if self._handover is not None and self._handover(resp):
            return  # another worker process sent the request: its transaction takes it
        if resp.cseq.method != "INVITE" or not 200 <= resp.status < 300:
            return
        top = resp.top_via
        if not self.me.is_my_via(top.host, top.port):
            return
        vias = resp.vias
        if len(vias) < 2 or not self._tokens.branch_ok(top.branch, vias[1]):
            log.debug("dropping a stray %d: not a branch of ours", resp.status)
            return
        fwd = resp.copy()
        fwd.headers.pop_first_value("Via")
        nxt = vias[1]
        host = (nxt.received or nxt.host).strip("[]")
        port = int(nxt.rport) if nxt.rport else (nxt.port or 5060)
        self._send(Flow(nxt.transport.lower(), host, port), fwd.to_bytes())


def _asserted_uri(value: str) -> SipUri | None:
    try:
        uri = parse_name_addr(value.split(",")[0]).uri
    except SipError:
        return None
    return uri if isinstance(uri, SipUri) else None


__all__ = ["ALLOW", "Router"]
