"""``p2psip dht`` and ``p2psip run`` as real processes: REGISTER → DHT, lookup, restarts,
and ``dht``/``lookup``/``ping`` proving their membership with the site key in --data-dir."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import umsgpack

from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.membership import Member, open_datagram
from tests.support.site import ROOT, Site, free_port

pytestmark = pytest.mark.e2e

DOMAIN = "example.com"


def p2psip(
    *args: str, timeout: float = 30, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}, **(env or {})}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


def register(site: Site, user: str, contact_port: int, expires: int = 600) -> str:
    """One REGISTER over UDP; returns the status line."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        msg = (
            f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport\r\n"
            f"From: <sip:{user}@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}\r\n"
            f"To: <sip:{user}@{DOMAIN}>\r\nCall-ID: {uuid.uuid4().hex}\r\nCSeq: 1 REGISTER\r\n"
            f"Contact: <sip:{user}@127.0.0.1:{contact_port}>\r\nExpires: {expires}\r\n"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        s.settimeout(5)
        s.sendto(msg, (site.host, site.port))
        return s.recv(65535).decode().split("\r\n", 1)[0]


def lookup(aor: str, node: str, data_dir: Path) -> dict[str, object] | None:
    proc = p2psip("lookup", aor, "--bootstrap", node, "--data-dir", str(data_dir))
    if proc.returncode == 1:
        return None
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_lookup(aor: str, node: str, data_dir: Path, timeout: float = 10) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = lookup(aor, node, data_dir)
        if found is not None:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{aor} not found through {node}")


