"""SIP transactions (RFC 3261 §17) as sans-IO state machines.

A transaction is driven by three kinds of input, each taking the current time:
network messages (``receive_request`` / ``receive_response``), the transaction user
(``send_response``, or ``start`` for a client) and ``handle_timer(now)``. Every input
returns a list of outputs for the adapter to carry out in order: :class:`Send` a
message on the transaction's flow, :class:`Deliver` a response to the TU, report a
:class:`Timeout` or :class:`TransportFailure`, and finally :class:`Terminated`, after
which the adapter drops the transaction. ``get_timer()`` is the absolute time at which
``handle_timer`` must be called next (None when no timer runs).

Which state follows which input lives in the four transition tables below and nowhere
else; the classes only say what is emitted along an edge (the edge's action) and which
timers a state starts (its entry action). Inputs with no edge are absorbed, except those
from the TU, which raise :class:`TransactionError`.

Any input also fires timers that are already due, so after every call ``get_timer()``
is None or in the future. Durations of 0 (Timers D, I, J, K on reliable transports) are
armed "now" and therefore fire within the same call that armed them.

Deliberately out of scope: the 100 Trying (the TU sends it: RFC 3261 §16.2 / §17.2.1),
Timer C (the proxy runs it, §16.6 step 11; per §17.1.1.2 Timer B only runs in Calling,
so an INVITE client transaction that got a provisional never times out by itself), and
RFC 6026's Accepted state: as in RFC 3261, a 2xx ends the INVITE server transaction at
once, so further 2xx responses of a forked INVITE are forwarded statelessly (§16.7 step 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

from .errors import SipError
from .headers import Headers
from .matching import (
    MAGIC_COOKIE,
    TransactionKey,
    client_key,
    has_rfc3261_branch,
    invite_key_for_cancel,
    server_key,
)
from .message import Request, Response
from .timers import Timer, TimerConfig

__all__ = [
    "MAGIC_COOKIE", "ClientState", "ClientTransaction", "Deliver", "Output", "Send",
    "ServerState", "ServerTransaction", "Terminated", "Timeout", "Timer", "TimerConfig",
    "TransactionError", "TransactionKey", "TransportFailure", "client_key",
    "invite_key_for_cancel", "make_ack", "server_key",
]  # fmt: skip


class TransactionError(SipError):
    """The TU used a transaction wrongly (e.g. sent a response after the final one)."""


class ServerState(Enum):
    TRYING = "Trying"  # non-INVITE only
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"  # INVITE only
    TERMINATED = "Terminated"


class ClientState(Enum):
    CALLING = "Calling"  # INVITE only
    TRYING = "Trying"  # non-INVITE only
    PROCEEDING = "Proceeding"
    COMPLETED = "Completed"
    TERMINATED = "Terminated"


# --- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Put ``message`` on the wire; the adapter knows the transaction's destination."""

    message: Request | Response
    retransmission: bool = False


@dataclass(frozen=True, slots=True)
class Deliver:
    """Client transactions: pass a response up to the TU."""

    response: Response


