"""One proxied request and its branches (RFC 3261 §16.6-§16.10) as a sans-IO state machine.

A :class:`Fork` is what a stateful proxy keeps between the server transaction of a
request and the client transactions of its forwarded copies, one per target (a
*branch*). It decides which responses go upstream (through
:class:`~proxy.sip.response_context.ResponseContext`, §16.7), when a branch is
CANCELled (§9.1, §16.10) and when Timer C expires (§16.8). It holds no transaction
itself: its outputs tell the adapter what to start and what to send.

Inputs all take the current time: ``start``, ``receive_response`` and ``branch_timeout``
(from the client transactions), ``cancel`` (a CANCEL from upstream) and
``handle_timer``. ``get_timer()`` is the absolute time at which ``handle_timer`` must be
called next; any input also fires what is already due, so after every call it is None
or in the future. Outputs are carried out in order.

Each branch moves through the states of one of the two tables below, and nothing else
changes a branch's state. The edges' actions are few: entering Cancelling sends the
CANCEL, entering Completed stops Timer C, and a provisional above 100 re-arms it. The
responses themselves, whatever edge they take, go to the ResponseContext, whose
decisions :meth:`Fork._apply` turns into outputs.

Two departures from the asyncio ``ProxyContext`` this replaces, both where it could send a
second CANCEL for one branch: Timer C expiring on a branch already CANCELled, and an
upstream CANCEL for a branch that Timer C already CANCELled, are absorbed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from .errors import SipError
from .headers import Headers
from .message import Request, Response, make_response
from .response_context import Decision, ResponseContext

__all__ = [
    "STALE_STATUSES", "BranchEvent", "BranchState", "CancelBranch", "Fork", "ForkError",
    "ForkOutput", "HoldFinal", "SendUpstream", "StaleTarget", "StartBranch", "make_cancel",
]  # fmt: skip

# A target answering one of these (or not at all) may be stale: the phone moved, or the
# home proxy found in the DHT went away. The adapter decides what to do about it.
STALE_STATUSES = frozenset({404, 408, 480, 503})


class ForkError(SipError):
    """The adapter used a fork wrongly (an input before ``start``, a bad branch index)."""


# --- outputs -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartBranch:
    """Start a client transaction for branch ``index`` sending ``request``."""

    index: int
    request: Request


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Hand ``response`` to the server transaction (its top Via, ours, already removed)."""

    response: Response


@dataclass(frozen=True, slots=True)
class CancelBranch:
    """Start a CANCEL client transaction for branch ``index`` (§9.1, §16.10)."""

    index: int
    request: Request


@dataclass(frozen=True, slots=True)
class StaleTarget:
    """Branch ``index`` failed with ``status`` (408 for a timeout): its target may be stale."""

    index: int
    status: int


@dataclass(frozen=True, slots=True)
class HoldFinal:
    """With ``retry_stale``: the final response is held; call ``release()`` or discard it."""

    response: Response


ForkOutput = StartBranch | SendUpstream | CancelBranch | StaleTarget | HoldFinal


# --- the transition tables -----------------------------------------------------------------


class BranchState(Enum):
    CALLING = "Calling"  # forwarded, nothing heard yet
    CANCEL_WAITING = "Cancel waiting"  # CANCEL wanted, but no provisional yet (§9.1)
    PROCEEDING = "Proceeding"  # a provisional came
    CANCELLING = "Cancelling"  # CANCEL sent; the final response is still to come
    COMPLETED = "Completed"  # a final response came, or the branch timed out


class BranchEvent(Enum):
    PROVISIONAL = "1xx"
    FINAL = "2xx-6xx"
    TIMEOUT = "timeout"  # the client transaction's Timer B or F
    CANCEL = "cancel"  # the fork is cancelled: from upstream (§16.10) or by §16.7 step 10
    TIMER_C = "Timer C"  # §16.8


_B = BranchState
_E = BranchEvent

