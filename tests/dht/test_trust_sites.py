"""Trust between running sites (built by ``proxy.site.build_site``, as ``p2psip run``
builds them, in this event loop): a scoped site cannot publish outside its scope, a key
removed from a trust folder stops counting within seconds, a key added starts counting
without a restart, and a key rotated with an endorsement keeps lookups working
throughout. Then SIGHUP on a real ``p2psip dht`` process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from dht_adaptor.errors import DhtError, DhtRejected
from dht_adaptor.keys import SiteKey, rotate, sign_binding
from dht_adaptor.record import DhtBinding, new_binding
from dht_adaptor.trust_folder import public_pem
from proxy.config import Config, HostPort
from proxy.site import Site, build_site
from tests.support.site import free_port

HOST = "127.0.0.1"
ALICE_A = "sip:alice@a.example.com"
BOB_B = "sip:bob@b.example.com"
WITHIN = 10.0  # seconds: the bound for a trust change to count everywhere


class Federation:
    """Sites on loopback, each with its data dir and its own trust folder."""

    def __init__(self, root: Path, stack: AsyncExitStack) -> None:
        self.root = root
        self.stack = stack
        self.sites: dict[str, Site] = {}

    def key(self, name: str) -> SiteKey:
        return SiteKey.load_or_create(self.root / name / "data")

    def folder(self, name: str) -> Path:
        folder = self.root / name / "trust"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def trust(self, name: str, other: str, scope: str | None = None) -> None:
        """Put ``other``'s key (and scope) into ``name``'s trust folder."""
        folder = self.folder(name)
        if scope is not None:
            (folder / f"{other}.scope").write_text(scope)
        (folder / f"{other}.pub").write_bytes(public_pem(self.key(other).public_bytes))

    async def start(self, name: str, join: str | None = None) -> Site:
        bootstrap = () if join is None else (HostPort(HOST, self.sites[join].node.address[1]),)
        config = Config(
            domains=("a.example.com", "b.example.com"), sip_listen=HostPort(HOST, 0),
            dht_listen=HostPort(HOST, 0), bootstrap=bootstrap, data_dir=self.root / name / "data",
            trust_dir=self.folder(name), site_id=name, admin_token="t", dht_rpc_timeout=1.0,
            dht_lookup_timeout=2.0,
        )  # fmt: skip
        site = await build_site(config, dht_retry_delays=(0.1,))
        self.sites[name] = site
        if bootstrap:
            await site.node.bootstrap([(HOST, bootstrap[0].port)])
        return site

    async def stop(self, name: str) -> None:
        await self.sites.pop(name).close()

    async def close(self) -> None:
        for name in list(self.sites):
            await self.stop(name)


@pytest.fixture
async def federation(tmp_path: Path) -> AsyncIterator[Federation]:
    async with AsyncExitStack() as stack:
        fed = Federation(tmp_path, stack)
        try:
            yield fed
        finally:
            await fed.close()


def binding(site: Site, aor: str, contact: str) -> DhtBinding:
    unsigned = new_binding(aor=aor, contact=contact, home=f"sip:{HOST}:{site.sip_port}",
                           site=site.config.site_id, version=time.time_ns(), now=time.time(),
                           expires=600)  # fmt: skip
    return sign_binding(unsigned, site.key)


async def contacts(site: Site, aor: str) -> set[str]:
    return {b.contact for b in await site.adaptor.lookup(aor)}


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = WITHIN, step: float = 0.2
) -> float:
    """Seconds until ``check()`` held (fails after ``within``)."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within} s"
        await asyncio.sleep(step)
    return time.monotonic() - started


async def test_a_site_scoped_to_a_cannot_publish_for_b(federation: Federation) -> None:
    fed = federation
    fed.trust("oslo", "paris", "a.example.com\n")  # oslo lets paris publish for a only
    fed.trust("paris", "oslo")
    paris = await fed.start("paris")
    oslo = await fed.start("oslo", join="paris")
    await paris.node.bootstrap([oslo.node.address])
    before = oslo.node.stats()
    # paris publishes for both domains (a rogue or misconfigured site: the attack itself).
    await paris.node.put(ALICE_A, [binding(paris, ALICE_A, "sip:alice@192.0.2.1")])
    with pytest.raises(DhtRejected):  # oslo refused it: only paris's own copy (1 of 2)
        await paris.node.put(BOB_B, [binding(paris, BOB_B, "sip:bob@192.0.2.2")])

    assert await contacts(oslo, ALICE_A) == {"sip:alice@192.0.2.1"}
    assert await contacts(oslo, BOB_B) == set()  # paris's own node still serves it: refused
    after = oslo.node.stats()
    assert after["rejected"] - before["rejected"] >= 1  # the store RPC, counted as forged
    assert after["rejected_on_get"] - before["rejected_on_get"] >= 1  # the answer, likewise
    assert after["accepted"] - before["accepted"] >= 1  # alice's binding was taken