@dataclass(frozen=True, slots=True)
class Timeout:
    """Timer B or F fired (client), or Timer H (server: the ACK never came)."""


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """The adapter reported a transport error (§17.1.4, §17.2.4)."""


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction is over; always the last output it ever emits."""


Output = Send | Deliver | Timeout | TransportFailure | Terminated


# --- the transition tables -----------------------------------------------------------------


class Event(Enum):
    REQUEST = "request"  # a retransmission of the request (server)
    ACK = "ACK"  # an ACK matching an INVITE server transaction
    PROVISIONAL = "1xx"  # sent by the TU (server) or received (client)
    SUCCESS = "2xx"
    FAILURE = "3xx-6xx"


Input = Event | Timer

_S = ServerState
_C = ClientState
_E = Event

# RFC 3261 §17.2.1, Figure 7.
INVITE_SERVER: dict[tuple[ServerState, Input], ServerState] = {
    (_S.PROCEEDING, _E.REQUEST): _S.PROCEEDING,  # resend the last provisional
    (_S.PROCEEDING, _E.PROVISIONAL): _S.PROCEEDING,
    (_S.PROCEEDING, _E.SUCCESS): _S.TERMINATED,
    (_S.PROCEEDING, _E.FAILURE): _S.COMPLETED,
    (_S.COMPLETED, _E.REQUEST): _S.COMPLETED,  # resend the final response
    (_S.COMPLETED, _E.ACK): _S.CONFIRMED,
    (_S.COMPLETED, Timer.G): _S.COMPLETED,
    (_S.COMPLETED, Timer.H): _S.TERMINATED,
    (_S.CONFIRMED, Timer.I): _S.TERMINATED,
}
# RFC 3261 §17.2.2, Figure 8. A retransmission in Trying is absorbed.
NON_INVITE_SERVER: dict[tuple[ServerState, Input], ServerState] = {
    (_S.TRYING, _E.PROVISIONAL): _S.PROCEEDING,
    (_S.TRYING, _E.SUCCESS): _S.COMPLETED,
    (_S.TRYING, _E.FAILURE): _S.COMPLETED,
    (_S.PROCEEDING, _E.REQUEST): _S.PROCEEDING,
    (_S.PROCEEDING, _E.PROVISIONAL): _S.PROCEEDING,
    (_S.PROCEEDING, _E.SUCCESS): _S.COMPLETED,
    (_S.PROCEEDING, _E.FAILURE): _S.COMPLETED,
    (_S.COMPLETED, _E.REQUEST): _S.COMPLETED,
    (_S.COMPLETED, Timer.J): _S.TERMINATED,
}
# RFC 3261 §17.1.1, Figure 5.
INVITE_CLIENT: dict[tuple[ClientState, Input], ClientState] = {
    (_C.CALLING, Timer.A): _C.CALLING,
    (_C.CALLING, Timer.B): _C.TERMINATED,
    (_C.CALLING, _E.PROVISIONAL): _C.PROCEEDING,
    (_C.CALLING, _E.SUCCESS): _C.TERMINATED,
    (_C.CALLING, _E.FAILURE): _C.COMPLETED,
    (_C.PROCEEDING, _E.PROVISIONAL): _C.PROCEEDING,
    (_C.PROCEEDING, _E.SUCCESS): _C.TERMINATED,
    (_C.PROCEEDING, _E.FAILURE): _C.COMPLETED,
    (_C.COMPLETED, _E.FAILURE): _C.COMPLETED,  # a retransmitted final response: resend ACK
    (_C.COMPLETED, Timer.D): _C.TERMINATED,
}
# RFC 3261 §17.1.2, Figure 6. Responses in Completed are absorbed.
NON_INVITE_CLIENT: dict[tuple[ClientState, Input], ClientState] = {
    (_C.TRYING, Timer.E): _C.TRYING,
    (_C.TRYING, Timer.F): _C.TERMINATED,
    (_C.TRYING, _E.PROVISIONAL): _C.PROCEEDING,
    (_C.TRYING, _E.SUCCESS): _C.COMPLETED,
    (_C.TRYING, _E.FAILURE): _C.COMPLETED,
    (_C.PROCEEDING, Timer.E): _C.PROCEEDING,
    (_C.PROCEEDING, Timer.F): _C.TERMINATED,
    (_C.PROCEEDING, _E.PROVISIONAL): _C.PROCEEDING,
    (_C.PROCEEDING, _E.SUCCESS): _C.COMPLETED,
    (_C.PROCEEDING, _E.FAILURE): _C.COMPLETED,
    (_C.COMPLETED, Timer.K): _C.TERMINATED,
}
# A transport error (§17.1.4, §17.2.4) moves any live transaction to Terminated.


def _status_event(status: int) -> Event:
    if status < 200:
        return Event.PROVISIONAL
    return Event.SUCCESS if status < 300 else Event.FAILURE


# --- the machines --------------------------------------------------------------------------

StateT = TypeVar("StateT", ServerState, ClientState)


class _Transaction(Generic[StateT]):
    """What both kinds share: the timer set and the table-driven step."""

    __slots__ = (
        "_deadlines",
        "_end",
        "_intervals",
        "_state",
        "_table",
        "config",
        "is_invite",
        "reliable",
        "request",
    )

    def __init__(
        self,
        request: Request,
        reliable: bool,
        timers: TimerConfig,
        table: dict[tuple[StateT, Input], StateT],
        start: StateT,
        end: StateT,
    ) -> None:
        if request.method == "ACK":
            raise TransactionError("an ACK never creates a transaction (RFC 3261 §17)")
        self.request = request
        self.reliable = reliable
        self.config = timers
        self.is_invite = request.method == "INVITE"
        self._state: StateT = start
        self._table: dict[tuple[StateT, Input], StateT] = table
        self._end: StateT = end
        self._deadlines: dict[Timer, float] = {}
        self._intervals: dict[Timer, float] = {}

    @property
    def state(self) -> StateT:
        return self._state

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must be called next (absolute time), or None."""
        return min(self._deadlines.values(), default=None)

    def handle_timer(self, now: float) -> list[Output]:
        """Fire every timer due at ``now``; calling it early is harmless."""
        out: list[Output] = []
        self._fire_due(now, out)
        return out

    def transport_error(self, now: float) -> list[Output]:
        """The adapter could not send (§17.1.4, §17.2.4): the transaction ends."""
        if self._state is self._end:
            return []
        self._deadlines.clear()
        self._state = self._end
        return [TransportFailure(), Terminated()]

    def _arm(self, timer: Timer, delay: float, now: float) -> None:
        self._deadlines[timer] = now + delay
        self._intervals[timer] = delay

    def _fire_due(self, now: float, out: list[Output]) -> None:
        # Earliest first; a timer that fires is re-armed relative to ``now``, so this ends.
        while self._deadlines:
            timer, when = min(self._deadlines.items(), key=lambda item: item[1])
            if when > now:
                return
            del self._deadlines[timer]
            self._step(timer, now, out, None)

    def _step(
        self, event: Input, now: float, out: list[Output], message: Request | Response | None
    ) -> bool:
        """Follow the table's edge for ``event``; False when there is none (absorbed)."""
        new = self._table.get((self._state, event))
        if new is None:
            return False
        self._act(event, now, out, message)
        if new is not self._state:
            self._state = new
            if new is self._end:
                self._deadlines.clear()
                out.append(Terminated())
            else:
                self._enter(new, now)
        return True

    def _act(
        self, event: Input, now: float, out: list[Output], message: Request | Response | None
    ) -> None:
        """The action on the edge taken for ``event`` (``self.state`` is still the old one)."""
        raise NotImplementedError

    def _enter(self, state: StateT, now: float) -> None:
        """The entry action of ``state`` (never Terminated): arm its timers."""
        raise NotImplementedError


