"""A write-through view in memory in front of the site's shared location store (Redis), so
that calls to the phones this process knows keep working while Redis is away, and so
that what Redis forgot (a crash without persistence, FLUSHALL) is written back.

How it answers:

* ``save`` goes to the backend first and into memory only once the backend took it;
  while the backend is unreachable it fails at once with ``LocationError`` (REGISTER
  answers 503 with Retry-After): nothing is acknowledged that is not stored.
* ``load`` reads the backend while it answers, and keeps what it read; when the backend
  fails, or is known to be down, it answers from memory for the AORs held here, and
  raises ``LocationError`` for the others (which may have bindings we never saw).
* A watcher reads the backend's marker (see :mod:`dht_adaptor.redis_store`) every
  ``check_interval`` seconds. It fails while Redis is away: the store is then *down*,
  which ``available`` and ``/ready`` report. When the marker answers again the store is
  up again (no restart). When the marker is gone or was replaced, Redis lost its data:
  every AOR held here is written back with ``restore`` (never over an AOR saved since)
  and the marker is set again.

Why ``load`` reads Redis rather than memory while Redis answers: several proxy processes
of one site may share the Redis (a phone may register through one and be called
through another); Redis is where they agree, and a memory-first read would miss what the
others changed unless they told each other. It costs one GET per call, as before.

What it assumes when processes share one Redis: they use the same key prefix; each
writes back what *it* holds after a loss, and the first write of an AOR wins, so an
AOR changed through another process just before the loss may come back as this process
last saw it (until the phone's next REGISTER); and while Redis is away, each answers
from what it last saw, which may miss a change made through another process. The marker
tells each process of a loss once, whichever process set the new marker.

Memory is bounded: at most ``max_aors`` AORs, the least recently used dropped first
(they are then served from the backend only); expired bindings are swept by the watcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from proxy.location import Binding, LocationError, LocationStore

__all__ = ["CHECK_INTERVAL", "MAX_AORS", "CachedStore", "DurableStore"]

log = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0  # seconds between reads of the backend's marker
SWEEP_INTERVAL = 60.0  # seconds between sweeps of expired AORs out of memory
MAX_AORS = 100_000  # AORs kept in memory (a few hundred bytes to a few KB each)


class DurableStore(LocationStore, Protocol):
    """What the view needs of its backend beyond a :class:`LocationStore`."""

    @property
    def where(self) -> str:
        """The backend, for log lines and messages (no credentials)."""
        ...

    async def ping(self) -> None:
        """Return if the backend answers; raise LocationError if not."""
        ...

    async def marker(self) -> str | None:
        """The marker's token; None if the backend lost its data. Raises LocationError."""
        ...

    async def ensure_marker(self) -> str:
        """Set a marker unless there is one; the token in force. Raises LocationError."""
        ...

    async def restore(self, aor: str, bindings: Sequence[Binding], now: float) -> bool:
        """Write ``bindings`` unless the backend holds ``aor`` already; True if written."""
        ...


@dataclass(frozen=True, slots=True)
class _Entry:
    bindings: tuple[Binding, ...]
    version: int  # the view's write counter when this entry was written


