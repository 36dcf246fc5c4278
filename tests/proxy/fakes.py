"""In-memory fakes for what the proxy's handlers are built with: no sockets, no DHT node,
no Redis, and a clock the test moves.

* :class:`FakeTransactions` stands in for the transaction layer (``respond`` and
  ``start_client``); it records both and lets the test answer, or time out, every client
  transaction a handler started.
* :class:`FakePublisher` and :class:`FakeLocator` stand in for the DHT adaptor.
* :class:`FakeResolver` turns URIs into flows without DNS.
* :class:`FakeUsers` is the users file, :class:`ManualClock` the wall clock.
* :class:`FakeSender` is the transport under a real ``TransactionLayer``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from dht_adaptor.location import MemoryStore
from proxy.location import Located, LocationError, LocationUnavailable
from proxy.resolver import is_ip
from proxy.sip import transaction as tx
from proxy.sip.auth import UserRecord
from proxy.sip.binding import Binding
from proxy.sip.errors import ServiceUnavailable, SipError, UnsupportedUriScheme
from proxy.sip.forwarding import ProxyIdentity
from proxy.sip.grammar import quote, split_commas, unquote
from proxy.sip.headers import parse_name_addr
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.timers import TimerConfig
from proxy.sip.tokens import ProxyTokens
from proxy.sip.uri import SipUri
from proxy.transactions import ClientTx, ServerTx, reply_flow_for
from proxy.transport import Flow

REALM = "example.com"
ME = ProxyIdentity("203.0.113.5", 5060, (REALM,))
HOME = "sip:203.0.113.5:5060"  # this site's home proxy URI (proxy.site.home_uri(ME))
PHONE = Flow("udp", "192.0.2.10", 5060)
TIMERS = TimerConfig()
TOKENS = ProxyTokens(b"t" * 32)  # the site's MACs in Record-Route and Via branches
T0 = 1_700_000_000.0  # wall-clock start of every manual clock


class ManualClock:
    """Wall-clock seconds that move only when the test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeUsers(dict[str, UserRecord]):
    """The users file: a dict that tells subscribers when it changes (``AuthGate`` listens)."""

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[Callable[[], None]] = []

    def subscribe(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def add(self, username: str, password: str) -> None:
        self[username] = UserRecord.from_password(username, REALM, password)
        for listener in self._listeners:
            listener()


# --- transactions ----------------------------------------------------------------------


def server_tx(req: Request, flow: Flow = PHONE) -> ServerTx:
    """The server transaction the server would have started for ``req``."""
    txn = tx.ServerTransaction(req, flow.reliable, 0.0, TIMERS)
    return ServerTx(txn, req, flow, reply_flow_for(req, flow), tx.server_key(req))


@dataclass(eq=False)
class Started:
    """A client transaction a handler started: what it sent, where, and its callbacks."""

    request: Request
    flow: Flow
    on_response: Callable[[Response], None]
    on_timeout: Callable[[], None]

    @property
    def method(self) -> str:
        return self.request.method

    def answer(self, status: int, *, to_tag: str = "callee") -> Response:
        """Deliver a response from the next hop (our Via still on top, as it arrives)."""
        resp = make_response(self.request, status, to_tag=to_tag)
        self.on_response(resp)
        return resp

    def time_out(self) -> None:
        self.on_timeout()


class FakeTransactions:
    """The transaction layer as a handler sees it: every call recorded, nothing sent."""

    def __init__(self) -> None:
        self.responses: list[tuple[ServerTx, Response]] = []
        self.started: list[Started] = []

    def respond(self, stx: ServerTx, resp: Response) -> None:
        self.responses.append((stx, resp))

    def start_client(
        self,
        request: Request,
        flow: Flow,
        on_response: Callable[[Response], None],
        on_timeout: Callable[[], None],
    ) -> ClientTx:
        self.started.append(Started(request, flow, on_response, on_timeout))
        txn = tx.ClientTransaction(request, flow.reliable, 0.0, TIMERS)
        return ClientTx(txn, flow, tx.client_key(request), on_response, on_timeout)

    def sent_to(self, stx: ServerTx) -> list[Response]:
        """The responses given to ``stx``, in order."""
        return [r for s, r in self.responses if s is stx]

    def statuses(self, stx: ServerTx) -> list[int]:
        return [r.status for r in self.sent_to(stx)]

    def branches(self, method: str = "INVITE") -> list[Started]:
        """The client transactions started for ``method`` (not the CANCELs)."""
        return [s for s in self.started if s.method == method]


class Spawner:
    """The ``spawn`` callable: runs coroutines as tasks the test can wait for."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    async def drain(self) -> None:
        """Wait until every task spawned (including by other tasks) has finished."""
        while not all(t.done() for t in self.tasks):
            await asyncio.gather(*self.tasks)


# --- location: store, publisher, locator ----------------------------------------------


class FlakyStore(MemoryStore):
    """The in-memory store, which fails like Redis when ``failure`` is set and takes a few
    turns of the loop for every call, as a network store would (so that concurrent
    REGISTERs really interleave)."""

    def __init__(self, turns: int = 3) -> None:
        super().__init__()
        self.turns = turns
        self.failure: LocationError | None = None
        self.busy: dict[str, int] = {}  # AOR -> handlers between their load and save
        self.most_busy = 0

    async def _wait(self) -> None:
        for _ in range(self.turns):
            await asyncio.sleep(0)

    async def load(self, aor: str, now: float) -> list[Binding]:
        await self._wait()
        if self.failure is not None:
            raise self.failure
        self.busy[aor] = self.busy.get(aor, 0) + 1
        self.most_busy = max(self.most_busy, self.busy[aor])
        bindings = await super().load(aor, now)
        await self._wait()
        return bindings

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        await self._wait()
        if self.failure is not None:
            raise self.failure
        self.busy[aor] = self.busy.get(aor, 0) - 1
        await super().save(aor, bindings, now)


@dataclass(frozen=True)
class Prepared:
    aor: str
    bindings: tuple[Binding, ...]
    force: bool

    @property
    def contacts(self) -> list[str]:
        return sorted(b.contact for b in self.bindings)


class FakePublisher:
    """The DHT adaptor as the registrar sees it; refuses with ``refuse`` when set."""

    def __init__(self) -> None:
        self.prepared: list[Prepared] = []
        self.published: list[Prepared] = []
        self.refuse: SipError | None = None

    def prepare(self, aor: str, bindings: Sequence[Binding], *, force: bool = False) -> Prepared:
        if self.refuse is not None:
            raise self.refuse
        prepared = Prepared(aor, tuple(bindings), force)
        self.prepared.append(prepared)
        return prepared

    def publish(self, prepared: Prepared) -> None:
        self.published.append(prepared)


@dataclass(frozen=True)
class HomeRecord:
    """A binding as the overlay returns it: which home proxy holds the phone."""

    home: str
    q: float = 1.0
    expires_at: float = math.inf
    contact: str = "sip:phone@192.0.2.99"
    site: str = "elsewhere"
    key_id: str = "0" * 16

    def is_live(self, now: float) -> bool:
        return self.expires_at > now


class FakeLocator:
    """The DHT adaptor as the DHT router sees it: canned records per AOR. A record whose
    bindings all expired still says the user exists (the overlay's tombstones)."""

    def __init__(self, clock: Callable[[], float], home: str = HOME) -> None:
        self._clock = clock
        self._home = home
        self.bindings: dict[str, list[HomeRecord]] = {}
        self.failure: LocationUnavailable | None = None
        self.lookups: list[str] = []

    @property
    def home(self) -> str:
        return self._home

    def clock(self) -> float:
        return self._clock()

    async def locate(self, aor: str) -> Located[HomeRecord]:
        self.lookups.append(aor)
        await asyncio.sleep(0)
        if self.failure is not None:
            raise self.failure
        # Like the adaptor: only live bindings (the overlay lets the others expire).
        now = self._clock()
        records = self.bindings.get(aor, [])
        return Located(tuple(b for b in records if b.is_live(now)), known=bool(records))


# --- resolver and transport ----------------------------------------------------------------


class FakeResolver:
    """URIs to flows without DNS: IP hosts as they are, names from ``hosts`` (or 503, as
    when a name does not resolve). A binding's registration flow is chosen as
    ``proxy.resolver.Resolver`` chooses it: a TCP flow while ``connections`` holds it, a
    UDP one when the contact names another host (a phone behind NAT)."""

    def __init__(self, hosts: dict[str, str] | None = None) -> None:
        self.hosts = dict(hosts or {})
        self.connections: set[tuple[str, int]] = set()
        self.resolved: list[str] = []

    async def resolve(self, uri: SipUri) -> Flow:
        self.resolved.append(str(uri))
        if uri.transport not in ("udp", "tcp"):
            raise SipError(status_code=503, reason=f"Transport {uri.transport} Not Supported")
        host = (uri.param("maddr") or uri.host).strip("[]")
        if not is_ip(host):
            if host not in self.hosts:
                raise ServiceUnavailable(f"cannot resolve {host}", reason="DNS Lookup Failed")
            host = self.hosts[host]
        return Flow(uri.transport, host, uri.port or 5060)

    async def resolve_all(self, uri: SipUri) -> list[Flow]:
        return [await self.resolve(uri)]

    async def resolve_request(self, uri: SipUri) -> list[Flow]:
        return [await self.resolve(uri)]

    async def flow_for_contact(self, contact: str, source: str | None) -> Flow:
        uri = parse_name_addr(f"<{contact}>").uri
        if not isinstance(uri, SipUri):
            raise UnsupportedUriScheme(f"cannot reach a {uri.scheme} contact")
        return await self.via_flow(source, uri)

    async def via_flow(self, source: str | None, uri: SipUri) -> Flow:
        if source:
            flow = Flow.parse(source)
            if flow.transport == "udp":
                if uri.transport == "udp" and uri.host.strip("[]") != flow.host:
                    return flow
            elif (flow.host, flow.port) in self.connections:
                return flow
        return await self.resolve(uri)


class FakeSender:
    """The transport under a real ``TransactionLayer``: records what would go out."""

    def __init__(self) -> None:
        self.sent: list[tuple[Flow, bytes]] = []
        self.connections: set[tuple[str, int]] = set()

    def send(self, flow: Flow, data: bytes) -> None:
        self.sent.append((flow, data))

    def has_connection(self, host: str, port: int) -> bool:
        return (host, port) in self.connections

    def serve(self, on_message: Callable[[bytes, Flow], None]) -> None:
        self.on_message = on_message

    async def close(self) -> None:
        pass

    def responses(self) -> list[tuple[Flow, Response]]:
        out = []
        for flow, data in self.sent:
            msg = parse_message(data)
            if isinstance(msg, Response):
                out.append((flow, msg))
        return out

    def statuses(self) -> list[int]:
        return [r.status for _, r in self.responses()]

    def requests(self) -> list[tuple[Flow, Request]]:
        out = []
        for flow, data in self.sent:
            msg = parse_message(data)
            if isinstance(msg, Request):
                out.append((flow, msg))
        return out


# --- a tiny digest UAC -------------------------------------------------------------------


def digest_answer(
    challenge: str,
    *,
    username: str,
    password: str,
    method: str,
    uri: str,
    cnonce: str = "0a4f113b",
    nc: int = 1,
) -> str:
    """The (Proxy-)Authorization value answering one MD5 challenge with qop=auth."""
    scheme, _, rest = challenge.partition(" ")
    assert scheme == "Digest", challenge
    params = {}
    for item in split_commas(rest):
        k, _, v = item.partition("=")
        params[k.strip()] = unquote(v.strip())
    assert params["algorithm"].upper() == "MD5", params

    def h(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = h(f"{username}:{params['realm']}:{password}")
    ncv = f"{nc:08x}"
    response = h(f"{ha1}:{params['nonce']}:{ncv}:{cnonce}:auth:{h(f'{method}:{uri}')}")
    return (
        f"Digest username={quote(username)}, realm={quote(params['realm'])}, "
        f"nonce={quote(params['nonce'])}, uri={quote(uri)}, response={quote(response)}, "
        f"algorithm=MD5, cnonce={quote(cnonce)}, qop=auth, nc={ncv}"
    )


def md5_challenge(resp: Response, header: str) -> str:
    """The MD5 one among a 401's or 407's challenges (SHA-256 is offered first)."""
    found = [v for v in resp.headers.get_all(header) if "algorithm=MD5," in v]
    assert found, resp.headers.get_all(header)
    return found[0]