class DhtProcess:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.args = ["dht", "--listen", f"127.0.0.1:{self.port}", *args]
        self.data_dir = args[args.index("--data-dir") + 1]  # its key: it answers its own pings
        self.log = workdir / f"dht-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> DhtProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
        env["PYTHONPATH"] = str(ROOT)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", *self.args],
                stdout=log, stderr=log, env=env, cwd=ROOT,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            # (Exit 2 until the node has made its key.)
            ping = p2psip("ping", self.address, "--data-dir", self.data_dir, "--timeout", "0.3")
            if ping.returncode == 0:
                return self
        raise AssertionError(f"dht node did not answer:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        return None if self.proc is None else self.proc.returncode


@pytest.fixture
def dht_nodes(tmp_path: Path):
    nodes: list[DhtProcess] = []

    def make(*args: str) -> DhtProcess:
        node = DhtProcess(tmp_path, *args)
        nodes.append(node)
        return node.start()

    yield make
    for node in nodes:
        node.stop(signal.SIGKILL)


def test_keygen_writes_a_key_pair_and_keeps_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = p2psip("keygen", "--data-dir", str(data))
    assert first.returncode == 0, first.stderr
    assert (data / "site.key").stat().st_mode & 0o777 == 0o600
    assert (data / "site.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    key = (data / "site.key").read_bytes()
    again = p2psip("keygen", "--data-dir", str(data))
    assert again.returncode == 2 and "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert (data / "site.key").read_bytes() == key  # never overwritten by accident
    forced = p2psip("keygen", "--data-dir", str(data), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (data / "site.key").read_bytes() != key


def test_register_is_found_from_a_standalone_node(tmp_path: Path, dht_nodes) -> None:
    data = tmp_path / "site"
    node = dht_nodes("--data-dir", str(data))
    site = Site(tmp_path, args=["--domain", DOMAIN, "--data-dir", str(data),
                                "--bootstrap", node.address]).start()  # fmt: skip
    try:
        assert register(site, "alice", 5999).startswith("SIP/2.0 200")
        found = wait_lookup(f"sip:alice@{DOMAIN}", node.address, data)
        assert found["aor"] == f"sip:alice@{DOMAIN}"
        [binding] = found["bindings"]  # type: ignore[misc]
        assert binding["contact"] == "sip:alice@127.0.0.1:5999"
        assert binding["home"] == f"sip:127.0.0.1:{site.port}"
        assert binding["site"] == "site"
        assert 590 <= binding["expires_in"] <= 600
        # Unregistering removes it from the DHT too (a tombstone).
        assert register(site, "alice", 5999, expires=0).startswith("SIP/2.0 200")
        deadline = time.monotonic() + 10
        while lookup(f"sip:alice@{DOMAIN}", node.address, data) is not None:
            assert time.monotonic() < deadline, "the unregistered binding is still found"
            time.sleep(0.2)
    finally:
        site.stop()


def test_lookup_of_unknown_user_exits_1_and_bad_aor_exits_2(tmp_path: Path, dht_nodes) -> None:
    data = tmp_path / "site"
    node = dht_nodes("--data-dir", str(data))
    missing = p2psip("lookup", f"sip:nobody@{DOMAIN}", "--bootstrap", node.address,
                     "--data-dir", str(data))  # fmt: skip
    assert missing.returncode == 1 and missing.stdout == ""
    bad = p2psip("lookup", "sip:@@", "--bootstrap", node.address, "--data-dir", str(data))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "Traceback" not in bad.stderr
    dead = p2psip("lookup", f"sip:x@{DOMAIN}", "--bootstrap", f"127.0.0.1:{free_port()}",
                  "--data-dir", str(data), "--timeout", "2")  # fmt: skip
    assert dead.returncode == 1 and "Traceback" not in dead.stderr


def test_dht_node_with_redis_survives_sigkill(tmp_path: Path, dht_nodes, redis_server) -> None:
    data = tmp_path / "site"
    node = dht_nodes("--data-dir", str(data), "--redis-url", redis_server.url)
    site = Site(tmp_path, args=["--domain", DOMAIN, "--data-dir", str(data),
                                "--bootstrap", node.address]).start()  # fmt: skip
    try:
        for user in ("alice", "bob", "carol"):
            assert register(site, user, 5000).startswith("SIP/2.0 200")
        for user in ("alice", "bob", "carol"):
            wait_lookup(f"sip:{user}@{DOMAIN}", node.address, data)
    finally:
        site.stop()  # only the standalone node holds the records now
    node.stop(signal.SIGKILL)
    node.start()  # same port, same Redis
    for user in ("alice", "bob", "carol"):
        found = lookup(f"sip:{user}@{DOMAIN}", node.address, data)
        assert found is not None, f"{user} lost in the restart"
        assert [b["contact"] for b in found["bindings"]] == [f"sip:{user}@127.0.0.1:5000"]  # type: ignore[index]


def keygen(data: Path) -> str:
    """A new site key in ``data``; its key id."""
    made = p2psip("keygen", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    return made.stdout.strip().rsplit(" ", 1)[-1].rstrip(")")


def wait_in_log(node: DhtProcess, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := node.log.read_text()):
        assert time.monotonic() < deadline, f"{needle!r} not in the log:\n{text}"
        time.sleep(0.1)
    return text


def test_ping_proves_membership_with_the_site_key(tmp_path: Path, dht_nodes) -> None:
    data = tmp_path / "site"
    node = dht_nodes("--data-dir", str(data))
    assert p2psip("ping", node.address, "--data-dir", str(data)).returncode == 0
    # The compose healthcheck gives no flag: the data dir comes from P2PSIP_DATA_DIR.
    by_env = p2psip("ping", node.address, env={"P2PSIP_DATA_DIR": str(data)})
    assert by_env.returncode == 0 and "answered" in by_env.stdout, by_env.stderr
    # A key the node does not trust: no answer at all, exit 1, and the node says why.
    stranger = keygen(tmp_path / "stranger")
    refused = p2psip("ping", node.address, "--data-dir", str(tmp_path / "stranger"),
                     "--timeout", "0.5")  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"no DHT node answered at {node.address}" in refused.stderr
    wait_in_log(node, f"refused 1 DHT datagram(s) (last: untrusted key {stranger} from 127.0.0.1:")
    # No key at all: one line, exit 2.
    (tmp_path / "empty").mkdir()
    missing = p2psip("ping", node.address, "--data-dir", str(tmp_path / "empty"))
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr.strip().splitlines() == [
        f"p2psip: error: no site key in {tmp_path / 'empty'}: p2psip ping proves membership of "
        "the overlay with it (give --data-dir of a site whose key the overlay trusts)"
    ]


def test_lookup_needs_a_trusted_site_key(tmp_path: Path, dht_nodes) -> None:
    data = tmp_path / "site"
    node = dht_nodes("--data-dir", str(data))
    aor = f"sip:alice@{DOMAIN}"
    stranger = keygen(tmp_path / "stranger")
    refused = p2psip("lookup", aor, "--bootstrap", node.address,
                     "--data-dir", str(tmp_path / "stranger"), "--timeout", "3")  # fmt: skip
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"do the nodes trust this site's key {stranger}?" in refused.stderr
    (tmp_path / "empty").mkdir()
    missing = p2psip("lookup", aor, "--bootstrap", node.address, "--data-dir",
                     str(tmp_path / "empty"))  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "no site key in" in missing.stderr and "Traceback" not in missing.stderr


def contacts_of(node: DhtProcess, data: Path) -> set[int]:
    """The ports in ``node``'s routing table, as a member with the key in ``data`` sees
    them: the answer to a find_node lists them all (fewer than k)."""
    key = SiteKey.load(data)
    member = Member(key, os.urandom(8))
    request = umsgpack.packb(["find_node", [member.node_id, os.urandom(20)]])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(
            member.seal(b"\x00" + os.urandom(20) + request, time.time()), ("127.0.0.1", node.port)
        )
        reply = open_datagram(s.recv(65535), TrustStore.from_dir(None, key), time.time())
    return {port for _, _, port in umsgpack.unpackb(reply.datagram[21:])}


def until(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_a_dht_node_of_an_untrusted_site_is_not_let_in(tmp_path: Path, dht_nodes) -> None:
    # Paris trusts only itself (its trust folder is empty); tokyo trusts paris and tries
    # to join through it. Then paris's folder gets tokyo's key, and loses it again: the
    # folder is watched, and keys are looked up at every datagram.
    paris_trust, tokyo_trust = tmp_path / "paris-trust", tmp_path / "tokyo-trust"
    paris_trust.mkdir()
    tokyo_trust.mkdir()
    paris = dht_nodes("--data-dir", str(tmp_path / "paris"), "--trust", str(paris_trust))
    (tokyo_trust / "paris.pub").write_bytes((tmp_path / "paris" / "site.pub").read_bytes())
    tokyo_id = keygen(tmp_path / "tokyo")
    tokyo = dht_nodes("--data-dir", str(tmp_path / "tokyo"), "--trust", str(tokyo_trust),
                      "--bootstrap", paris.address)  # fmt: skip
    wait_in_log(paris, f"untrusted key {tokyo_id} from 127.0.0.1:{tokyo.port}")
    assert tokyo.port not in contacts_of(paris, tmp_path / "paris")

    def tokyo_pings_paris() -> bool:
        ping = p2psip("ping", paris.address, "--data-dir", str(tmp_path / "tokyo"),
                      "--trust", str(tokyo_trust), "--timeout", "0.5")  # fmt: skip
        assert ping.returncode in (0, 1), ping.stderr
        return ping.returncode == 0

    assert not tokyo_pings_paris()
    (paris_trust / "tokyo.pub").write_bytes((tmp_path / "tokyo" / "site.pub").read_bytes())
    until(tokyo_pings_paris, "paris never heard tokyo after its key was added")
    (paris_trust / "tokyo.pub").unlink()
    until(lambda: not tokyo_pings_paris(), "paris still hears tokyo after its key was removed")
