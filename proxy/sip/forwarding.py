"""Stateful proxy request handling (RFC 3261 §16.3-§16.6), free of I/O.

The server decides *where* a request goes (registrar, location service, Route); these
functions decide *what* goes: validation, Route pre-processing, and the copy sent to
each target with our Via, Record-Route and Max-Forwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .errors import BadExtension, LoopDetected, TooManyHops, UnsupportedUriScheme
from .grammar import get_param, split_commas
from .headers import Via, parse_name_addr
from .message import Request
from .tokens import DIALOG_PARAM
from .uri import SipUri, TelUri

MAGIC_COOKIE = "z9hG4bK"
DEFAULT_MAX_FORWARDS = 70
# Methods whose requests can create a dialog, so the proxy Record-Routes them.
DIALOG_CREATING = frozenset(["INVITE", "SUBSCRIBE", "REFER", "NOTIFY"])
# Option tags this proxy supports in Proxy-Require (RFC 3261 §16.3 step 5).
SUPPORTED_PROXY_OPTIONS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """How this proxy names itself: the addresses in its Via and Record-Route."""

    host: str  # advertised host or IP
    port: int
    domains: tuple[str, ...] = ()  # SIP domains served (lower case)
    aliases: frozenset[tuple[str, int]] = frozenset()  # other (host, port) that are us
    tls_port: int | None = None  # SIP over TLS, when it listens

    def port_for(self, transport: str) -> int:
        return self.tls_port if transport == "tls" and self.tls_port else self.port

    def is_my_address(self, uri: SipUri) -> bool:
        """Does this URI name this proxy's own host and port?"""
        port = uri.port or (5061 if uri.transport == "tls" else 5060)
        host = uri.host.lower()
        return (host, port) == (self.host.lower(), self.port) or (host, port) in self.aliases

    def is_me(self, uri: SipUri) -> bool:
        """Does this URI address the proxy itself (not a user in our domain)?"""
        return self.is_my_address(uri) or (uri.user is None and uri.host.lower() in self.domains)

    def serves(self, uri: SipUri) -> bool:
        return uri.host.lower() in self.domains or self.is_me(uri)

    def rr_uri(self, transport: str, token: str | None = None, *, sips: bool = False) -> str:
        """Our Record-Route entry for a leg over ``transport``. RFC 3261 §16.6 step 4: a
        SIPS request is record-routed with a SIPS URI (which means TLS, RFC 5630)."""
        d = f";{DIALOG_PARAM}={token}" if token else ""
        port = self.port_for(transport)
        if sips and transport == "tls":
            return f"<sips:{self.host}:{port};lr{d}>"
        t = "" if transport == "udp" else f";transport={transport}"
        return f"<sip:{self.host}:{port}{t};lr{d}>"

    def via(self, transport: str, branch: str) -> str:
        port = self.port_for(transport)
        return f"SIP/2.0/{transport.upper()} {self.host}:{port};branch={branch};rport"

    def is_my_via(self, host: str, port: int | None) -> bool:
        """Does a Via sent-by name us (on any of our ports)?"""
        return host.lower() == self.host.lower() and (port or 5060) in (
            self.port,
            self.tls_port,
        )


def check_routable(req: Request) -> None:
    """§16.3 steps 1-5: reasonable syntax, URI scheme, Max-Forwards, Proxy-Require."""
    if not isinstance(req.ruri, SipUri | TelUri):
        raise UnsupportedUriScheme(f"cannot route a {req.ruri.scheme} URI")
    mf = req.max_forwards
    if mf is not None and mf <= 0:
        raise TooManyHops("Max-Forwards reached zero")
    unsupported = [
        tag
        for tag in req.headers.values("Proxy-Require")
        if tag and tag.lower() not in SUPPORTED_PROXY_OPTIONS
    ]
    if unsupported:
        raise BadExtension(unsupported)


def loop_hash(req: Request) -> str:
    """Hash of what identifies a request at this hop (§16.3 step 4, §16.6 step 8).

    A request that comes back with one of our Vias carrying the same hash is a loop; a
    changed Request-URI makes it a spiral, which is fine.
    """
    parts = [
        req.uri,
        req.from_.tag or "",
        req.to.tag or "",
        req.call_id,
        str(req.cseq.number),
        ",".join(req.headers.get_all("Proxy-Require")),
        ",".join(req.headers.get_all("Route")),
    ]
    return hashlib.sha1("\x00".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:12]


