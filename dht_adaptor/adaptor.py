"""The DHT adaptor of a site: REGISTER becomes a put, a location lookup becomes a get.

The registrar keeps each AOR's bindings in the local store (memory or Redis) and hands
every change to :meth:`DhtAdaptor.prepare` and :meth:`DhtAdaptor.publish`:

* ``prepare`` runs before the 200 OK. It turns the site's bindings into signed
  :class:`DhtBinding` records (with tombstones for bindings that went away) and checks
  that the record fits the overlay's payload limit, so an AOR with too many bindings is
  refused with a clear 403 instead of being lost later.
* ``publish`` queues the record; a background worker writes it to the overlay and retries
  failures with backoff, so a DHT outage never delays or loses a REGISTER.
* **Stored means replicated** (issue 11): a write the overlay acknowledged with fewer
  copies than it should hold (``Stored.complete`` false: the write quorum was met, not
  all k copies) stays queued and is written again after the retry delays, up to
  ``len(retry_delays)`` times, until every close node holds it. At most ``max_writes``
  writes are in flight: the node queues puts beyond its own limit, so a burst of
  REGISTERs waits in ``backlog`` (one entry per AOR, the latest record) instead of
  flooding the overlay.

A refresh REGISTER that changes nothing but the expiry is not written until half of the
lifetime last written is spent (issue: "does not write to the DHT until half the record's
lifetime is spent"). Every binding this site holds is republished well before it expires
on the overlay, so records lost with dead nodes come back.

Time is wall-clock seconds, passed in by ``clock`` so tests can use a manual one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from proxy.location import Located, LocationUnavailable
from proxy.sip.binding import Binding
from proxy.sip.errors import Forbidden

from .errors import DhtError
from .keys import SiteKey, sign_binding
from .record import (
    MAX_RECORD_BYTES,
    DhtBinding,
    RecordTooLarge,
    encode_record,
    live,
    tombstone_of,
)

log = logging.getLogger(__name__)


class Overlay(Protocol):
    """What the adaptor needs of a DHT node (``dht_adaptor.node.DhtNode``)."""

    async def put(self, aor: str, bindings: Sequence[DhtBinding]) -> int: ...

    async def get(self, aor: str, *, tombstones: bool = False) -> tuple[DhtBinding, ...]: ...


class TooManyBindings(Forbidden):
    """The AOR's record would not fit in one DHT value; the registrar answers 403."""

    reason = "Too Many Bindings"


@dataclass(slots=True)
class AdaptorStats:
    """What the adaptor did; ``snapshot`` keeps the names the admin API reports."""

    puts_ok: int = 0
    puts_failed: int = 0
    puts_skipped: int = 0  # refreshes that changed nothing the overlay needs yet
    puts_repaired: int = 0  # writes again of a record held by fewer copies than wanted
    gets_ok: int = 0
    gets_failed: int = 0

    def snapshot(self) -> dict[str, int]:
        return {
            "dht_puts_ok": self.puts_ok,
            "dht_puts_failed": self.puts_failed,
            "dht_puts_skipped": self.puts_skipped,
            "dht_puts_repaired": self.puts_repaired,
            "dht_gets_ok": self.gets_ok,
            "dht_gets_failed": self.gets_failed,
        }


LatencyObserver = Callable[[str, float, bool], None]

# A tombstone outlives the binding it hides by this much, so that a slow replica holding
# the old binding cannot bring it back after the tombstone lapsed.
TOMBSTONE_GRACE = 60.0
RETRY_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


@dataclass(slots=True)
class _Published:
    """What the overlay holds (or will hold) of one AOR from this site."""

    bindings: dict[str, DhtBinding] = field(default_factory=dict)  # contact -> latest
    local: tuple[Binding, ...] = ()  # the registrar's bindings it was made from
    written_at: float = 0.0  # when the last write of these bindings succeeded
    lifetime: float = 0.0  # the longest lifetime that write gave


@dataclass(frozen=True, slots=True)
class Prepared:
    """A signed record ready to publish; ``write`` False means a refresh that can wait."""

    aor: str
    bindings: tuple[DhtBinding, ...]
    write: bool
    local: tuple[Binding, ...] = ()