class ServerTransaction(_Transaction[ServerState]):
    """An INVITE (§17.2.1) or non-INVITE (§17.2.2) server transaction.

    Created for a request that matched no transaction (never for an ACK). The TU sends
    the 100 Trying itself when it wants one.
    """

    __slots__ = ("_last_response", "key")

    def __init__(self, request: Request, reliable: bool, now: float, timers: TimerConfig) -> None:
        invite = request.method == "INVITE"
        super().__init__(
            request,
            reliable,
            timers,
            INVITE_SERVER if invite else NON_INVITE_SERVER,
            ServerState.PROCEEDING if invite else ServerState.TRYING,
            ServerState.TERMINATED,
        )
        self.key = server_key(request)
        self._last_response: Response | None = None

    @property
    def last_response(self) -> Response | None:
        """The last response the TU sent (what a retransmitted request is answered with)."""
        return self._last_response

    def receive_request(self, request: Request, now: float) -> list[Output]:
        """A request matching this transaction: a retransmission, or the ACK."""
        out: list[Output] = []
        if request.method != "ACK":
            self._step(Event.REQUEST, now, out, request)
        elif self._ack_matches(request):
            self._step(Event.ACK, now, out, request)
        self._fire_due(now, out)
        return out

    def send_response(self, response: Response, now: float) -> list[Output]:
        """The TU's response. Raises TransactionError when the state does not allow one."""
        if not 100 <= response.status <= 699:
            raise TransactionError(f"status code {response.status} out of range")
        out: list[Output] = []
        if not self._step(_status_event(response.status), now, out, response):
            raise TransactionError(f"cannot send {response.status} in state {self.state.value}")
        self._fire_due(now, out)
        return out

    def _ack_matches(self, ack: Request) -> bool:
        # §17.2.3, RFC 2543 fallback: the ACK's To tag must be that of our response.
        if self.key[0] == MAGIC_COOKIE or self._last_response is None:
            return True
        return ack.to.tag == self._last_response.to.tag

    def _act(
        self, event: Input, now: float, out: list[Output], message: Request | Response | None
    ) -> None:
        if isinstance(message, Response):
            self._last_response = message
            out.append(Send(message))
        elif event is Event.REQUEST or event is Timer.G:
            if self._last_response is not None:
                out.append(Send(self._last_response, retransmission=True))
            if event is Timer.G:
                # §17.2.1: Timer G doubles, capped at T2.
                self._arm(Timer.G, self.config.backoff(self._intervals[Timer.G]), now)
        elif event is Timer.H:
            out.append(Timeout())

    def _enter(self, state: ServerState, now: float) -> None:
        cfg = self.config
        if state is ServerState.COMPLETED:
            if not self.is_invite:
                self._arm(Timer.J, cfg.timer_j(self.reliable), now)
                return
            if not self.reliable:
                self._arm(Timer.G, cfg.timer_g, now)
            self._arm(Timer.H, cfg.timer_h, now)
        elif state is ServerState.CONFIRMED:
            # §17.2.1: the ACK stops Timers G and H; Timer I absorbs ACK retransmissions.
            self._deadlines.clear()
            self._arm(Timer.I, cfg.timer_i(self.reliable), now)


