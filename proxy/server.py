"""The site's SIP server: transports + transactions + registrar + proxy, wired together.

Each received datagram or stream frame is parsed and matched to a transaction (RFC 3261
§17.1.3, §17.2.3). New requests start a server transaction and a task that decides what
to do with them: register (``proxy.registrar_service``), answer (OPTIONS to us), or proxy
them (``proxy.proxy_core``). Timers are re-armed with ``loop.call_at`` after every input.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dht_adaptor.location import LocationStore

from .config import Config
from .sip import transaction as tx
from .sip.errors import ParseError, SipError
from .sip.message import (
    PartialMessage,
    Request,
    Response,
    StartLineError,
    make_response,
    parse_message,
    validate_request,
    validate_response,
)
from .stats import Stats
from .transport import Flow, TransportLayer

if TYPE_CHECKING:
    from .proxy_core import ProxyContext

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServerTx:
    """A server transaction and where its responses go."""

    txn: tx.ServerTransaction
    request: Request
    flow: Flow  # the flow the request arrived on
    reply_flow: Flow  # where responses go (RFC 3261 §18.2.2)
    key: tuple[object, ...]
    to_tag: str = field(default_factory=lambda: secrets.token_hex(5))
    context: ProxyContext | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class ClientTx:
    txn: tx.ClientTransaction
    flow: Flow
    key: tuple[object, ...]
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


class SipServer:
    def __init__(
        self,
        config: Config,
        store: LocationStore,
        *,
        users: object | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        from .proxy_core import ProxyCore
        from .registrar_service import RegistrarService

        self.config = config
        self.store = store
        self.clock = clock
        self.stats = Stats()
        self.timers = tx.TimerConfig(t1=config.t1, t2=config.t2, t4=config.t4)
        self.transport = TransportLayer(
            self.on_message,
            idle_timeout=config.tcp_idle_timeout,
            partial_timeout=config.tcp_partial_timeout,
        )
        self.server_txs: dict[tuple[object, ...], ServerTx] = {}
        self.client_txs: dict[tuple[object, ...], ClientTx] = {}
        # Completed non-INVITE server transactions: key -> (final response, reply address).
        self.completed: dict[tuple[object, ...], tuple[bytes, tuple[str, str, int]]] = {}
        self._completed_order: collections.deque[tuple[float, tuple[object, ...]]] = (
            collections.deque()
        )
        self._sweeper: asyncio.TimerHandle | None = None
        self.registrar = RegistrarService(self, users)
        self.proxy = ProxyCore(self)
        self._tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> int:
        listen = self.config.sip_listen
        port = await self.transport.start(listen.host, listen.port)
        self.proxy.set_address(port)
        log.info("SIP listening on %s:%d (UDP and TCP)", listen.host, port)
        return port

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for s in self.server_txs.values():
            if s.timer:
                s.timer.cancel()
        for c in self.client_txs.values():
            if c.timer:
                c.timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.transport.close()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("request task failed", exc_info=task.exception())

    @property
    def now(self) -> float:
        """Monotonic time for transaction timers."""
        return asyncio.get_running_loop().time()

    # --- ingress -----------------------------------------------------------------------

    def on_message(self, data: bytes, flow: Flow) -> None:
        try:
            msg = parse_message(data, stream=flow.reliable)
        except StartLineError as exc:
            self._reject_unparsable(exc, exc.partial, flow)
            return
        except ParseError as exc:
            self.stats.inc("parse_errors")
            log.debug("dropping unparsable message from %s: %s", flow, exc)
            return
        if isinstance(msg, Request):
            self._on_request(msg, flow)
        else:
            self._on_response(msg, flow)

    def _reject_unparsable(self, exc: SipError, partial: PartialMessage, flow: Flow) -> None:
        self.stats.inc("parse_errors")
        if not partial.is_request:
            log.debug("dropping malformed response from %s: %s", flow, exc)
            return
        try:
            cseq = partial.headers.get("CSeq") or ""
            if cseq.split()[-1:] == ["ACK"]:
                return  # never answer an ACK (RFC 3261 §17.2.1)
            resp = make_response(partial, exc.status_code, _reason(exc))
            probe = Request("X", "sip:x", partial.headers)
            self.transport.send(reply_flow_for(probe, flow), resp.to_bytes())
        except (ParseError, IndexError):
            log.debug("cannot answer malformed request from %s: %s", flow, exc)

    def _on_request(self, req: Request, flow: Flow) -> None:
        self.stats.request(req.method)
        try:
            from .sip.forwarding import received_params

            received_params(req, flow.host, flow.port)
            validate_request(req)
        except SipError as exc:
            log.info("bad %s from %s: %s", req.method, flow, exc)
            if req.method != "ACK":
                self._send_stateless(req, flow, exc.status_code, _reason(exc))
            return
        key = tx.server_key(req)
        done = self.completed.get(key)
        if done is not None:
            # §17.2.2: a retransmission of a request whose transaction has completed
            # gets the final response again.
            self.transport.send(Flow(*done[1]), done[0])
            return
        existing = self.server_txs.get(key)
        if existing is not None:
            self.drive_server(existing, existing.txn.receive_request(req, self.now))
            return
        if req.method == "ACK":
            self.proxy.forward_ack(req, flow)
            return
        if req.method == "CANCEL":
            self._on_cancel(req, flow, key)
            return
        stx = self._new_server_tx(req, flow, key)
        if req.method == "INVITE":
            # RFC 3261 §16.2: a stateful proxy answers INVITE with 100 Trying at once.
            self.respond(stx, make_response(req, 100))
        self.spawn(self._dispatch(stx))

    def _new_server_tx(self, req: Request, flow: Flow, key: tuple[object, ...]) -> ServerTx:
        txn = tx.ServerTransaction(req, flow.reliable, self.now, self.timers)
        stx = ServerTx(txn, req, flow, reply_flow_for(req, flow), key)
        self.server_txs[key] = stx
        return stx

    def _on_cancel(self, req: Request, flow: Flow, key: tuple[object, ...]) -> None:
        invite = self.server_txs.get(tx.invite_key_for_cancel(req))
        stx = self._new_server_tx(req, flow, key)
        if invite is None or invite.request.method != "INVITE":
            self.respond(stx, make_response(req, 481, to_tag=stx.to_tag))
            return
        # RFC 3261 §16.10: answer the CANCEL, then cancel every pending branch.
        self.respond(stx, make_response(req, 200, to_tag=invite.to_tag))
        if invite.context is not None:
            invite.context.cancel()
        else:
            self.respond(invite, make_response(invite.request, 487, to_tag=invite.to_tag))

    async def _dispatch(self, stx: ServerTx) -> None:
        req = stx.request
        try:
            if req.method == "REGISTER" and self.proxy.is_for_registrar(req):
                await self.registrar.handle(stx)
            elif self.proxy.is_for_me(req):
                self.proxy.answer_locally(stx)
            else:
                await self.proxy.route(stx)
        except SipError as exc:
            log.info("%s %s: %s", req.method, req.call_id, exc)
            extra = [("Unsupported", ", ".join(exc.options))] if hasattr(exc, "options") else []
            retry_after = getattr(exc, "retry_after", None)
            if retry_after:
                extra.append(("Retry-After", str(retry_after)))
            self.respond(
                stx, make_response(req, exc.status_code, _reason(exc), to_tag=stx.to_tag, extra=extra)
            )

    def _on_response(self, resp: Response, flow: Flow) -> None:
        try:
            validate_response(resp)
        except ParseError as exc:
            log.debug("dropping malformed response from %s: %s", flow, exc)
            return
        self.stats.response(resp.status)
        ctx = self.client_txs.get(tx.client_key(resp))
        if ctx is None:
            # RFC 3261 §16.11 / §16.7: no transaction (e.g. a retransmitted 2xx after the
            # INVITE transaction ended): forward statelessly along the Via path.
            self.proxy.forward_stray_response(resp)
            return
        self.drive_client(ctx, ctx.txn.receive_response(resp, self.now))

    # --- egress and timers -------------------------------------------------------------

    def respond(self, stx: ServerTx, resp: Response) -> None:
        if stx.txn.state is tx.ServerState.TERMINATED:
            if 200 <= resp.status < 300 and stx.request.method == "INVITE":
                # RFC 3261 §16.7 step 5: every 2xx of a forked INVITE goes upstream, even
                # after the first one ended the server transaction.
                self.transport.send(self._reply_flow(stx), resp.to_bytes())
            return
        self.stats.response(resp.status, sent=True)
        self.drive_server(stx, stx.txn.send_response(resp, self.now))

    def _send_stateless(self, req: Request, flow: Flow, status: int, reason: str) -> None:
        try:
            resp = make_response(req, status, reason, to_tag=secrets.token_hex(5))
            self.transport.send(reply_flow_for(req, flow), resp.to_bytes())
        except ParseError:
            pass

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
        self.drive_client(ctx, txn.start())
        return ctx

    def drive_server(self, stx: ServerTx, outputs: list[tx.Output]) -> None:
        sent = b""
        for out in outputs:
            if isinstance(out, tx.Send):
                sent = out.message.to_bytes()
                self.transport.send(self._reply_flow(stx), sent)
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
        if not flow.reliable or self.transport.has_connection(flow.host, flow.port):
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

    def drive_client(self, ctx: ClientTx, outputs: list[tx.Output]) -> None:
        for out in outputs:
            if isinstance(out, tx.Send):
                self.transport.send(ctx.flow, out.message.to_bytes())
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


def _reason(exc: SipError) -> str:
    return exc.reason