class CachedStore:
    """A :class:`LocationStore` (see the module docstring). ``await start()`` before use."""

    def __init__(
        self,
        backend: DurableStore,
        *,
        clock: Callable[[], float] = time.time,
        max_aors: int = MAX_AORS,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        if max_aors < 1:
            raise ValueError(f"max_aors must be at least 1, got {max_aors}")
        self.backend = backend
        self._clock = clock
        self._max_aors = max_aors
        self._check_interval = check_interval
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._writes = 0  # versions of entries
        self._drops = 0  # entries removed (unregistered, evicted, swept)
        self._epoch: str | None = None  # the backend's marker as this view last saw it
        self._down: str | None = None  # why, while the backend is unreachable
        self._down_since = 0.0
        self._swept = 0.0  # when memory was last swept
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.evicted = 0  # AORs dropped because memory was full

    def __repr__(self) -> str:
        return f"CachedStore({self.backend!r}, aors={len(self._entries)})"

    # --- state ------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """False while the backend is known to be unreachable."""
        return self._down is None

    @property
    def held(self) -> int:
        """AORs held in memory."""
        return len(self._entries)

    async def ping(self) -> None:
        """Ask the backend now; raise LocationError if it does not answer. Either way the
        watcher looks at once if the answer is news (down, or back)."""
        try:
            await self.backend.ping()
        except LocationError:
            self._wake.set()
            raise
        if self._down is not None:
            self._wake.set()

    # --- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """Fill memory from the backend, adopt (or set) its marker, and start watching.
        Raises LocationError."""
        now = self._clock()
        count = 0
        async for aor in self.backend.aors():
            bindings = await self.backend.load(aor, now)
            if bindings:
                self._keep(aor, bindings)
                count += len(bindings)
        self._epoch = await self.backend.ensure_marker()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        log.info(
            "location store: %d AOR(s) with %d binding(s) held in memory from %s",
            len(self._entries), count, self.backend.where,
        )  # fmt: skip

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._entries.clear()
        await self.backend.close()

    # --- LocationStore ----------------------------------------------------------------

    async def load(self, aor: str, now: float) -> list[Binding]:
        if self._down is None:
            seen = self._seen(aor)
            try:
                bindings = await self.backend.load(aor, now)
            except LocationError as exc:
                self._suspect(exc)
                if aor not in self._entries:
                    raise
            else:
                return await self._reconcile(aor, bindings, seen, now)
        entry = self._entries.get(aor)
        if entry is None:
            raise LocationError(
                f"{self.backend.where} is unreachable ({self._down}) and {aor} is not held "
                "in memory"
            )
        return [b for b in entry.bindings if b.is_live(now)]

    async def save(self, aor: str, bindings: Sequence[Binding], now: float) -> None:
        if self._down is not None:
            raise LocationError(f"{self.backend.where} is unreachable ({self._down})")
        try:
            await self.backend.save(aor, bindings, now)
        except LocationError as exc:
            self._suspect(exc)
            raise
        live = [b for b in bindings if b.is_live(now)]
        if live:
            self._keep(aor, live)
        else:
            self._drop(aor)

    async def aors(self) -> AsyncIterator[str]:
        if self._down is not None:
            raise LocationError(f"{self.backend.where} is unreachable ({self._down})")
        try:
            async for aor in self.backend.aors():
                yield aor
        except LocationError as exc:
            self._suspect(exc)
            raise

    # --- memory -----------------------------------------------------------------------

    def _keep(self, aor: str, bindings: Sequence[Binding]) -> None:
        self._writes += 1
        self._entries[aor] = _Entry(tuple(bindings), self._writes)
        self._entries.move_to_end(aor)
        while len(self._entries) > self._max_aors:
            self._entries.popitem(last=False)
            self._drops += 1
            self.evicted += 1
            if self.evicted == 1:  # then counted, and shown by /ready
                log.warning(
                    "location store: more than %d AOR(s): the least recently used are no "
                    "longer held in memory (calls to them need %s)",
                    self._max_aors, self.backend.where,
                )  # fmt: skip

    def _drop(self, aor: str) -> None:
        if self._entries.pop(aor, None) is not None:
            self._drops += 1

    def _seen(self, aor: str) -> tuple[int | None, int]:
        entry = self._entries.get(aor)
        return (None if entry is None else entry.version), self._drops

    async def _reconcile(
        self, aor: str, bindings: list[Binding], seen: tuple[int | None, int], now: float
    ) -> list[Binding]:
        """What the backend answered for ``aor``, checked against memory, kept in memory."""
        entry = self._entries.get(aor)
        held = [] if entry is None else [b for b in entry.bindings if b.is_live(now)]
        if held and not bindings:
            # Redis has nothing of what we hold: another process removed them, or Redis
            # lost its data. The marker tells which, before a REGISTER builds on nothing.
            try:
                lost = await self.backend.marker() != self._epoch
            except LocationError as exc:
                self._suspect(exc)
                return held
            if lost:
                self._wake.set()  # the watcher writes everything back; this call goes on
                return held
        # A save (or drop) that ran while we read wrote memory last and wins.
        if self._seen(aor) == seen:
            if bindings:
                self._keep(aor, bindings)
            else:
                self._drop(aor)
        return bindings

    def _sweep(self, now: float) -> None:
        for aor, entry in list(self._entries.items()):
            if not any(b.is_live(now) for b in entry.bindings):
                self._drop(aor)

    # --- watching the backend ---------------------------------------------------------

    def _suspect(self, exc: LocationError) -> None:
        """A command failed: let the watcher look now."""
        log.debug("location store: %s", exc)
        self._wake.set()

    async def _watch(self) -> None:
        while not self._closed:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives as the wait ends, and close() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._check()
            except Exception:  # a bug here must not end recovery for good
                log.exception("location store: checking %s failed", self.backend.where)

    async def _check(self) -> None:
        try:
            marker = await self.backend.marker()
            if marker != self._epoch:
                await self._recover()
        except LocationError as exc:
            if self._down is None:
                self._down, self._down_since = str(exc), self._clock()
                log.warning(
                    "location store lost: %s; REGISTER answers 503, calls reach the %d "
                    "AOR(s) held in memory",
                    exc, len(self._entries),
                )  # fmt: skip
            return
        if self._down is not None:
            log.info(
                "location store back: %s answers again after %.0f s",
                self.backend.where, self._clock() - self._down_since,
            )  # fmt: skip
            self._down = None
        now = self._clock()
        if now - self._swept >= SWEEP_INTERVAL:
            self._swept = now
            self._sweep(now)

    async def _recover(self) -> None:
        """Redis lost its data (or another process noticed first and set a new marker):
        write back every AOR held here, then adopt the marker. Raises LocationError.

        Only the watcher calls this, so there is one recovery at a time; loads meanwhile
        go on (a lost AOR is answered from memory, see ``_reconcile``)."""
        now = self._clock()
        aors = bindings = 0
        for aor, entry in list(self._entries.items()):
            if await self.backend.restore(aor, entry.bindings, now):
                aors += 1
                bindings += sum(1 for b in entry.bindings if b.is_live(now))
        # Set last: if Redis goes again meanwhile, the next check writes back once more.
        self._epoch = await self.backend.ensure_marker()
        log.warning(
            "location store: %s had lost its data; wrote back %d AOR(s) with %d binding(s) "
            "held in memory",
            self.backend.where, aors, bindings,
        )  # fmt: skip