class ClientTransaction(_Transaction[ClientState]):
    """An INVITE (§17.1.1) or non-INVITE (§17.1.2) client transaction.

    ``request`` is sent as is, so its top Via must carry a branch with the magic cookie.
    Timers run from ``now``; call :meth:`start` at once for the first transmission.
    """

    __slots__ = ("_ack", "_started", "key")

    def __init__(self, request: Request, reliable: bool, now: float, timers: TimerConfig) -> None:
        invite = request.method == "INVITE"
        super().__init__(
            request,
            reliable,
            timers,
            INVITE_CLIENT if invite else NON_INVITE_CLIENT,
            ClientState.CALLING if invite else ClientState.TRYING,
            ClientState.TERMINATED,
        )
        if not has_rfc3261_branch(request.top_via.branch):
            raise TransactionError("a client transaction needs a z9hG4bK branch (§8.1.1.7)")
        self.key = client_key(request)
        self._ack: Request | None = None
        self._started = False
        # §17.1.1.2, §17.1.2.2: retransmit only on unreliable transports; time out anyway.
        if invite:
            if not reliable:
                self._arm(Timer.A, timers.timer_a, now)
            self._arm(Timer.B, timers.timer_b, now)
        else:
            if not reliable:
                self._arm(Timer.E, timers.timer_e, now)
            self._arm(Timer.F, timers.timer_f, now)

    @property
    def ack(self) -> Request | None:
        """The ACK this transaction generated for a non-2xx final response, if any."""
        return self._ack

    def start(self) -> list[Output]:
        """The first transmission of the request."""
        if self._started:
            raise TransactionError("client transaction already started")
        self._started = True
        return [Send(self.request)]

    def receive_response(self, response: Response, now: float) -> list[Output]:
        """A response matching this transaction (see :func:`client_key`)."""
        self._check_started()
        out: list[Output] = []
        self._step(_status_event(response.status), now, out, response)
        self._fire_due(now, out)
        return out

    def handle_timer(self, now: float) -> list[Output]:
        self._check_started()
        return super().handle_timer(now)

    def _check_started(self) -> None:
        if not self._started:
            raise TransactionError("client transaction not started")

    def _act(
        self, event: Input, now: float, out: list[Output], message: Request | Response | None
    ) -> None:
        cfg = self.config
        if event is Timer.A:
            # §17.1.1.2: Timer A doubles without a cap (T2 does not apply to INVITE).
            out.append(Send(self.request, retransmission=True))
            self._arm(Timer.A, 2 * self._intervals[Timer.A], now)
        elif event is Timer.E:
            # §17.1.2.2: doubling up to T2 in Trying, T2 flat once a provisional came.
            out.append(Send(self.request, retransmission=True))
            interval = self._intervals[Timer.E]
            proceeding = self.state is ClientState.PROCEEDING
            self._arm(Timer.E, cfg.t2 if proceeding else cfg.backoff(interval), now)
        elif event is Timer.B or event is Timer.F:
            out.append(Timeout())
        elif isinstance(message, Response):
            if self.is_invite and event is Event.FAILURE:
                # §17.1.1.3: the transaction ACKs a non-2xx final response itself; a
                # retransmission of it gets the same ACK again and is not passed up.
                if self._ack is not None:
                    out.append(Send(self._ack, retransmission=True))
                    return
                ack = self._ack = make_ack(self.request, message)
                out.append(Deliver(message))
                out.append(Send(ack))
            else:
                out.append(Deliver(message))

    def _enter(self, state: ClientState, now: float) -> None:
        cfg = self.config
        if state is ClientState.PROCEEDING and self.is_invite:
            # §17.1.1.2: no more retransmissions, and Timer B only runs in Calling. A
            # proxy runs Timer C instead (§16.6 step 11).
            self._deadlines.clear()
        elif state is ClientState.COMPLETED:
            self._deadlines.clear()
            if self.is_invite:
                self._arm(Timer.D, cfg.timer_d(self.reliable), now)
            else:
                self._arm(Timer.K, cfg.timer_k(self.reliable), now)


def make_ack(request: Request, response: Response) -> Request:
    """The ACK for a non-2xx final response to an INVITE (§17.1.1.3).

    Request-URI, Call-ID, From and the CSeq number come from the INVITE, which also gives
    the only Via (its top one) and any Route headers; To comes from the response.
    """
    headers = Headers()
    headers.add("Via", request.headers.values("Via")[0])
    headers.add("Max-Forwards", request.headers.get("Max-Forwards") or "70")
    for route in request.headers.get_all("Route"):
        headers.add("Route", route)
    headers.add("From", request.headers.get("From") or str(request.from_))
    headers.add("To", response.headers.get("To") or str(response.to))
    headers.add("Call-ID", request.call_id)
    headers.add("CSeq", f"{request.cseq.number} ACK")
    return Request("ACK", request.uri, headers)
