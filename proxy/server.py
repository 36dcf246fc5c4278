"""The site's SIP server: from received bytes to the handler that answers them.

Each datagram or stream frame is parsed, validated and matched to a transaction (RFC 3261
§17.1.3, §17.2.3). A new request starts a server transaction and a task that hands it to
its handler: the registrar (REGISTER), the router (everything it proxies), or the
router's local answers (OPTIONS to the proxy itself). Responses go to their client
transaction, or are forwarded statelessly when none matches (§16.11).

Every error of the SIP family a handler raises is answered here, in one place.
"""

from __future__ import annotations

import logging

from .registrar_service import RegistrarService
from .router import Router
from .sip import transaction as tx
from .sip.errors import ParseError, ServiceUnavailable, SipError
from .sip.forwarding import received_params
from .sip.message import (
    DEFAULT_LIMITS,
    ParseLimits,
    PartialMessage,
    Request,
    Response,
    StartLineError,
    error_response,
    make_response,
    parse_message,
    validate_request,
    validate_response,
)
from .stats import SipCounters
from .tasks import Tasks
from .transactions import ServerTx, TransactionLayer, branch_of, reply_flow_for
from .transport import Flow, TransportLayer

log = logging.getLogger(__name__)


class SipServer:
    def __init__(
        self,
        transport: TransportLayer,
        transactions: TransactionLayer,
        *,
        registrar: RegistrarService,
        router: Router,
        counters: SipCounters,
        tasks: Tasks,
        limits: ParseLimits = DEFAULT_LIMITS,
    ) -> None:
        self.transport = transport
        self.limits = limits
        self.transactions = transactions
        self.registrar = registrar
        self.router = router
        self.counters = counters
        self._tasks = tasks
        self._draining = False

    def serve(self) -> None:
        """Start handling what the (bound) transport receives."""
        self.transport.serve(self.on_message)

    def drain(self) -> int:
        """Shutting down: refuse new out-of-dialog requests (503 with Retry-After, so
        phones try again elsewhere or later), keep serving dialogs and responses, and
        cancel every call still ringing (its callees get a CANCEL, its caller the final
        response). Returns how many calls were cancelled."""
        self._draining = True
        cancelled = 0
        for stx in list(self.transactions.server_txs.values()):
            if stx.on_cancel is not None and stx.txn.state is tx.ServerState.PROCEEDING:
                stx.on_cancel()
                cancelled += 1
        return cancelled

    async def close(self) -> None:
        await self._tasks.close()
        self.transactions.close()
        await self.transport.close()

    # --- ingress -----------------------------------------------------------------------

    def on_message(self, data: bytes, flow: Flow) -> None:
        try:
            msg = parse_message(data, stream=flow.reliable, limits=self.limits)
        except StartLineError as exc:
            self._reject_unparsable(exc, exc.partial, flow)
            return
        except ParseError as exc:
            self.counters.parse_errors += 1
            log.debug("dropping unparsable message from %s: %s", flow, exc)
            return
        if isinstance(msg, Request):
            self._on_request(msg, flow)
        else:
            self._on_response(msg, flow)

    def _reject_unparsable(self, exc: SipError, partial: PartialMessage, flow: Flow) -> None:
        self.counters.parse_errors += 1
        if not partial.is_request:
            log.debug("dropping malformed response from %s: %s", flow, exc)
            return
        try:
            cseq = partial.headers.get("CSeq") or ""
            if cseq.split()[-1:] == ["ACK"]:
                return  # never answer an ACK (RFC 3261 §17.2.1)
            # RFC 3581: note where it came from, so that the answer goes to the port it
            # came from (most phones ask with ;rport), not to the Via's sent-by.
            probe = Request("X", "sip:x", partial.headers)
            received_params(probe, flow.host, flow.port)
            resp = error_response(partial, exc)
            self.transport.send(reply_flow_for(probe, flow), resp.to_bytes())
        except (ParseError, IndexError):
            log.debug("cannot answer malformed request from %s: %s", flow, exc)

    def _on_request(self, req: Request, flow: Flow) -> None:
        self.counters.request(req.method)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("received %s %s from %s (Call-ID %s, branch %s)", req.method, req.uri,
                      flow, req.call_id, branch_of(req))  # fmt: skip
        try:
            received_params(req, flow.host, flow.port)
            validate_request(req)
        except SipError as exc:
            log.info("bad %s from %s: %s", req.method, flow, exc)
            if req.method != "ACK":
                self.transactions.send_stateless(req, flow, exc)
            return
        key = tx.server_key(req)
        if self.transactions.absorb(req, key):
            return
        if self._draining and req.to.tag is None and req.method not in ("ACK", "CANCEL"):
            self.transactions.send_stateless(req, flow, ServiceUnavailable("shutting down"))
            return
        if req.method == "ACK":
            self.router.forward_ack(req, flow)
            return
        if req.method == "CANCEL":
            self._on_cancel(req, flow, key)
            return
        stx = self.transactions.new_server(req, flow, key)
        if req.method == "INVITE":
            # RFC 3261 §16.2: a stateful proxy answers INVITE with 100 Trying at once.
            self.transactions.respond(stx, make_response(req, 100))
        self._tasks.spawn(self._dispatch(stx))

    def _on_cancel(self, req: Request, flow: Flow, key: tx.TransactionKey) -> None:
        invite = self.transactions.find_server(tx.invite_key_for_cancel(req))
        stx = self.transactions.new_server(req, flow, key)
        if invite is None or invite.request.method != "INVITE":
            self.transactions.respond(stx, make_response(req, 481, to_tag=stx.to_tag))
            return
        # RFC 3261 §16.10: answer the CANCEL, then cancel every pending branch.
        self.transactions.respond(stx, make_response(req, 200, to_tag=invite.to_tag))
        if invite.on_cancel is not None:
            invite.on_cancel()
        else:
            resp = make_response(invite.request, 487, to_tag=invite.to_tag)
            self.transactions.respond(invite, resp)

    async def _dispatch(self, stx: ServerTx) -> None:
        req = stx.request
        try:
            if req.method == "REGISTER":
                await self.registrar.handle(stx)
            elif self.router.is_for_me(req):
                self.router.answer_locally(stx)
            else:
                await self.router.route(stx)
        except SipError as exc:
            self.transactions.respond_error(stx, exc)

    def _on_response(self, resp: Response, flow: Flow) -> None:
        try:
            validate_response(resp)
        except ParseError as exc:
            log.debug("dropping malformed response from %s: %s", flow, exc)
            return
        self.counters.response(resp.status)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("received %d %s from %s (Call-ID %s, branch %s)", resp.status,
                      resp.reason, flow, resp.call_id, branch_of(resp))  # fmt: skip
        if not self.transactions.receive_response(resp):
            # RFC 3261 §16.11 / §16.7: no transaction (e.g. a retransmitted 2xx after the
            # INVITE transaction ended): forward statelessly along the Via path.
            self.router.forward_stray_response(resp)