INVITE_BRANCH: dict[tuple[BranchState, BranchEvent], BranchState] = {
    (_B.CALLING, _E.PROVISIONAL): _B.PROCEEDING,
    (_B.CALLING, _E.FINAL): _B.COMPLETED,
    (_B.CALLING, _E.TIMEOUT): _B.COMPLETED,
    (_B.CALLING, _E.TIMER_C): _B.COMPLETED,  # §16.8: no provisional: as if a 408 came
    # §9.1: a CANCEL must not be sent before a provisional response; wait for one.
    (_B.CALLING, _E.CANCEL): _B.CANCEL_WAITING,
    (_B.CANCEL_WAITING, _E.PROVISIONAL): _B.CANCELLING,
    (_B.CANCEL_WAITING, _E.FINAL): _B.COMPLETED,
    (_B.CANCEL_WAITING, _E.TIMEOUT): _B.COMPLETED,
    (_B.CANCEL_WAITING, _E.TIMER_C): _B.COMPLETED,
    (_B.PROCEEDING, _E.PROVISIONAL): _B.PROCEEDING,
    (_B.PROCEEDING, _E.FINAL): _B.COMPLETED,
    (_B.PROCEEDING, _E.TIMEOUT): _B.COMPLETED,
    (_B.PROCEEDING, _E.CANCEL): _B.CANCELLING,
    (_B.PROCEEDING, _E.TIMER_C): _B.CANCELLING,  # §16.8: it rang: CANCEL it
    (_B.CANCELLING, _E.PROVISIONAL): _B.CANCELLING,
    (_B.CANCELLING, _E.FINAL): _B.COMPLETED,
    (_B.CANCELLING, _E.TIMEOUT): _B.COMPLETED,
}
# A non-INVITE is never CANCELled (§9.1: "SHOULD NOT") and has no Timer C (§16.6 step 11).
NON_INVITE_BRANCH: dict[tuple[BranchState, BranchEvent], BranchState] = {
    (_B.CALLING, _E.PROVISIONAL): _B.PROCEEDING,
    (_B.CALLING, _E.FINAL): _B.COMPLETED,
    (_B.CALLING, _E.TIMEOUT): _B.COMPLETED,
    (_B.PROCEEDING, _E.PROVISIONAL): _B.PROCEEDING,
    (_B.PROCEEDING, _E.FINAL): _B.COMPLETED,
    (_B.PROCEEDING, _E.TIMEOUT): _B.COMPLETED,
}
# Inputs with no edge are absorbed: anything in Completed (§16.7: a response for a
# branch already done is ignored), and a second CANCEL or Timer C in Cancelling.


# --- the machine ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Branch:
    request: Request
    state: BranchState = BranchState.CALLING