async def test_a_removed_key_stops_counting_and_an_added_key_starts(
    federation: Federation,
) -> None:
    fed = federation
    for a, b in (("paris", "oslo"), ("oslo", "paris"), ("rome", "paris"), ("rome", "oslo")):
        fed.trust(a, b)
    paris = await fed.start("paris")
    oslo = await fed.start("oslo", join="paris")
    await paris.node.bootstrap([oslo.node.address])
    await paris.node.put(ALICE_A, [binding(paris, ALICE_A, "sip:alice@192.0.2.1")])
    assert await contacts(oslo, ALICE_A) == {"sip:alice@192.0.2.1"}

    # Rome is trusted by nobody yet: what it publishes does not count at oslo.
    rome = await fed.start("rome", join="oslo")
    with contextlib.suppress(DhtError):  # refused, or kept by rome's node alone
        await rome.node.put(BOB_B, [binding(rome, BOB_B, "sip:bob@192.0.2.3")])
    assert await contacts(oslo, BOB_B) == set()

    # Added to oslo's and paris's folders while they run: rome counts, no restart.
    fed.trust("oslo", "rome")
    fed.trust("paris", "rome")

    async def rome_counts() -> bool:
        await rome.node.bootstrap([oslo.node.address, paris.node.address])
        try:
            await rome.node.put(BOB_B, [binding(rome, BOB_B, "sip:bob@192.0.2.3")])
        except DhtError:  # not yet: the folders are polled every 2 s
            return False
        return await contacts(oslo, BOB_B) == {"sip:bob@192.0.2.3"}

    await eventually(rome_counts)

    # Removed from oslo's folder while running: paris's records are no longer used
    # there, though oslo's store and paris's node still hold them.
    (fed.folder("oslo") / "paris.pub").unlink()

    async def paris_gone() -> bool:
        return await contacts(oslo, ALICE_A) == set()

    assert await eventually(paris_gone) < WITHIN
    assert await contacts(paris, ALICE_A) == {"sip:alice@192.0.2.1"}  # paris still trusts itself
    assert await contacts(oslo, BOB_B) == {"sip:bob@192.0.2.3"}  # the others are unaffected


async def test_a_rotated_key_keeps_lookups_working_throughout(federation: Federation) -> None:
    fed = federation
    for name in ("paris", "oslo"):  # one folder per site, every site's key in each
        fed.trust(name, "paris")
        fed.trust(name, "oslo", "a.example.com\n")
    paris = await fed.start("paris")
    oslo = await fed.start("oslo", join="paris")
    await paris.node.bootstrap([oslo.node.address])
    await oslo.node.put(ALICE_A, [binding(oslo, ALICE_A, "sip:alice@192.0.2.1")])
    assert await contacts(paris, ALICE_A) == {"sip:alice@192.0.2.1"}
    old = oslo.key

    # 1. oslo's operator rotates: a new key in oslo's data dir, and an endorsement.
    rotation = rotate(fed.root / "oslo" / "data")
    assert rotation.old == old and oslo.key == old  # the running site keeps its key
    # 2. The endorsement goes into every trust folder; the new key counts, scoped as the
    # old one was, and the old one still counts.
    for name in ("paris", "oslo"):
        shutil.copy(rotation.endorsement_path, fed.folder(name))

    async def new_key_trusted() -> bool:
        return rotation.new.key_id in paris.node.trust and rotation.new.key_id in oslo.node.trust

    await eventually(new_key_trusted)
    assert paris.node.trust.allows(rotation.new.key_id, ALICE_A)
    assert not paris.node.trust.allows(rotation.new.key_id, BOB_B)

    # 3. oslo restarts on the new key; its old record is still found meanwhile.
    await fed.stop("oslo")
    assert await contacts(paris, ALICE_A) == {"sip:alice@192.0.2.1"}
    oslo = await fed.start("oslo", join="paris")
    assert oslo.key == rotation.new
    await oslo.node.put(ALICE_A, [binding(oslo, ALICE_A, "sip:alice@192.0.2.2")])
    both = {"sip:alice@192.0.2.1", "sip:alice@192.0.2.2"}  # by the old key and the new
    assert await contacts(paris, ALICE_A) == both
    assert await contacts(oslo, ALICE_A) == both

    # 4. Later the folders get the new site.pub instead of the old key and endorsement:
    # the old key's record stops counting, the new one stays.
    for name in ("paris", "oslo"):
        folder = fed.folder(name)
        (folder / "oslo.pub").write_bytes((fed.root / "oslo" / "data" / "site.pub").read_bytes())
        (folder / rotation.endorsement_path.name).unlink()

    async def only_new() -> bool:
        return await contacts(paris, ALICE_A) == {"sip:alice@192.0.2.2"}

    await eventually(only_new)
    assert paris.node.trust.allows(rotation.new.key_id, ALICE_A)
    assert old.key_id not in paris.node.trust


# -- SIGHUP on a real process ----------------------------------------------------------


def test_sighup_reloads_the_trust_folder(tmp_path: Path) -> None:
    folder = tmp_path / "trust"
    folder.mkdir()
    log = tmp_path / "dht.log"
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    env["PYTHONPATH"] = str(root)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "dht", "--listen", f"{HOST}:{free_port()}",
             "--data-dir", str(tmp_path / "data"), "--trust", str(folder)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            _wait_for(log, "watching the trust folder")
            oslo = SiteKey.generate()
            (folder / "oslo.pub").write_bytes(public_pem(oslo.public_bytes))
            proc.send_signal(signal.SIGHUP)
            line = _wait_for(log, "reloaded (SIGHUP)")
            assert f"added {oslo.key_id} (oslo.pub; any AOR)" in line
            (folder / "bad.pub").write_text("junk")
            proc.send_signal(signal.SIGHUP)
            line = _wait_for(log, "not reloaded (SIGHUP)")
            assert "bad.pub" in line and "still trusting the 2 key(s)" in line
            assert proc.poll() is None  # SIGHUP does not stop it
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    assert "Traceback" not in log.read_text()


def _wait_for(log: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} in the log:\n{log.read_text()}")
