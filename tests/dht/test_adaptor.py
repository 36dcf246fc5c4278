"""The DHT adaptor: REGISTER → signed put, with refresh, tombstones, retries and limits.

The overlay here is an in-memory one that merges like a storing node does (the real
overlay has its own tests in test_overlay.py); time is a manual clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from dht_adaptor.adaptor import DhtAdaptor, TooManyBindings
from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.node import DhtUnavailable
from dht_adaptor.record import DhtBinding, encode_record, live, merge
from proxy.sip.binding import Binding

AOR = "sip:alice@example.com"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemoryOverlay:
    """put/get on one dict, merging per binding as storing nodes do."""

    def __init__(self, trust: TrustStore, clock: Clock) -> None:
        self.trust = trust
        self.clock = clock
        self.records: dict[str, tuple[DhtBinding, ...]] = {}
        self.puts: list[tuple[str, tuple[DhtBinding, ...]]] = []
        self.failures = 0  # fail this many puts first
        self.crashes = 0  # then raise this many unexpected errors

    async def put(self, aor: str, bindings: Sequence[DhtBinding]) -> int:
        if self.failures:
            self.failures -= 1
            raise DhtUnavailable("no node answered")
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("a bug somewhere below")
        encode_record(bindings)  # what goes on the wire must encode
        verified, rejected = self.trust.filter(bindings)
        assert rejected == 0
        self.puts.append((aor, tuple(bindings)))
        self.records[aor] = merge(self.records.get(aor, ()), verified, now=self.clock())
        return 1

    async def get(self, aor: str, *, tombstones: bool = False) -> tuple[DhtBinding, ...]:
        found = self.records.get(aor, ())
        return found if tombstones else live(found, self.clock())


def binding(contact: str, expires_at: float, **kw: object) -> Binding:
    return Binding(aor=AOR, contact=contact, expires_at=expires_at, **kw)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key() -> SiteKey:
    return SiteKey.generate()


@pytest.fixture
def overlay(key: SiteKey, clock: Clock) -> MemoryOverlay:
    return MemoryOverlay(TrustStore.from_dir(None, key), clock)


def make_adaptor(overlay: MemoryOverlay, key: SiteKey, clock: Clock, **kw: object) -> DhtAdaptor:
    kw.setdefault("republish_interval", 10_000)
    return DhtAdaptor(
        overlay, key, site_id="site-a", home="sip:192.0.2.1:5060", clock=clock,
        retry_delays=(0.01,), **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_register_is_put_signed_with_home_and_expiry(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:alice@10.0.0.5:5060", clock.now + 3600)]))
    assert await adaptor.flush()
    found = await adaptor.lookup(AOR)
    assert [(b.contact, b.home, b.site, b.expires_at) for b in found] == [
        ("sip:alice@10.0.0.5:5060", "sip:192.0.2.1:5060", "site-a", clock.now + 3600)
    ]
    assert found[0].key_id == key.key_id and found[0].signature
    await adaptor.close()


async def test_refresh_that_changes_nothing_waits_for_half_the_lifetime(
    overlay, key, clock
) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    start = clock.now
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", start + 3600)]))
    assert await adaptor.flush()
    clock.now = start + 1000  # a phone refreshing early: nothing new for the overlay
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert await adaptor.flush()
    assert len(overlay.puts) == 1
    clock.now = start + 1800  # half of the 3600 s written are spent: write again
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert await adaptor.flush()
    assert len(overlay.puts) == 2
    assert overlay.puts[-1][1][0].expires_at == start + 1800 + 3600
    await adaptor.close()


async def test_changed_binding_is_written_at_once(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert await adaptor.flush()
    clock.now += 10
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600, q=0.5)]))
    assert await adaptor.flush()
    assert len(overlay.puts) == 2
    assert [b.q for b in await adaptor.lookup(AOR)] == [0.5]
    await adaptor.close()


async def test_unregister_writes_a_tombstone_for_exactly_that_contact(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    desk, mobile = (
        binding("sip:desk@h", clock.now + 3600),
        binding("sip:mobile@h", clock.now + 3600),
    )
    adaptor.publish(adaptor.prepare(AOR, [desk, mobile]))
    assert await adaptor.flush()
    clock.now += 5
    adaptor.publish(adaptor.prepare(AOR, [mobile]))  # desk unregistered
    assert await adaptor.flush()
    assert [b.contact for b in await adaptor.lookup(AOR)] == ["sip:mobile@h"]
    tombstones = [b for b in overlay.records[AOR] if b.tombstone]
    assert [b.contact for b in tombstones] == ["sip:desk@h"]
    # The tombstone outlives the binding it hides, then lapses on its own.
    assert tombstones[0].expires_at > desk.expires_at
    await adaptor.close()


async def test_failed_put_is_retried_not_lost(overlay, key, clock) -> None:
    overlay.failures = 3
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert adaptor.backlog == 1
    assert await adaptor.flush(timeout=5)
    assert adaptor.stats.puts_failed == 3
    assert adaptor.stats.puts_ok == 1
    assert [b.contact for b in await adaptor.lookup(AOR)] == ["sip:a@h"]
    await adaptor.close()


async def test_too_many_bindings_refused_before_anything_is_written(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock, max_bytes=1500)
    many = [binding(f"sip:phone{i}@10.0.0.{i}:5060", clock.now + 3600) for i in range(20)]
    with pytest.raises(TooManyBindings):
        adaptor.prepare(AOR, many)
    assert adaptor.backlog == 0 and overlay.puts == []


async def test_versions_increase_so_later_writes_win(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    first = adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 60)])
    second = adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 60, q=0.1)])
    assert second.bindings[0].version > first.bindings[0].version
    merged = merge(second.bindings, first.bindings, now=clock.now)
    assert [b.q for b in merged] == [0.1]


async def test_republish_rewrites_what_the_site_holds(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock, republish_interval=5)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert await adaptor.flush()
    overlay.records.clear()  # every node holding it died
    for _ in range(100):
        clock.now += 1
        await asyncio.sleep(0.02)
        if overlay.records:
            break
    assert [b.contact for b in await adaptor.lookup(AOR)] == ["sip:a@h"]
    await adaptor.close()


async def test_expired_bindings_are_not_returned(overlay, key, clock) -> None:
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 60)]))
    assert await adaptor.flush()
    clock.now += 61
    assert await adaptor.lookup(AOR) == ()
    await adaptor.close()


async def test_an_unexpected_error_does_not_stop_the_writer(overlay, key, clock) -> None:
    overlay.crashes = 1
    adaptor = make_adaptor(overlay, key, clock)
    adaptor.start()
    adaptor.publish(adaptor.prepare(AOR, [binding("sip:a@h", clock.now + 3600)]))
    assert await adaptor.flush(timeout=5)
    adaptor.publish(adaptor.prepare("sip:bob@example.com", [
        Binding(aor="sip:bob@example.com", contact="sip:b@h", expires_at=clock.now + 60)
    ]))  # fmt: skip
    assert await adaptor.flush(timeout=5)
    assert adaptor.stats.puts_failed == 1 and adaptor.stats.puts_ok == 2
    await adaptor.close()
