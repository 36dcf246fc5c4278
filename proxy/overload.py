"""Overload control: when to answer new requests 503 instead of serving them. Sans-IO.

Two signals say the proxy cannot keep up:

* **queue delay**: how long datagrams waited in the socket's receive queue before we
  read them. The transport takes it from the kernel's receive timestamp
  (``SO_TIMESTAMPNS``) and feeds every sample to :meth:`OverloadControl.observe`, which
  keeps an exponentially weighted moving average (EWMA). Waiting in the queue is what a
  busy event loop looks like from outside: every callback, task and collector pause
  shows up there.
* **server transactions in flight**, from a callable (``len(transactions.server_txs)``):
  work accepted and not yet finished, which the queue delay does not see when it waits
  on the network (DHT lookups, callees that ring).

While either is past its limit, :meth:`shedding` says yes and the transport answers
every *new out-of-dialog* request (no To tag, not ACK, not CANCEL) with ``503 Service
Unavailable`` and ``Retry-After`` (RFC 3261 §21.5.4, §20.33), built from the raw bytes
(``proxy.sip.shed``) before any parsing; in-dialog requests and responses go on as
usual, so calls already set up keep working. Shedding is cheap, so the queue drains
and the delay falls; it stops once the delay is below half the limit and the
transactions below nine tenths (hysteresis), and the proxy serves new requests again.
Throughput therefore levels off at what the proxy can serve instead of collapsing
under retransmissions of requests answered too late (bench/overload.py).

The decision flips fast (many times a second at 4x capacity). What is logged is the
*episode*: it starts with the first 503 and ends once no request has been shed for
``hold`` seconds; one line each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class OverloadControl:
    def __init__(
        self,
        max_queue_delay: float,
        max_transactions: int,
        in_flight: Callable[[], int],
        *,
        retry_after: int = 5,
        smoothing: float = 0.125,
        hold: float = 5.0,
    ) -> None:
        if max_queue_delay <= 0 or max_transactions < 1 or not 0 < smoothing <= 1:
            raise ValueError("max_queue_delay > 0, max_transactions >= 1, 0 < smoothing <= 1")
        self.max_queue_delay = max_queue_delay
        self.max_transactions = max_transactions
        self.in_flight = in_flight
        self.retry_after = retry_after
        self.smoothing = smoothing  # EWMA weight of each new delay sample
        self.hold = hold
        self.delay = 0.0  # EWMA of the queue delay, seconds
        self.rejected = 0  # requests answered 503, since the start
        self.episodes = 0
        self._shedding = False
        self._episode_start: float | None = None  # None: not in an episode
        self._last_shed = 0.0
        self._episode_rejected = 0
        self._samples = 0  # delay samples since the last tick

    @property
    def overloaded(self) -> bool:
        """In an overload episode (what the log and the stats show)."""
        return self._episode_start is not None

    def observe(self, delay: float) -> None:
        """One queue delay sample, in seconds (negative clock skew counts as zero)."""
        self.delay += (max(delay, 0.0) - self.delay) * self.smoothing
        self._samples += 1

    def shedding(self, now: float) -> bool:
        """Whether a new out-of-dialog request arriving at ``now`` gets a 503."""
        if self._shedding:
            if (
                self.delay < self.max_queue_delay / 2
                and self.in_flight() < self.max_transactions * 0.9
            ):
                self._shedding = False
        elif self.delay > self.max_queue_delay or self.in_flight() >= self.max_transactions:
            self._shedding = True
        if not self._shedding and self._episode_start is not None:
            self._maybe_end(now)
        return self._shedding

    def shed(self, now: float) -> None:
        """The transport answered one request 503 at ``now``."""
        self.rejected += 1
        self._last_shed = now
        if self._episode_start is None:
            self._episode_start = now
            self._episode_rejected = 0
            self.episodes += 1
            log.warning(
                "overload: answering new requests 503 (queue delay %.0f ms, limit %.0f ms; "
                "%d server transactions, limit %d)",
                self.delay * 1000, self.max_queue_delay * 1000,
                self.in_flight(), self.max_transactions,
            )  # fmt: skip
        self._episode_rejected += 1

    def tick(self, now: float) -> None:
        """Housekeeping, every second or so: a receive queue that gave no sample since the
        last tick was empty, so its delay is zero (otherwise the last busy moment's EWMA
        would greet the next requests after a pause with 503s); and an episode ends even
        when no traffic comes to call :meth:`shedding`."""
        if not self._samples:
            self.delay = 0.0
        self._samples = 0
        if self._shedding:
            self.shedding(now)
        elif self._episode_start is not None:
            self._maybe_end(now)

    def _maybe_end(self, now: float) -> None:
        assert self._episode_start is not None
        if now - self._last_shed < self.hold:
            return
        log.warning(
            "overload over after %.1f s: %d request(s) answered 503 (queue delay now %.0f ms)",
            self._last_shed - self._episode_start, self._episode_rejected, self.delay * 1000,
        )  # fmt: skip
        self._episode_start = None
