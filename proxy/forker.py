"""Runs forks (``proxy.sip.fork``) on the event loop: one client transaction per
branch, Timer C on ``loop.call_at``, responses handed to the server transaction.

The fork decides (RFC 3261 §16.7-§16.10); this adapter only carries out its outputs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .sip import fork as f
from .sip.forwarding import DIALOG_CREATING, ProxyIdentity, forward_copy, make_branch
from .sip.message import Request, Response, make_response
from .sip.tokens import ProxyTokens
from .transactions import ServerTx, Transactions
from .transport import Flow

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Target:
    """One place a proxied request goes."""

    uri: str | None  # new Request-URI, or None to keep it
    flow: Flow
    path: tuple[str, ...] = ()  # RFC 3327 Path of the binding: Route headers to add
    headers: tuple[tuple[str, str], ...] = ()  # added to this branch only
    home: str | None = None  # a member site's home proxy (proxy.sites)


class ForkRunner:
    def __init__(
        self,
        transactions: Transactions,
        stx: ServerTx,
        fork: f.Fork,
        flows: Sequence[Flow],
        *,
        on_stale: Callable[[int], None] | None = None,
        on_hold: Callable[[ForkRunner], None] | None = None,
        answer_within: float | None = None,
        on_silent: Callable[[int], None] | None = None,
        branches: Sequence[Request] = (),
    ) -> None:
        """``answer_within``: a branch that has heard nothing at all after that many
        seconds (a stateful proxy answers 100 Trying at once) is given up as if it had
        answered 480, and reported to ``on_silent``; ``branches`` are the requests sent."""
        self.stx = stx
        self.fork = fork
        self.flows = tuple(flows)
        self._transactions = transactions
        self._on_stale = on_stale
        self._on_hold = on_hold
        self._timer: asyncio.TimerHandle | None = None
        self._answer_within = answer_within
        self._on_silent = on_silent
        self._branches = tuple(branches)
        self._heard: set[int] = set()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def start(self) -> None:
        self.stx.on_cancel = self.cancel
        self._apply(self.fork.start(self._now()))

    def cancel(self) -> None:
        self._apply(self.fork.cancel(self._now()))

    def release(self) -> None:
        """Send the held final response upstream (a retry found nothing better)."""
        self._apply(self.fork.release())

    @property
    def tried(self) -> frozenset[Flow]:
        return frozenset(self.flows)

    def _response(self, index: int, resp: Response) -> None:
        self._heard.add(index)
        self._apply(self.fork.receive_response(index, resp, self._now()))

    def _silent(self, index: int) -> None:
        if index in self._heard or self.fork.cancelled:
            return
        self._heard.add(index)
        if self._on_silent is not None:
            self._on_silent(index)
        # As if the home proxy had said it cannot reach the user now (RFC 3261 §21.4.18).
        unreachable = make_response(self._branches[index], 480, "Temporarily Unavailable")
        self._apply(self.fork.receive_response(index, unreachable, self._now()))

    def _timeout(self, index: int) -> None:
        self._apply(self.fork.branch_timeout(index, self._now()))

    def _fire(self) -> None:
        self._timer = None
        self._apply(self.fork.handle_timer(self._now()))

    def _apply(self, outputs: list[f.ForkOutput]) -> None:
        for out in outputs:
            if isinstance(out, f.StartBranch):
                self._transactions.start_client(
                    out.request, self.flows[out.index],
                    on_response=functools.partial(self._response, out.index),
                    on_timeout=functools.partial(self._timeout, out.index),
                )  # fmt: skip
                if self._answer_within is not None and self._branches:
                    asyncio.get_running_loop().call_later(
                        self._answer_within, self._silent, out.index
                    )
            elif isinstance(out, f.SendUpstream):
                self._transactions.respond(self.stx, out.response)
            elif isinstance(out, f.CancelBranch):
                self._transactions.start_client(
                    out.request, self.flows[out.index], _ignore_response, _ignore_timeout
                )
            elif isinstance(out, f.StaleTarget):
                if self._on_stale is not None:
                    self._on_stale(out.index)
            elif isinstance(out, f.HoldFinal):
                if self._on_hold is not None:
                    self._on_hold(self)
                else:
                    self.release()
        self._rearm()

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        when = self.fork.get_timer()
        if when is not None:
            self._timer = asyncio.get_running_loop().call_at(when, self._fire)


def _ignore_response(resp: Response) -> None:
    pass


def _ignore_timeout() -> None:
    pass


class Forker:
    """Starts forks: builds each branch's request (§16.6) and runs the fork."""

    def __init__(
        self,
        transactions: Transactions,
        identity: ProxyIdentity,
        tokens: ProxyTokens,
        *,
        timer_c: float,
    ) -> None:
        self._transactions = transactions
        self._me = identity
        self._tokens = tokens
        self._timer_c = timer_c

    def start(
        self,
        stx: ServerTx,
        req: Request,
        loop_hash: str,
        targets: Sequence[Target],
        *,
        retry_stale: bool = False,
        on_stale: Callable[[int], None] | None = None,
        on_hold: Callable[[ForkRunner], None] | None = None,
        answer_within: float | None = None,
        on_silent: Callable[[int], None] | None = None,
    ) -> ForkRunner:
        rr = req.method in DIALOG_CREATING and req.to.tag is None
        # Our Record-Route carries the dialog's token (in-dialog requests must bring it
        # back), our branch a MAC of the Via responses return to (see sip/tokens.py).
        token = self._tokens.dialog(req.call_id, req.from_.tag or "") if rr else None
        upstream = req.top_via
        branches = [
            forward_copy(
                req, t.uri, self._me,
                branch=make_branch(
                    loop_hash, self._tokens.branch_unique(secrets.token_hex(6), upstream)
                ),
                out_transport=t.flow.transport, in_transport=stx.flow.transport,
                record_route=rr, path=t.path, rr_token=token, extra=t.headers,
            )
            for t in targets
        ]  # fmt: skip
        fork = f.Fork(
            req, branches, timer_c=self._timer_c, retry_stale=retry_stale, to_tag=stx.to_tag
        )
        runner = ForkRunner(
            self._transactions, stx, fork, [t.flow for t in targets],
            on_stale=on_stale, on_hold=on_hold,
            answer_within=answer_within, on_silent=on_silent, branches=branches,
        )  # fmt: skip
        runner.start()
        return runner