def check_loop(req: Request, me: ProxyIdentity, hash_: str) -> None:
    prefix = f"{MAGIC_COOKIE}-{hash_}-"
    for via in req.vias:
        if me.is_my_via(via.host, via.port):
            branch = via.branch or ""
            if branch.startswith(prefix):
                raise LoopDetected("request looped back to this proxy")


def make_branch(hash_: str, unique: str) -> str:
    return f"{MAGIC_COOKIE}-{hash_}-{unique}"


def preprocess_routes(req: Request, me: ProxyIdentity) -> list[SipUri]:
    """§16.4: undo a strict router's rewrite, then pop the Route entries naming us.

    Returns the popped entries (our own Record-Route URIs, with their parameters)."""
    ruri = req.ruri
    if isinstance(ruri, SipUri) and me.is_my_address(ruri) and "Route" in req.headers:
        # The previous hop was a strict router: the real target is the last Route.
        routes = req.headers.values("Route")
        last = routes[-1]
        req.uri = str(parse_name_addr(last).uri)
        rebuilt = routes[:-1]
        req.headers.remove("Route")
        for r in rebuilt:
            req.headers.add("Route", r)
        req.invalidate()
    popped: list[SipUri] = []
    while True:
        first = req.headers.get("Route")
        if first is None:
            break
        top = parse_name_addr(_first_element(first)).uri
        if isinstance(top, SipUri) and me.is_my_address(top):
            req.headers.pop_first_value("Route")
            popped.append(top)
        else:
            break
    return popped


def _first_element(value: str) -> str:
    return split_commas(value)[0]


def next_hop_uri(req: Request) -> SipUri | None:
    """The URI to send to: the top Route if any (loose routing), else None (use target)."""
    first = req.headers.get("Route")
    if first is None:
        return None
    uri = parse_name_addr(_first_element(first)).uri
    return uri if isinstance(uri, SipUri) else None


def forward_copy(
    req: Request,
    target: str | None,
    me: ProxyIdentity,
    *,
    branch: str,
    out_transport: str,
    in_transport: str,
    record_route: bool,
    path: tuple[str, ...] = (),
    rr_token: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
) -> Request:
    """§16.6: the request sent to one target.

    ``target`` replaces the Request-URI (None keeps it, for requests routed by Route).
    ``path`` (RFC 3327) becomes Route headers in front of any existing ones.
    """
    fwd = req.copy()
    if target is not None:
        fwd.uri = target
    mf = req.max_forwards
    fwd.headers.set("Max-Forwards", str(DEFAULT_MAX_FORWARDS if mf is None else mf - 1))
    for p in reversed(path):
        fwd.headers.insert_before_first("Route", p)
    if record_route:
        # Two entries when the transport changes between the legs, so that each side
        # reaches us over its own transport ("double Record-Route").
        sips = is_sips(req) or is_sips(fwd)  # a SIPS AOR retargeted to its contact
        if in_transport != out_transport:
            fwd.headers.insert_before_first(
                "Record-Route", me.rr_uri(in_transport, rr_token, sips=sips)
            )
        fwd.headers.insert_before_first(
            "Record-Route", me.rr_uri(out_transport, rr_token, sips=sips)
        )
    for name, value in extra:
        fwd.headers.add(name, value)
    fwd.headers.insert_before_first("Via", me.via(out_transport, branch))
    return fwd


def is_sips(req: Request) -> bool:
    """Must every hop of this request be TLS? RFC 3261 §26.2.2: yes for a SIPS
    Request-URI (RFC 5630 §3.1.3: a proxy never forwards one over anything else)."""
    ruri = req.ruri
    return isinstance(ruri, SipUri) and ruri.scheme == "sips"


def received_params(req: Request, host: str, port: int) -> None:
    """§18.2.1 and RFC 3581: note where the request really came from in its top Via."""
    via = req.top_via
    params = list(via.params)
    changed = False
    if via.host != host:
        params = [(k, v) for k, v in params if k.lower() != "received"] + [("received", host)]
        changed = True
    if get_param(via.params, "rport") is not None:
        params = [(k, v) for k, v in params if k.lower() != "rport"] + [("rport", str(port))]
        if not changed:
            params = [(k, v) for k, v in params if k.lower() != "received"] + [("received", host)]
        changed = True
    if changed:
        req.set_top_via(Via(via.transport, via.host, via.port, tuple(params), via.version))
