"""The transaction layer's asyncio adapter (RFC 3261 §17): live transactions, their
timers on the event loop, and what they send.

The sans-IO machines in ``proxy.sip.transaction`` decide; this module keeps them by key,
re-arms ``loop.call_at`` after every input and carries their outputs to the transport.
Handlers (registrar, router, forks) see it through the two calls they use:
``respond(stx, response)`` and ``start_client(request, flow, on_response, on_timeout)``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .sip import transaction as tx
from .sip.errors import ParseError, SipError
from .sip.message import Request, Response, error_response
from .stats import SipCounters
from .transport import Flow

log = logging.getLogger(__name__)

Key = tuple[object, ...]


class Sender(Protocol):
    """What the layer needs of the transport."""

    def send(self, flow: Flow, data: bytes) -> None: ...

    def has_connection(self, host: str, port: int) -> bool: ...


@dataclass(eq=False)
class ServerTx:
    """A server transaction and where its responses go."""

    txn: tx.ServerTransaction
    request: Request
    flow: Flow  # the flow the request arrived on
    reply_flow: Flow  # where responses go (RFC 3261 §18.2.2)
    key: Key
    to_tag: str = field(default_factory=lambda: secrets.token_hex(5))
    # Set while the request is being proxied: what a CANCEL for it does (§16.10).
    on_cancel: Callable[[], None] | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class ClientTx:
    txn: tx.ClientTransaction
    flow: Flow
    key: Key
    on_response: Callable[[Response], None]
    on_timeout: Callable[[], None]
    timer: asyncio.TimerHandle | None = None


def reply_flow_for(req: Request, flow: Flow) -> Flow:
    """RFC 3261 §18.2.2 with RFC 3581: reliable → same connection; UDP → received:rport."""
    if flow.reliable:
        return flow
    via = req.top_via
    host = via.received or via.host
    rport = via.rport
    port = int(rport) if rport else (via.port or 5060)
    return Flow("udp", host, port)


def branch_of(msg: Request | Response) -> str:
    """The top Via's branch, for log lines (a malformed Via gives "?")."""
    try:
        return msg.top_via.branch or "-"
    except ParseError:
        return "?"


class Transactions(Protocol):
    """What a handler needs of the transaction layer."""

    def respond(self, stx: ServerTx, resp: Response) -> None: ...

    def start_client(
        self,
        request: Request,
        flow: Flow,
        on_response: Callable[[Response], None],
        on_timeout: Callable[[], None],
    ) -> ClientTx: ...