class Fork:
    """The branches of one proxied request, from forwarding to the final response upstream.

    ``request`` is the request as received (responses the proxy makes itself, 408 and
    487, answer it); ``branches`` are its forwarded copies, one per target, each with our
    Via on top. With ``retry_stale``, a final response ≥300 to be sent while some branch
    looked stale is held (:class:`HoldFinal`) so that the adapter can try fresh targets.
    ``to_tag`` goes into the To of every response the fork makes itself: the proxy is
    their UAS, and §8.2.6.2 wants a tag (the server transaction's, so that all agree).
    """

    __slots__ = (
        "_branches",
        "_cancelled",
        "_deadlines",
        "_held",
        "_invite",
        "_responses",
        "_retry_stale",
        "_stale",
        "_started",
        "_table",
        "_timer_c",
        "_to_tag",
        "request",
    )

    def __init__(
        self,
        request: Request,
        branches: Sequence[Request],
        *,
        timer_c: float,
        retry_stale: bool = False,
        to_tag: str | None = None,
    ) -> None:
        if not branches:
            raise ValueError("a fork needs at least one branch")
        if timer_c <= 0:
            raise ValueError("Timer C must be positive")
        self.request = request
        self._invite = request.method == "INVITE"
        self._table = INVITE_BRANCH if self._invite else NON_INVITE_BRANCH
        self._branches = [_Branch(b) for b in branches]
        self._responses = ResponseContext(len(branches))
        self._timer_c = timer_c
        self._retry_stale = retry_stale
        self._to_tag = to_tag
        self._deadlines: dict[int, float] = {}  # Timer C of each branch (INVITE only)
        self._cancelled = False
        self._stale = False
        self._held: Response | None = None
        self._started = False

    # --- state -----------------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def held(self) -> Response | None:
        """The final response held back by ``retry_stale``, if any."""
        return self._held

    @property
    def done(self) -> bool:
        """Every branch has its final response (or timed out) and nothing is held."""
        return self._held is None and all(b.state is _B.COMPLETED for b in self._branches)

    def state(self, index: int) -> BranchState:
        return self._branch(index).state

    def get_timer(self) -> float | None:
        """When ``handle_timer`` must be called next (absolute time), or None."""
        return min(self._deadlines.values(), default=None)

    # --- inputs ----------------------------------------------------------------------------

    def start(self, now: float) -> list[ForkOutput]:
        """Forward every branch; an INVITE branch runs Timer C from now (§16.6 step 11)."""
        if self._started:
            raise ForkError("fork already started")
        self._started = True
        out: list[ForkOutput] = []
        for i, branch in enumerate(self._branches):
            out.append(StartBranch(i, branch.request))
            if self._invite:
                self._deadlines[i] = now + self._timer_c
        return out

    def receive_response(self, index: int, response: Response, now: float) -> list[ForkOutput]:
        """A response of branch ``index``'s client transaction, our Via still on top."""
        self._check_started()
        out: list[ForkOutput] = []
        event = _E.PROVISIONAL if response.status < 200 else _E.FINAL
        # No edge (the branch is Completed): the response is ignored, not even forwarded.
        if (self._branch(index).state, event) in self._table:
            if response.status in STALE_STATUSES:
                self._saw_stale(index, response.status, out)
            self._step(index, event, now, out, response.status)
            up = response.copy()
            up.headers.pop_first_value("Via")  # §16.7 step 3: ours
            self._apply(self._responses.on_response(index, up), now, out)
        self._fire_due(now, out)
        return out

    def branch_timeout(self, index: int, now: float) -> list[ForkOutput]:
        """Branch ``index``'s client transaction timed out (Timer B or F)."""
        self._check_started()
        out: list[ForkOutput] = []
        self._expire(index, _E.TIMEOUT, now, out)
        self._fire_due(now, out)
        return out

    def cancel(self, now: float) -> list[ForkOutput]:
        """A CANCEL for the request came from upstream (§16.10)."""
        self._check_started()
        out: list[ForkOutput] = []
        self._cancel_pending(now, out)
        self._fire_due(now, out)
        return out

    def release(self) -> list[ForkOutput]:
        """Send the held final response upstream: a 487 if the fork was cancelled meanwhile."""
        held = self._held
        if held is None:
            return []
        self._held = None
        return [SendUpstream(self._own_response(487) if self._cancelled else held)]

    def handle_timer(self, now: float) -> list[ForkOutput]:
        """Fire every Timer C due at ``now``; calling it early is harmless."""
        self._check_started()
        out: list[ForkOutput] = []
        self._fire_due(now, out)
        return out

    # --- the step and its actions -----------------------------------------------------------

    def _step(
        self, index: int, event: BranchEvent, now: float, out: list[ForkOutput], status: int = 0
    ) -> bool:
        """Follow branch ``index``'s edge for ``event``; False when there is none (absorbed)."""
        branch = self._branch(index)
        new = self._table.get((branch.state, event))
        if new is None:
            return False
        if event is _E.PROVISIONAL and status > 100 and self._invite:
            # §16.7 step 2: a provisional (other than 100) restarts Timer C.
            self._deadlines[index] = now + self._timer_c
        if new is not branch.state:
            branch.state = new
            if new is _B.CANCELLING:
                # Only INVITE branches reach Cancelling (§9.1).
                out.append(CancelBranch(index, make_cancel(branch.request)))
            elif new is _B.COMPLETED:
                self._deadlines.pop(index, None)
        return True

    def _expire(self, index: int, event: BranchEvent, now: float, out: list[ForkOutput]) -> None:
        """A timeout (Timer B/F), or Timer C, which is one only while nothing rang."""
        if not self._step(index, event, now, out):
            return
        if self._branches[index].state is not _B.COMPLETED:
            return  # Timer C CANCELled a branch that rang (§16.8)
        # §16.7 step 2: a branch that timed out counts as a 408; once the request is
        # cancelled, it is answered 487 (§16.10, §9.2).
        self._saw_stale(index, 408, out)
        status = 487 if self._cancelled else 408
        decision = self._responses.on_response(index, self._own_response(status))
        self._apply(decision, now, out)

    def _saw_stale(self, index: int, status: int, out: list[ForkOutput]) -> None:
        self._stale = True
        out.append(StaleTarget(index, status))

    def _apply(self, decision: Decision, now: float, out: list[ForkOutput]) -> None:
        """Carry out a ResponseContext decision (§16.7 steps 5-10)."""
        for response in decision.forward:
            if self._cancelled and response.status == 408:
                # §16.10: the cancelled request ends with a 487, not our timeout.
                response = self._own_response(487)
            # A failure while some target looked stale waits: fresh targets may do better.
            if response.status >= 300 and self._retry_stale and self._stale and not self._cancelled:
                self._held = response
                out.append(HoldFinal(response))
                continue
            out.append(SendUpstream(response))
        if decision.cancel_pending:
            # §16.7 step 10: after a 2xx or 6xx, CANCEL every branch still pending.
            self._cancel_pending(now, out)

    def _cancel_pending(self, now: float, out: list[ForkOutput]) -> None:
        """§16.10: CANCEL every pending branch; one that has not rung waits for a 1xx."""
        self._cancelled = True
        for index in range(len(self._branches)):
            self._step(index, _E.CANCEL, now, out)

    def _fire_due(self, now: float, out: list[ForkOutput]) -> None:
        # Earliest first. Firing never re-arms Timer C (only a provisional does), so this ends.
        while self._deadlines:
            index, when = min(self._deadlines.items(), key=lambda item: item[1])
            if when > now:
                return
            del self._deadlines[index]
            self._expire(index, _E.TIMER_C, now, out)

    def _own_response(self, status: int) -> Response:
        """A response the proxy makes itself (408, 487), with our To tag (§8.2.6.2)."""
        return make_response(self.request, status, to_tag=self._to_tag)

    def _branch(self, index: int) -> _Branch:
        if not 0 <= index < len(self._branches):
            raise ForkError(f"no branch {index}")
        return self._branches[index]

    def _check_started(self) -> None:
        if not self._started:
            raise ForkError("fork not started")


def make_cancel(branch_request: Request) -> Request:
    """The CANCEL of a forwarded request (§9.1).

    Request-URI, Call-ID, From, To and the CSeq number are the request's, with CSeq
    method CANCEL; its only Via is the request's top one (ours, so the CANCEL takes the
    same branch), and it carries the request's Route header fields (§9.1: "MUST be
    identical"). Max-Forwards starts afresh at 70.
    """
    headers = Headers()
    headers.add("Via", branch_request.headers.values("Via")[0])
    for route in branch_request.headers.get_all("Route"):
        headers.add("Route", route)
    for name in ("From", "To", "Call-ID"):
        headers.add(name, branch_request.headers.get(name) or "")
    headers.add("CSeq", f"{branch_request.cseq.number} CANCEL")
    headers.add("Max-Forwards", "70")
    return Request("CANCEL", branch_request.uri, headers)