class DhtAdaptor:
    def __init__(
        self,
        overlay: Overlay,
        key: SiteKey,
        *,
        site_id: str,
        home: str,
        clock: Callable[[], float] = time.time,
        max_bytes: int = MAX_RECORD_BYTES,
        republish_interval: float = 600.0,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        lookup_timeout: float = 3.0,
        max_writes: int = 32,
    ) -> None:
        self.overlay = overlay
        self.key = key
        self.site_id = site_id
        self.home = home
        self.clock = clock
        self.max_bytes = max_bytes
        self.republish_interval = republish_interval
        self.retry_delays = tuple(retry_delays)
        self.lookup_timeout = lookup_timeout
        self.max_writes = max(1, max_writes)
        self._repairs: dict[str, int] = {}  # aor -> writes made to complete its copies
        self._latency_watchers: list[LatencyObserver] = []
        self.stats = AdaptorStats()
        self._published: dict[str, _Published] = {}
        self._dirty: dict[str, Prepared] = {}  # latest not yet written, per AOR
        self._attempts: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._last_version = 0

    # --- registrar side ----------------------------------------------------------------

    def _version(self) -> int:
        # Nanoseconds of wall clock, strictly increasing even if the clock stalls, so a
        # later write of this site always beats its earlier ones, across restarts too.
        self._last_version = max(time.time_ns(), self._last_version + 1)
        return self._last_version

    def prepare(self, aor: str, bindings: Sequence[Binding], *, force: bool = False) -> Prepared:
        """Sign this site's bindings of ``aor``; raise :class:`TooManyBindings` if too big.

        ``force`` rewrites even what the overlay already holds (republishing).
        """
        now = self.clock()
        old = self._published.get(aor)
        held = old.bindings if old is not None else {}
        current = {b.contact: b for b in bindings if b.is_live(now)}
        out: dict[str, DhtBinding] = {}
        write = False
        for contact, b in current.items():
            prev = held.get(contact)
            wanted = DhtBinding(
                aor=aor, contact=contact, home=self.home, expires_at=b.expires_at,
                site=self.site_id, version=0, q=b.q, instance=b.instance, reg_id=b.reg_id,
            )  # fmt: skip
            unchanged = prev is not None and not prev.tombstone and _same_but_expiry(prev, wanted)
            if prev is not None and unchanged and not force and not _half_spent(old, now):
                out[contact] = prev  # the overlay already holds a good enough copy
                continue
            out[contact] = replace(wanted, version=self._version())
            write = True
        for contact, prev in held.items():
            if contact in current:
                continue
            if prev.tombstone:
                if not prev.is_expired(now):
                    out[contact] = prev
                continue
            # Unregistered (or expired here first): hide it on the overlay too.
            out[contact] = tombstone_of(
                prev, version=self._version(),
                expires_at=max(prev.expires_at, now) + TOMBSTONE_GRACE,
            )  # fmt: skip
            write = True
        signed = tuple(b if b.signature else sign_binding(b, self.key) for b in out.values())
        check_fits(aor, signed, self.max_bytes)
        return Prepared(aor, signed, write or force, tuple(current.values()))

    def publish(self, prepared: Prepared) -> None:
        """Queue a prepared record for the overlay (returns at once)."""
        entry = self._published.setdefault(prepared.aor, _Published())
        entry.bindings = {b.contact: b for b in prepared.bindings}
        entry.local = prepared.local
        if not prepared.write:
            self.stats.puts_skipped += 1
            return
        self._dirty[prepared.aor] = prepared
        self._attempts.pop(prepared.aor, None)
        self._repairs.pop(prepared.aor, None)
        self._wake.set()

    def forget(self, aor: str) -> None:
        """Stop republishing ``aor`` (all its bindings and tombstones have lapsed)."""
        self._published.pop(aor, None)

    # --- lookups -----------------------------------------------------------------------

    async def lookup(self, aor: str) -> tuple[DhtBinding, ...]:
        """Verified, live bindings of ``aor`` from every site.

        Raises LocationUnavailable (503 to a caller) when the overlay cannot answer
        within ``lookup_timeout``: the DHT's own errors end here.
        """
        return (await self.locate(aor)).bindings

    async def locate(self, aor: str) -> Located[DhtBinding]:
        """:meth:`lookup`, and whether the overlay knows the AOR at all (tombstones of
        bindings that went away count: the user exists, but is not reachable now)."""
        started = time.perf_counter()
        try:
            found = await asyncio.wait_for(
                self.overlay.get(aor, tombstones=True), self.lookup_timeout
            )
        except (DhtError, TimeoutError) as exc:
            self.stats.gets_failed += 1
            self._observe("get", started, False)
            raise LocationUnavailable(f"DHT lookup of {aor} failed: {exc or 'timed out'}") from exc
        self.stats.gets_ok += 1
        self._observe("get", started, True)
        return Located(live(found, self.clock()), known=bool(found))

    def watch_latency(self, observer: LatencyObserver) -> None:
        """Call ``observer("put" | "get", seconds, ok)`` after every overlay operation
        (the admin API's latency histograms)."""
        self._latency_watchers.append(observer)

    def _observe(self, op: str, started: float, ok: bool) -> None:
        if self._latency_watchers:
            seconds = time.perf_counter() - started
            for watcher in self._latency_watchers:
                watcher(op, seconds, ok)

    # --- the background writer ---------------------------------------------------------

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    @property
    def backlog(self) -> int:
        """Records waiting for the overlay (failed writes being retried included)."""
        return len(self._dirty)

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued record is written; False if some are still pending."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._dirty and asyncio.get_running_loop().time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        return not self._dirty

    async def _run(self) -> None:
        next_due: dict[str, float] = {}  # aor -> loop time of its next retry
        loop = asyncio.get_running_loop()
        last_republish = self.clock()
        while True:
            now_loop = loop.time()
            due = [a for a in self._dirty if next_due.get(a, 0.0) <= now_loop]
            if due:
                await asyncio.gather(*(self._write(a, next_due) for a in due[: self.max_writes]))
                continue
            if self.clock() - last_republish >= min(60.0, self.republish_interval / 10):
                last_republish = self.clock()
                self._queue_republish()
                continue
            wait = min((t - now_loop for t in next_due.values()), default=1.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, min(wait, 1.0)))

    def _queue_republish(self) -> None:
        """Re-sign and queue each AOR not written for ``republish_interval``: nodes that
        held it may have died, and new nodes may now be closer to its key."""
        now = self.clock()
        for aor, entry in list(self._published.items()):
            if all(b.is_expired(now) for b in entry.bindings.values()):
                self.forget(aor)
            elif aor not in self._dirty and now - entry.written_at >= self.republish_interval:
                try:
                    self.publish(self.prepare(aor, entry.local, force=True))
                except TooManyBindings as exc:  # cannot grow without a REGISTER
                    log.error("cannot republish %s", exc)

    async def _write(self, aor: str, next_due: dict[str, float]) -> None:
        prepared = self._dirty.get(aor)
        if prepared is None:
            return
        started = self.clock()
        timer = time.perf_counter()
        try:
            stored = await self.overlay.put(aor, prepared.bindings)
            if stored <= 0:
                raise DhtError("no node stored the record")
        except Exception as exc:  # the writer must outlive any one record's failure
            self.stats.puts_failed += 1
            self._observe("put", timer, False)
            attempt = self._attempts.get(aor, 0)
            self._attempts[aor] = attempt + 1
            delay = self.retry_delays[min(attempt, len(self.retry_delays) - 1)]
            if not isinstance(exc, DhtError | OSError):
                log.exception("DHT put of %s failed unexpectedly; retrying in %.1fs", aor, delay)
            else:
                # The first failure of a record is a warning; its retries, debug lines
                # (an overlay outage would otherwise log every record every few seconds).
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(level, "DHT put of %s failed (%s); retrying in %.1fs", aor, exc, delay)
            next_due[aor] = asyncio.get_running_loop().time() + delay
            return
        self.stats.puts_ok += 1
        self._observe("put", timer, True)
        next_due.pop(aor, None)
        self._attempts.pop(aor, None)
        repairs = self._repairs.get(aor, 0)
        if not getattr(stored, "complete", True) and repairs < len(self.retry_delays):
            # Acknowledged, but not every close node holds it yet: write it again later.
            self._repairs[aor] = repairs + 1
            self.stats.puts_repaired += 1
            next_due[aor] = asyncio.get_running_loop().time() + self.retry_delays[repairs]
        else:
            self._repairs.pop(aor, None)
            if self._dirty.get(aor) is prepared:
                del self._dirty[aor]
        entry = self._published.setdefault(aor, _Published())
        entry.written_at = started
        entry.lifetime = max((b.expires_at - started for b in prepared.bindings), default=0.0)


def check_fits(aor: str, bindings: Sequence[DhtBinding], max_bytes: int) -> None:
    """Raise :class:`TooManyBindings` if ``bindings`` would not fit one DHT record."""
    try:
        encode_record(bindings, max_bytes=max_bytes)
    except RecordTooLarge:
        raise TooManyBindings(f"{aor}: {len(bindings)} bindings do not fit a DHT record") from None


def _same_but_expiry(a: DhtBinding, b: DhtBinding) -> bool:
    return (a.home, a.q, a.instance, a.reg_id, a.site) == (
        b.home,
        b.q,
        b.instance,
        b.reg_id,
        b.site,
    )


def _half_spent(entry: _Published | None, now: float) -> bool:
    if entry is None or entry.written_at == 0.0:
        return True
    return now - entry.written_at >= entry.lifetime / 2
