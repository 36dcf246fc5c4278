"""The DHT with several worker processes (``--workers N``): worker 0 runs the site's one
DHT node and adaptor, the others reach them over the worker links (:mod:`proxy.siblings`).

Why one node and not one per worker: the overlay then sees one node per site, as with one
process (no extra DHT ports, and no k closest nodes that are all one site's workers
sharing one Redis); and one adaptor owns what the site has published, so a contact
registered through one worker and removed through another is tombstoned, and a
republish never brings back what another worker removed.

* :class:`RemoteAdaptor` stands in for the adaptor in workers 1..N-1: ``prepare`` checks
  that the record will fit (with signatures of the right size; worker 0 signs),
  ``publish`` tells worker 0 which AOR changed, ``locate`` asks worker 0 to look up.
* :class:`ChangePublisher` runs in worker 0: it reads each AOR another worker changed
  from the shared store and publishes it, as its own registrar does; it also notes the
  bindings in its directory, so that worker 0's NAT keep-alives reach every phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence

from dht_adaptor.adaptor import DhtAdaptor, TooManyBindings, check_fits
from dht_adaptor.record import (
    MAX_RECORD_BYTES,
    DhtBinding,
    RecordError,
    decode_record,
    encode_record,
)

from .directory import LocalDirectory
from .location import Binding, Located, LocationError, LocationStore, LocationUnavailable
from .siblings import QUIET, LinkError, LookupFailed, Siblings
from .siblings import Located as Answer

log = logging.getLogger(__name__)

SIGNATURE_BYTES = 64  # Ed25519
ANSWER_BYTES = 1 << 18  # a lookup's bindings from every site, as one record
RETRY_DELAY = 1.0  # seconds before worker 0 reads an AOR again after the store failed
SWEEP_INTERVAL = 60.0  # seconds between sweeps of AORs whose bindings all expired


class RemoteAdaptor:
    """The DHT adaptor of workers 1..N-1: a publisher and locator through worker 0."""

    def __init__(
        self,
        siblings: Siblings,
        key_id: str,
        *,
        site_id: str,
        home: str,
        clock: Callable[[], float] = time.time,
        lookup_timeout: float = 3.0,
        max_bytes: int = MAX_RECORD_BYTES,
    ) -> None:
        self._siblings = siblings
        self.key_id = key_id
        self.site_id = site_id
        self.home = home
        self.clock = clock
        self.lookup_timeout = lookup_timeout
        self.max_bytes = max_bytes

    def prepare(self, aor: str, bindings: Sequence[Binding], *, force: bool = False) -> str:
        """Raise TooManyBindings if the record would not fit (as worker 0 would sign it,
        bar the tombstones it may add); returns the AOR to publish."""
        now = self.clock()
        version = time.time_ns()
        signature = bytes(SIGNATURE_BYTES)
        sample = [
            DhtBinding(aor, b.contact, self.home, b.expires_at, self.site_id, version,
                       self.key_id, b.q, b.instance, b.reg_id, signature=signature)
            for b in bindings
            if b.is_live(now)
        ]  # fmt: skip
        check_fits(aor, sample, self.max_bytes)
        return aor

    def publish(self, aor: str) -> None:
        self._siblings.changed(aor)

    async def locate(self, aor: str) -> Located[DhtBinding]:
        """Worker 0's lookup; raises LocationUnavailable (503)."""
        try:
            answer = await self._siblings.locate(aor, self.lookup_timeout + 1.0)
            bindings = decode_record(answer.record, max_bytes=ANSWER_BYTES)
        except (LinkError, LookupFailed, RecordError) as exc:
            raise LocationUnavailable(f"DHT lookup of {aor} failed: {exc}") from exc
        return Located(bindings, answer.known)


async def serve_locate(adaptor: DhtAdaptor, aor: str) -> Answer:
    """Worker 0: a lookup for another worker, its live bindings as one record."""
    found = await adaptor.locate(aor)
    return Answer(found.known, encode_record(found.bindings, max_bytes=ANSWER_BYTES))


class ChangePublisher:
    """Worker 0: publishes the AORs other workers changed (see the module docstring)."""

    def __init__(
        self,
        store: LocationStore,
        directory: LocalDirectory,
        adaptor: DhtAdaptor,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._directory = directory
        self._adaptor = adaptor
        self._clock = clock
        self._pending: dict[str, None] = {}  # AORs to read, oldest first, each once
        self._noted: dict[str, tuple[Binding, ...]] = {}  # what this noted last, per AOR
        self._wake = asyncio.Event()
        self.published = 0

    def changed(self, aor: str) -> None:
        self._pending[aor] = None
        self._wake.set()

    @property
    def backlog(self) -> int:
        return len(self._pending)

    async def run(self) -> None:
        QUIET.set(True)  # this task's notes are other workers' registrations
        swept = self._clock()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SWEEP_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()
            if self._clock() - swept >= SWEEP_INTERVAL:
                swept = self._clock()
                self._sweep(swept)
            while self._pending:
                aor = next(iter(self._pending))
                del self._pending[aor]
                try:
                    bindings = await self._store.load(aor, self._clock())
                except LocationError as exc:
                    log.warning("cannot read %s to publish it: %s", aor, exc)
                    self._pending[aor] = None
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                self._publish(aor, bindings)

    def _sweep(self, now: float) -> None:
        for aor, noted in list(self._noted.items()):
            if not any(b.is_live(now) for b in noted):
                del self._noted[aor]

    def _publish(self, aor: str, bindings: Sequence[Binding]) -> None:
        self._directory.note(aor, self._noted.get(aor, ()), bindings)
        if bindings:
            self._noted[aor] = tuple(bindings)
        else:
            self._noted.pop(aor, None)
        try:
            self._adaptor.publish(self._adaptor.prepare(aor, bindings))
        except TooManyBindings as exc:  # the worker that took the REGISTER checked it
            log.error("cannot publish %s", exc)
            return
        self.published += 1
