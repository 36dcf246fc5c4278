"""RFC 3263 §4.3 failover: a forwarded request whose target answers 503, or nothing at
all, goes to the next target DNS (or a route) gave, within the one transaction budget.

The fork (``proxy.sip.fork``) sees one branch. This wrapper of the transaction layer,
which the forker uses, runs that branch as a chain of client transactions, one per
target, each with a branch of its own (§4.3: a new transaction). The router installs
the targets around ``forker.start``::

    with failover.targets(flows):
        forker.start(stx, req, h, [Target(None, flows[0])])

A target is left for the next one when it answers 503, when its transaction times out,
or when it has sent nothing at all (not even 100 Trying) within ``silence`` seconds
while other targets remain. Responses of a target left behind are ignored. Everything
ends within ``budget`` (Timer B or F, 64*T1) of the first attempt: the last target gets
what is left. Only the fork's CANCEL reaches the chain: it goes to the current target,
after its first provisional response (RFC 3261 §9.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .sip.fork import make_cancel
from .sip.message import Request, Response
from .sip.tokens import ProxyTokens
from .transactions import ClientTx, ServerTx, Transactions
from .transport import Flow

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Chain:
    first: Request  # the fork's branch request, as sent to the first target
    flows: Sequence[Flow]
    on_response: Callable[[Response], None]
    on_timeout: Callable[[], None]
    deadline: float
    attempt: int = 0
    request: Request | None = None  # what the current attempt sent
    ctx: ClientTx | None = None
    heard: bool = False  # the current attempt has answered something
    provisional: bool = False
    cancel_wanted: bool = False
    cancel_sent: bool = False
    done: bool = False


class Failover:
    """A :class:`~proxy.transactions.Transactions` that fails over among targets."""

    def __init__(
        self, inner: Transactions, tokens: ProxyTokens, *, silence: float, budget: float
    ) -> None:
        self._inner = inner
        self._tokens = tokens
        self._silence = silence
        self._budget = budget
        self._pending: Sequence[Flow] = ()
        self._chains: dict[str, _Chain] = {}  # first branch -> chain, while it runs
        self.failovers = 0  # targets left for the next one

    def respond(self, stx: ServerTx, resp: Response) -> None:
        self._inner.respond(stx, resp)

    @contextlib.contextmanager
    def targets(self, flows: Sequence[Flow]) -> Iterator[None]:
        """The request the forker starts in this block goes to ``flows`` in turn."""
        self._pending = flows
        try:
            yield
        finally:
            self._pending = ()

    def start_client(
        self,
        request: Request,
        flow: Flow,
        on_response: Callable[[Response], None],
        on_timeout: Callable[[], None],
    ) -> ClientTx:
        branch = request.top_via.branch or ""
        if request.method == "CANCEL":
            chain = self._chains.get(branch)
            if chain is not None:
                return self._cancel(chain)
        flows = self._pending
        if len(flows) > 1 and flow == flows[0] and branch not in self._chains:
            self._pending = ()
            loop = asyncio.get_running_loop()
            chain = _Chain(request, flows, on_response, on_timeout, loop.time() + self._budget)
            self._chains[branch] = chain
            loop.call_at(chain.deadline, self._expired, chain)
            self._attempt(chain)
            assert chain.ctx is not None
            return chain.ctx
        return self._inner.start_client(request, flow, on_response, on_timeout)

    # --- one attempt after the other ----------------------------------------------------

    def _attempt(self, chain: _Chain) -> None:
        i = chain.attempt
        req = chain.first if i == 0 else self._rebranch(chain.first)
        chain.request = req
        chain.heard = chain.provisional = False
        chain.ctx = self._inner.start_client(
            req, chain.flows[i],
            functools.partial(self._response, chain, i), functools.partial(self._timeout, chain, i),
        )  # fmt: skip
        if i + 1 < len(chain.flows):
            asyncio.get_running_loop().call_later(self._silence, self._silent, chain, i)

    def _rebranch(self, first: Request) -> Request:
        """The request with a new branch of ours (same loop hash, a new MAC'd unique)."""
        req = first.copy()
        top = req.top_via
        prefix = (top.branch or "").rpartition("-")[0]
        unique = self._tokens.branch_unique(secrets.token_hex(6), req.vias[1])
        params = tuple(
            (k, f"{prefix}-{unique}" if k.lower() == "branch" else v) for k, v in top.params
        )
        req.headers.pop_first_value("Via")
        req.headers.insert_before_first("Via", str(top.with_params(params)))
        req.invalidate()
        return req

    def _next(self, chain: _Chain, why: str) -> bool:
        """Go on with the next target, if there is one and time left; False otherwise."""
        loop = asyncio.get_running_loop()
        if chain.cancel_wanted or chain.attempt + 1 >= len(chain.flows):
            return False
        if loop.time() >= chain.deadline:
            return False
        flow, nxt = chain.flows[chain.attempt], chain.flows[chain.attempt + 1]
        log.info("%s %s: %s %s; trying %s", chain.first.method, chain.first.call_id, flow,
                 why, nxt)  # fmt: skip
        self.failovers += 1
        chain.attempt += 1
        self._attempt(chain)
        return True

    def _finish(self, chain: _Chain) -> None:
        chain.done = True
        self._chains.pop(chain.first.top_via.branch or "", None)

    # --- what the attempts report -------------------------------------------------------

    def _response(self, chain: _Chain, attempt: int, resp: Response) -> None:
        if chain.done or attempt != chain.attempt:
            return  # a target left behind
        chain.heard = True
        if resp.status < 200:
            chain.provisional = True
            chain.on_response(resp)
            if chain.cancel_wanted and not chain.cancel_sent:
                self._send_cancel(chain)
            return
        if resp.status == 503 and self._next(chain, "answered 503"):
            return
        self._finish(chain)
        chain.on_response(resp)

    def _timeout(self, chain: _Chain, attempt: int) -> None:
        if chain.done or attempt != chain.attempt:
            return
        if self._next(chain, "timed out"):
            return
        self._finish(chain)
        chain.on_timeout()

    def _silent(self, chain: _Chain, attempt: int) -> None:
        if chain.done or attempt != chain.attempt or chain.heard:
            return
        self._next(chain, f"sent nothing in {self._silence:g} s")

    def _expired(self, chain: _Chain) -> None:
        """The budget is spent: a target that has said nothing by now has timed out."""
        if chain.done or chain.heard:
            return
        self._finish(chain)
        chain.on_timeout()

    # --- CANCEL -------------------------------------------------------------------------

    def _cancel(self, chain: _Chain) -> ClientTx:
        chain.cancel_wanted = True
        if chain.provisional and not chain.done and not chain.cancel_sent:
            self._send_cancel(chain)
        assert chain.ctx is not None
        return chain.ctx

    def _send_cancel(self, chain: _Chain) -> None:
        assert chain.request is not None
        chain.cancel_sent = True
        self._inner.start_client(
            make_cancel(chain.request), chain.flows[chain.attempt], _ignore, _ignore_timeout
        )

    def __len__(self) -> int:
        return len(self._chains)


def _ignore(resp: Response) -> None:
    pass


def _ignore_timeout() -> None:
    pass
