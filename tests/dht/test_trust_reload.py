"""TrustStore at run time: scopes enforced wherever bindings are verified, the folder
reloaded in place (add, remove, replace, a bad file), caches that stop vouching for a
removed key, records of removed keys no longer served, the watcher."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

import pytest

import dht_adaptor.keys as keys_module
from dht_adaptor.keys import Scope, SiteKey, TrustChange, TrustStore, endorse, sign_binding
from dht_adaptor.record import DhtBinding, dht_key, encode_record, new_binding
from dht_adaptor.record_store import MemoryRecordStore, RecordStore, RedisRecordStore
from dht_adaptor.trust_folder import public_pem
from tests.support.redis_server import RedisServer

A = "sip:alice@a.example.com"
B = "sip:bob@b.example.com"


def binding(key: SiteKey, aor: str = A, contact: str = "sip:alice@192.0.2.1") -> DhtBinding:
    unsigned = new_binding(aor=aor, contact=contact, home="sip:192.0.2.9", site="s",
                           version=1, now=time.time(), expires=3600)  # fmt: skip
    return sign_binding(unsigned, key)


def put_key(folder: Path, name: str, key: SiteKey, scope: str | None = None) -> None:
    folder.mkdir(exist_ok=True)
    if scope is not None:
        (folder / f"{name}.scope").write_text(scope)
    (folder / f"{name}.pub").write_bytes(public_pem(key.public_bytes))


@pytest.fixture
def keys() -> tuple[SiteKey, SiteKey, SiteKey]:
    return SiteKey.generate(), SiteKey.generate(), SiteKey.generate()


# -- scopes ----------------------------------------------------------------------------


def test_out_of_scope_is_refused_like_a_forgery(keys: tuple[SiteKey, ...]) -> None:
    paris, oslo, _ = keys
    trust = TrustStore(
        {paris.key_id: paris.public_bytes, oslo.key_id: oslo.public_bytes},
        scopes={oslo.key_id: Scope.parse(["a.example.com"])},
    )
    assert trust.verify(binding(oslo, A)) and not trust.verify(binding(oslo, B))
    assert trust.verify(binding(paris, A)) and trust.verify(binding(paris, B))  # no scope
    assert trust.allows(oslo.key_id, A) and not trust.allows(oslo.key_id, B)
    assert not trust.allows("0" * 16, A) and not trust.allows(["x"], A)  # type: ignore[arg-type]
    # Scope-free lookups for signatures over other things (relays, DHT messages).
    assert trust.public_bytes(oslo.key_id) == oslo.public_bytes
    assert trust.verify_signature(oslo.key_id, b"m", oslo.sign(b"m"))
    good, rejected = trust.filter([binding(oslo, A), binding(oslo, B), binding(paris, B)])
    assert len(good) == 2 and rejected == 1


async def test_store_counts_out_of_scope_bindings_as_rejected(
    keys: tuple[SiteKey, ...],
) -> None:
    paris, oslo, _ = keys
    trust = TrustStore(
        {paris.key_id: paris.public_bytes, oslo.key_id: oslo.public_bytes},
        scopes={oslo.key_id: Scope.parse(["a.example.com"])},
    )
    store = MemoryRecordStore(trust)
    result = await store.merge_in(dht_key(B), encode_record([binding(oslo, B)]), time.time())
    assert (result.accepted, result.rejected, store.rejected) == (0, 1, 1)
    assert await store.get(dht_key(B), time.time()) == ()


# -- reloading -------------------------------------------------------------------------


def test_reload_adds_removes_and_replaces(tmp_path: Path, keys: tuple[SiteKey, ...]) -> None:
    paris, oslo, rome = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    assert set(trust) == {paris.key_id, oslo.key_id} and trust.get(paris.key_id).own  # type: ignore[union-attr]
    by_rome = binding(rome)
    assert not trust.verify(by_rome)

    put_key(folder, "rome", rome, "a.example.com\n")
    assert trust.reload() == TrustChange(added=(rome.key_id,))
    assert trust.verify(by_rome) and not trust.verify(binding(rome, B))

    (folder / "rome.scope").write_text("b.example.com\n")
    assert trust.reload() == TrustChange(rescoped=(rome.key_id,))
    assert not trust.verify(by_rome) and trust.verify(binding(rome, B))

    put_key(folder, "oslo", rome)  # oslo.pub now holds rome's key: oslo is replaced
    (folder / "rome.pub").unlink()
    (folder / "rome.scope").unlink()
    assert trust.reload() == TrustChange(removed=(oslo.key_id,), rescoped=(rome.key_id,))
    assert trust.verify(by_rome) and not trust.verify(binding(oslo))

    (folder / "oslo.pub").unlink()
    assert trust.reload() == TrustChange(removed=(rome.key_id,))
    assert not trust.verify(by_rome)
    assert list(trust) == [paris.key_id] and trust.reload() == TrustChange()


def test_a_bad_file_keeps_the_previous_trust(
    tmp_path: Path, keys: tuple[SiteKey, ...], caplog: pytest.LogCaptureFixture
) -> None:
    paris, oslo, rome = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    (folder / "oslo.pub").unlink()  # a change that must not half-happen
    put_key(folder, "rome", rome)
    (folder / "broken.pub").write_text("-----BEGIN PUBLIC KEY-----\ngarbage\n")
    with caplog.at_level(logging.INFO, logger="dht_adaptor.keys"):
        assert trust.reload("SIGHUP") is None
    assert set(trust) == {paris.key_id, oslo.key_id}
    assert trust.error is not None and "broken.pub" in trust.error
    (line,) = [r for r in caplog.records if r.name == "dht_adaptor.keys"]
    assert line.levelno == logging.ERROR and line.exc_info is None
    message = line.getMessage()
    assert "not reloaded (SIGHUP)" in message and "broken.pub" in message
    assert "\n" not in message and "Traceback" not in caplog.text

    (folder / "broken.pub").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dht_adaptor.keys"):
        change = trust.reload("SIGHUP")
    assert change == TrustChange(added=(rome.key_id,), removed=(oslo.key_id,))
    assert trust.error is None
    (line,) = [r.getMessage() for r in caplog.records]
    assert f"added {rome.key_id} (rome.pub; any AOR)" in line
    assert f"removed {oslo.key_id}" in line and "2 key(s) trusted" in line


def test_the_folder_going_away_keeps_the_previous_trust(
    tmp_path: Path, keys: tuple[SiteKey, ...]
) -> None:
    paris, oslo, _ = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    (folder / "oslo.pub").unlink()
    folder.rmdir()
    assert trust.reload() is None and oslo.key_id in trust


def test_without_a_folder_there_is_nothing_to_reload(keys: tuple[SiteKey, ...]) -> None:
    trust = TrustStore.from_dir(None, keys[0])
    assert trust.reload() is None and trust.folder is None and len(trust) == 1


def test_the_own_key_stays_whatever_the_folder_says(
    tmp_path: Path, keys: tuple[SiteKey, ...]
) -> None:
    paris, _, _ = keys
    folder = tmp_path / "trust"
    put_key(folder, "paris", paris, "a.example.com\n")
    trust = TrustStore.from_dir(folder, paris)
    assert not trust.verify(binding(paris, B))  # scoped like everyone else
    (folder / "paris.pub").unlink()
    (folder / "paris.scope").unlink()
    assert trust.reload() == TrustChange(rescoped=(paris.key_id,))
    assert paris.key_id in trust and trust.verify(binding(paris, B))


def test_replace_swaps_the_table_and_keeps_the_own_key(keys: tuple[SiteKey, ...]) -> None:
    paris, oslo, rome = keys
    trust = TrustStore.from_dir(None, paris)
    shared = [trust]  # what the node, the stores and the relays hold
    (oslo_entry,) = TrustStore({oslo.key_id: oslo.public_bytes}).entries()
    assert trust.replace([oslo_entry]) == TrustChange(added=(oslo.key_id,))
    assert shared[0] is trust and set(trust) == {paris.key_id, oslo.key_id}
    assert trust.replace([]) == TrustChange(removed=(oslo.key_id,))
    assert list(trust) == [paris.key_id] and rome.key_id not in trust


def test_listeners_hear_every_change(
    tmp_path: Path, keys: tuple[SiteKey, ...], caplog: pytest.LogCaptureFixture
) -> None:
    paris, oslo, _ = keys
    folder = tmp_path / "trust"
    folder.mkdir()
    trust = TrustStore.from_dir(folder, paris)
    heard: list[TrustChange] = []
    trust.on_change(heard.append)
    trust.on_change(lambda change: 1 / 0)  # a failing listener changes nothing
    put_key(folder, "oslo", oslo)
    with caplog.at_level(logging.ERROR):
        trust.reload()
    trust.reload()  # no change: nobody is called
    (folder / "oslo.pub").unlink()
    trust.reload()
    assert heard == [TrustChange(added=(oslo.key_id,)), TrustChange(removed=(oslo.key_id,))]
    assert "listener of trust changes failed" in caplog.text


# -- rotation --------------------------------------------------------------------------


def test_an_endorsed_key_is_trusted_with_the_old_scope(
    tmp_path: Path, keys: tuple[SiteKey, ...]
) -> None:
    paris, oslo, _ = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo, "a.example.com\n")
    trust = TrustStore.from_dir(folder, paris)
    new = SiteKey.generate()
    (folder / "rotation.endorsement").write_bytes(endorse(oslo, new.public_bytes).encode())
    assert trust.reload() == TrustChange(added=(new.key_id,))
    assert trust.verify(binding(new, A)) and not trust.verify(binding(new, B))
    assert trust.verify(binding(oslo, A))  # no gap: the old key still counts
    assert trust.get(new.key_id).endorsed_by == oslo.key_id  # type: ignore[union-attr]
    # Removing the old key removes what it endorsed.
    (folder / "oslo.pub").unlink()
    assert trust.reload() == TrustChange(removed=tuple(sorted((oslo.key_id, new.key_id))))


# -- caches ----------------------------------------------------------------------------


def test_caches_stop_vouching_for_a_removed_key(tmp_path: Path, keys: tuple[SiteKey, ...]) -> None:
    paris, oslo, _ = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    signed_here = binding(oslo)  # in the signed-here shortcut
    from_the_wire = DhtBinding(**{f.name: getattr(signed_here, f.name)
                                  for f in dataclasses.fields(DhtBinding)})  # fmt: skip
    other = binding(oslo, A, "sip:other@192.0.2.2")
    keys_module._SIGNED_HERE.pop(other)  # as if another process signed it
    assert trust.verify(other) and other in trust._verified  # now cached as verified
    assert trust.verify(signed_here) and trust.verify(from_the_wire)
    (folder / "oslo.pub").unlink()
    trust.reload()
    assert not trust.verify(other)  # the verified cache
    assert not trust.verify(signed_here) and not trust.verify(from_the_wire)  # the shortcut
    (folder / "oslo.scope").write_text("b.example.com\n")
    put_key(folder, "oslo", oslo)
    trust.reload()
    assert not trust.verify(other)  # back, but with a scope that excludes it


def test_a_cache_hit_needs_the_key_it_was_verified_with(keys: tuple[SiteKey, ...]) -> None:
    paris, oslo, _ = keys
    trust = TrustStore({oslo.key_id: oslo.public_bytes})
    tampered = dataclasses.replace(binding(oslo), version=99)  # its signature is now wrong
    assert not trust.verify(tampered)
    # Remembered as verified under another public key with the same id (a key id is 64
    # bits of a hash): that verdict is not this key's, so the signature is checked.
    trust._verified[tampered] = paris.public_bytes
    assert not trust.verify(tampered)
    trust._verified[tampered] = oslo.public_bytes  # (what a hit under this key looks like)
    assert trust.verify(tampered)


# -- records held by a node ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_stored_records_of_a_removed_key_are_not_served(
    tmp_path: Path, keys: tuple[SiteKey, ...], kind: str, request: pytest.FixtureRequest
) -> None:
    paris, oslo, _ = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    store: RecordStore
    if kind == "memory":
        store = MemoryRecordStore(trust)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisRecordStore(server.url, trust, prefix=f"trust:{tmp_path.name}:")
    now = time.time()
    mine, theirs = binding(paris), binding(oslo, A, "sip:alice@192.0.2.7")
    try:
        assert (await store.merge_in(dht_key(A), encode_record([mine, theirs]), now)).ok
        assert set(await store.get(dht_key(A), now)) == {mine, theirs}
        (folder / "oslo.pub").unlink()
        trust.reload()
        assert await store.get(dht_key(A), now) == (mine,)
        assert [b async for _, bs in store.items(now) for b in bs] == [mine]  # not republished
        put_key(folder, "oslo", oslo)  # the bytes stayed (until they expire): back at once
        trust.reload()
        assert set(await store.get(dht_key(A), now)) == {mine, theirs}
    finally:
        await store.close()


# -- the watcher -----------------------------------------------------------------------


async def test_the_watcher_reloads_on_change(
    tmp_path: Path, keys: tuple[SiteKey, ...], caplog: pytest.LogCaptureFixture
) -> None:
    paris, oslo, rome = keys
    folder = tmp_path / "trust"
    put_key(folder, "oslo", oslo)
    trust = TrustStore.from_dir(folder, paris)
    trust.start_watching(0.05)
    trust.start_watching(0.05)  # once is enough
    try:
        put_key(folder, "rome", rome)
        await _until(lambda: rome.key_id in trust)
        (folder / "oslo.pub").unlink()
        await _until(lambda: oslo.key_id not in trust)
        with caplog.at_level(logging.INFO, logger="dht_adaptor.keys"):
            (folder / "bad.pub").write_text("junk")
            await _until(lambda: trust.error is not None)
            await asyncio.sleep(0.3)  # several polls: the bad file is reported once
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "bad.pub" in errors[0].getMessage()
        assert set(trust) == {paris.key_id, rome.key_id}
    finally:
        await trust.stop_watching()
        await trust.stop_watching()


async def _until(condition: object, timeout: float = 5.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)