class TransactionLayer:
    def __init__(self, sender: Sender, timers: tx.TimerConfig, counters: SipCounters) -> None:
        self.sender = sender
        self.timers = timers
        self.counters = counters
        self.server_txs: dict[Key, ServerTx] = {}
        self.client_txs: dict[Key, ClientTx] = {}
        # Completed non-INVITE server transactions: key -> (final response, reply address).
        self.completed: dict[Key, tuple[bytes, tuple[str, str, int]]] = {}
        self._completed_order: collections.deque[tuple[float, Key]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def now(self) -> float:
        """Monotonic time for transaction timers."""
        return asyncio.get_running_loop().time()

    def busy(self) -> int:
        """Transactions still waiting for an answer (not those only absorbing
        retransmissions in Completed or Confirmed)."""
        live_server = (tx.ServerState.TRYING, tx.ServerState.PROCEEDING)
        live_client = (tx.ClientState.CALLING, tx.ClientState.TRYING, tx.ClientState.PROCEEDING)
        return sum(s.txn.state in live_server for s in self.server_txs.values()) + sum(
            c.txn.state in live_client for c in self.client_txs.values()
        )

    def close(self) -> None:
        for s in self.server_txs.values():
            if s.timer:
                s.timer.cancel()
        for c in self.client_txs.values():
            if c.timer:
                c.timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()

    # --- server side --------------------------------------------------------------------

    def absorb(self, req: Request, key: Key) -> bool:
        """A retransmission or an ACK of a live or completed transaction: handled here."""
        done = self.completed.get(key)
        if done is not None:
            # §17.2.2: a retransmission of a request whose transaction has completed
            # gets the final response again.
            self.sender.send(Flow(*done[1]), done[0])
            return True
        existing = self.server_txs.get(key)
        if existing is not None:
            self.drive_server(existing, existing.txn.receive_request(req, self.now))
            return True
        return False

    def new_server(self, req: Request, flow: Flow, key: Key) -> ServerTx:
        txn = tx.ServerTransaction(req, flow.reliable, self.now, self.timers)
        stx = ServerTx(txn, req, flow, reply_flow_for(req, flow), key)
        self.server_txs[key] = stx
        return stx

    def find_server(self, key: Key) -> ServerTx | None:
        return self.server_txs.get(key)

    def respond(self, stx: ServerTx, resp: Response) -> None:
        if stx.txn.state is tx.ServerState.TERMINATED:
            if 200 <= resp.status < 300 and stx.request.method == "INVITE":
                # RFC 3261 §16.7 step 5: every 2xx of a forked INVITE goes upstream, even
                # after the first one ended the server transaction.
                self._send_response(self._reply_flow(stx), resp, stx.request)
            return
        self.counters.response(resp.status, sent=True)
        self.drive_server(stx, stx.txn.send_response(resp, self.now))

    def respond_error(self, stx: ServerTx, exc: SipError) -> None:
        """Answer with the response a SIP-family error asks for (the one place that does)."""
        log.info("%s %s: %s %s (%s)", stx.request.method, stx.request.call_id,
                 exc.status_code, exc.reason, exc)  # fmt: skip
        self.respond(stx, error_response(stx.request, exc, to_tag=stx.to_tag))

    def send_stateless(self, req: Request, flow: Flow, exc: SipError) -> None:
        try:
            resp = error_response(req, exc, to_tag=secrets.token_hex(5))
            dest = reply_flow_for(req, flow)
        except ParseError:
            return  # no Via to answer along
        self.counters.response(resp.status, sent=True)
        self._send_response(dest, resp, req)

    def _send_response(self, flow: Flow, resp: Response, req: Request) -> None:
        self._log_sent(flow, resp, req)
        self.sender.send(flow, resp.to_bytes())

    @staticmethod
    def _log_sent(flow: Flow, resp: Response, req: Request) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sent %d %s to %s (%s, Call-ID %s, branch %s)", resp.status,
                      resp.reason, flow, req.method, req.call_id, branch_of(req))  # fmt: skip

    def drive_server(self, stx: ServerTx, outputs: list[tx.Output]) -> None:
        sent = b""
        flow = self._reply_flow(stx)
        for out in outputs:
            if isinstance(out, tx.Send):
                sent = out.message.to_bytes()
                if not out.retransmission and isinstance(out.message, Response):
                    self._log_sent(flow, out.message, stx.request)
                self.sender.send(flow, sent)
            elif isinstance(out, tx.Terminated):
                self.server_txs.pop(stx.key, None)
        if (
            sent
            and not stx.flow.reliable
            and stx.txn.state is tx.ServerState.COMPLETED
            and stx.request.method != "INVITE"
        ):
            self._retire(stx, sent)
            return
        self._rearm(stx, self.drive_server)

    def _reply_flow(self, stx: ServerTx) -> Flow:
        """Where a response goes now. RFC 3261 §18.2.2: over the connection the request
        came on; if that has closed, a new connection to the received address and the
        Via's sent-by port (not the closed connection's ephemeral source port)."""
        flow = stx.reply_flow
        if not flow.reliable or self.sender.has_connection(flow.host, flow.port):
            return flow
        via = stx.request.top_via
        return Flow(flow.transport, via.received or via.host, via.port or 5060)

    def _retire(self, stx: ServerTx, response: bytes) -> None:
        """A non-INVITE server transaction over UDP that sent its final response only
        waits out Timer J (§17.2.2) to absorb retransmissions. Keep just the bytes and
        the address, in tuples the garbage collector does not track: at hundreds of
        REGISTERs a second, 32 s of full transaction objects made collector pauses
        longer than T1 (bench/README.md)."""
        if stx.timer is not None:
            stx.timer.cancel()
            stx.timer = None
        if self.server_txs.get(stx.key) is stx:
            del self.server_txs[stx.key]
        flow = stx.reply_flow
        self.completed[stx.key] = (response, (flow.transport, flow.host, flow.port))
        self._completed_order.append((self.now + self.timers.timer_j(False), stx.key))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(1.0, self._sweep_completed)

    def _sweep_completed(self) -> None:
        now = self.now
        order = self._completed_order
        while order and order[0][0] <= now:
            _, key = order.popleft()
            self.completed.pop(key, None)
        self._sweeper = (
            asyncio.get_running_loop().call_later(1.0, self._sweep_completed) if order else None
        )

    # --- client side --------------------------------------------------------------------

    def start_client(
        self,
        request: Request,
        flow: Flow,
        on_response: Callable[[Response], None],
        on_timeout: Callable[[], None],
    ) -> ClientTx:
        txn = tx.ClientTransaction(request, flow.reliable, self.now, self.timers)
        ctx = ClientTx(txn, flow, tx.client_key(request), on_response, on_timeout)
        self.client_txs[ctx.key] = ctx
        if log.isEnabledFor(logging.DEBUG):
            log.debug("sending %s %s to %s (Call-ID %s, branch %s)", request.method,
                      request.uri, flow, request.call_id, branch_of(request))  # fmt: skip
        self.drive_client(ctx, txn.start())
        return ctx

    def receive_response(self, resp: Response) -> bool:
        """Feed a response to its client transaction; False if none matches."""
        ctx = self.client_txs.get(tx.client_key(resp))
        if ctx is None:
            return False
        self.drive_client(ctx, ctx.txn.receive_response(resp, self.now))
        return True

    def drive_client(self, ctx: ClientTx, outputs: list[tx.Output]) -> None:
        for out in outputs:
            if isinstance(out, tx.Send):
                self.sender.send(ctx.flow, out.message.to_bytes())
            elif isinstance(out, tx.Deliver):
                ctx.on_response(out.response)
            elif isinstance(out, tx.Timeout):
                ctx.on_timeout()
            elif isinstance(out, tx.Terminated):
                self.client_txs.pop(ctx.key, None)
        self._rearm(ctx, self.drive_client)

    def _rearm(self, holder: ServerTx | ClientTx, drive: Callable[..., None]) -> None:
        if holder.timer is not None:
            holder.timer.cancel()
            holder.timer = None
        when = holder.txn.get_timer()
        if when is None:
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            holder.timer = None
            drive(holder, holder.txn.handle_timer(self.now))

        holder.timer = loop.call_at(when, fire)
