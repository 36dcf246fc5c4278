"""SIP over TLS (RFC 3261 §26, RFC 5630) on one site: certificates and who a TLS peer is
(proxy.tls), the TLS listener's caps and timeouts, Via and Record-Route over TLS, SIPS
requests over TLS only, and the settings. Real sockets on 127.0.0.1, ephemeral ports.

The helpers at the top (a CA of the test's own, a phone's TLS connection) serve
tests/test_tls_*.py too.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from dht_adaptor.keys import SiteKey, TrustStore
from proxy import tls
from proxy.config import Config, ConfigError, HostPort, build_config, tls_listen_of
from proxy.sip.framing import Frame, StreamFramer
from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.site import Site, build_site
from proxy.transport import Flow, TransportLayer
from tests.security.ua import Endpoint, Sip
from tests.support.site import ROOT, free_port

HOST = "127.0.0.1"
DOMAIN = "example.com"
WAIT = 5.0


# --- helpers: a CA of the test's own, a phone's TLS connection ------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


def make_ca(directory: Path, names: Sequence[str] = ("127.0.0.1",)) -> tuple[Path, Path, Path]:
    """A CA and a server certificate it issues for ``names``: (ca.pem, cert.pem, key.pem)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("p2psip test CA"))
        .issuer_name(_name("p2psip test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def client_context(ca: Path | None) -> ssl.SSLContext:
    """A phone's context: checks the proxy against ``ca`` (None: takes any certificate)."""
    if ca is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(ca))


class TlsPeer:
    """A phone's TLS connection to the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.inbox: asyncio.Queue[Request | Response] = asyncio.Queue()
        self.raw: list[bytes] = []
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(
        cls, host: str, port: int, *, ca: Path | None = None, server_hostname: str | None = None
    ) -> TlsPeer:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=client_context(ca), server_hostname=server_hostname
            ),
            WAIT,
        )
        return cls(reader, writer)

    @property
    def port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def _read(self) -> None:
        framer = StreamFramer()
        while True:
            data = await self.reader.read(65536)
            if not data:
                return
            for event in framer.feed(data):
                if isinstance(event, Frame):
                    self.raw.append(event.data)
                    self.inbox.put_nowait(parse_message(event.data, stream=True))

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def next(self, timeout: float = WAIT) -> Request | Response:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def final(self, call_id: str, timeout: float = WAIT) -> Response:
        while True:
            msg = await self.next(timeout)
            if isinstance(msg, Response) and msg.call_id == call_id and msg.status >= 200:
                return msg

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


def sip_request(
    method: str,
    ruri: str,
    *,
    sent_by: str,
    from_: str,
    to: str | None = None,
    contact: str | None = None,
    transport: str = "TLS",
    extra: Sequence[str] = (),
) -> tuple[bytes, str]:
    """A request as a phone writes it: (bytes, Call-ID)."""
    call_id = uuid.uuid4().hex
    lines = [
        f"{method} {ruri} SIP/2.0",
        f"Via: SIP/2.0/{transport} {sent_by};branch=z9hG4bK{uuid.uuid4().hex[:12]};rport",
        "Max-Forwards: 70",
        f"From: <{from_}>;tag={uuid.uuid4().hex[:8]}",
        f"To: <{to or ruri}>",
        f"Call-ID: {call_id}",
        f"CSeq: 1 {method}",
        *([f"Contact: <{contact}>"] if contact else []),
        *extra,
        "Content-Length: 0",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), call_id


def headers(msg: Request | Response, name: str) -> list[str]:
    return msg.headers.values(name)


# --- certificates: who a peer is ------------------------------------------------------------


def _load(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def trust_of(*keys: SiteKey) -> TrustStore:
    return TrustStore({k.key_id: k.public_bytes for k in keys})


def test_a_site_certificate_speaks_for_the_site_key_that_issued_it() -> None:
    paris, rome = SiteKey.generate(), SiteKey.generate()
    cert = _load(tls.issue_site_certificate(paris, "paris", [HOST])[0])
    assert tls.member_key(cert, trust_of(paris, rome), _now()) == paris.key_id
    # The issuer's key must be trusted (now: a key removed from the folder stops at once).
    assert tls.member_key(cert, trust_of(rome), _now()) is None
    # Expired, or not valid yet.
    later = _now() + dt.timedelta(days=tls.SITE_CERT_DAYS + 1)
    assert tls.member_key(cert, trust_of(paris), later) is None
    assert tls.member_key(cert, trust_of(paris), _now() - dt.timedelta(days=1)) is None


def test_a_certificate_holding_the_site_key_itself_is_the_site() -> None:
    key = SiteKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.private.public_key()).serial_number(1)
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .sign(key.private, None)
    )  # fmt: skip
    assert tls.member_key(cert, trust_of(key), _now()) == key.key_id
    assert tls.member_key(cert, trust_of(SiteKey.generate()), _now()) is None


def test_naming_a_trusted_key_as_issuer_is_not_enough() -> None:
    trusted = SiteKey.generate()
    forger = Ed25519PrivateKey.generate()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "p2psip site x")]))
        .issuer_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, tls.ISSUER_PREFIX + trusted.key_id)])
        )
        .public_key(key.public_key()).serial_number(2)
        .not_valid_before(_now() - dt.timedelta(hours=1))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .sign(forger, None)
    )  # fmt: skip
    assert tls.member_key(cert, trust_of(trusted), _now()) is None
    assert "not trusted or did not sign it" in tls.describe(cert, _now())


def _der(pem: bytes) -> bytes:
    return _load(pem).public_bytes(serialization.Encoding.DER)


def test_the_server_at_a_home_address_must_show_that_home_sites_key() -> None:
    paris, rome = SiteKey.generate(), SiteKey.generate()
    homes = [("sips:127.0.0.3:5061", paris.key_id), ("sip:127.0.0.4:5060", rome.key_id)]
    check = tls.PeerVerifier(trust_of(paris, rome), homes=lambda: homes)
    own = _der(tls.issue_site_certificate(paris, "paris", [])[0])
    other = _der(tls.issue_site_certificate(rome, "rome", [])[0])
    assert check("127.0.0.3", 5061, [own]) == tls.Peer(f"site key {paris.key_id}", paris.key_id)
    with pytest.raises(tls.PeerRefused, match=f"site key {rome.key_id}, but .* {paris.key_id}"):
        check("127.0.0.3", 5061, [other])
    self_signed = _der(tls.make_self_signed(["127.0.0.3"])[0])
    with pytest.raises(tls.PeerRefused, match=f"not a certificate of site key {paris.key_id}"):
        check("127.0.0.3", 5061, [self_signed])
    # Another address: any member's certificate will do (an in-dialog request to a
    # site whose bindings we never saw).
    assert check("127.0.0.9", 5061, [other]).key_id == rome.key_id


def test_a_server_that_is_no_member_needs_a_ca_that_vouches_for_its_address(
    tmp_path: Path,
) -> None:
    ca, cert, _key = make_ca(tmp_path, [HOST])
    leaf = _der(cert.read_bytes())
    with pytest.raises(tls.PeerRefused, match="no CA verifies it"):
        tls.PeerVerifier(trust_of(SiteKey.generate()))(HOST, 5061, [leaf])
    check = tls.PeerVerifier(trust_of(SiteKey.generate()), ca_file=ca)
    peer = check(HOST, 5061, [leaf])
    assert "verified by a CA" in str(peer) and peer.key_id is None
    with pytest.raises(tls.PeerRefused, match=r"127\.0\.0\.2"):
        check("127.0.0.2", 5061, [leaf])  # the certificate is for another address
    with pytest.raises(tls.PeerRefused, match="no certificate"):
        check(HOST, 5061, [])


def test_bad_certificate_files_are_named_in_one_line(tmp_path: Path) -> None:
    _ca, cert, key = make_ca(tmp_path / "a")
    _ca2, _cert2, other_key = make_ca(tmp_path / "b")
    assert tls.check_pair(cert, key) == tls.CertPair(cert, key)
    cases = [
        (tmp_path / "missing.pem", key, "does not exist"),
        (key, key, "no PEM certificate"),
        (cert, cert, "not an unencrypted PEM private key"),
        (cert, other_key, "is not the key of the certificate"),
    ]
    for c, k, needle in cases:
        with pytest.raises(tls.TlsError, match=needle) as info:
            tls.check_pair(c, k)
        assert "\n" not in str(info.value)


# --- settings ----------------------------------------------------------------------------


def test_tls_settings_from_flags_environment_and_file(tmp_path: Path) -> None:
    assert tls_listen_of(Config()) == HostPort("0.0.0.0", 5061)
    # Sites on another SIP port (tests, several sites on one host) never contend for 5061.
    assert tls_listen_of(Config(sip_listen=HostPort(HOST, 5080))) == HostPort(HOST, 0)
    env = {"P2PSIP_TLS_LISTEN": "[::1]:5071", "P2PSIP_HOME_TRANSPORT": "TLS"}
    cfg = build_config({}, env=env)
    assert (cfg.tls_listen, cfg.home_transport) == (HostPort("::1", 5071), "tls")
    toml = tmp_path / "p2psip.toml"
    toml.write_text('tls_listen = "127.0.0.1"\ntls_cert = "c.pem"\ntls_key = "k.pem"\n')
    cfg = build_config({"tls_listen": "127.0.0.1:5099"}, env={}, config_file=toml)
    assert cfg.tls_listen == HostPort(HOST, 5099)
    assert (cfg.tls_cert, cfg.tls_key) == (Path("c.pem"), Path("k.pem"))
    assert build_config({}, env={}, config_file=toml).tls_listen == HostPort(HOST, 5061)
    with pytest.raises(ConfigError, match="go together"):
        build_config({"tls_cert": "c.pem"}, env={})
    with pytest.raises(ConfigError, match="expected udp, tcp or tls"):
        build_config({"home_transport": "sctp"}, env={})


def p2psip(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("P2PSIP_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_bad_tls_files_stop_the_site_with_one_line(tmp_path: Path) -> None:
    _ca, cert, _key = make_ca(tmp_path / "a")
    _ca2, _cert2, other_key = make_ca(tmp_path / "b")
    base = [
        "run", "--sip-listen", f"{HOST}:{free_port()}", "--dht-listen", f"{HOST}:0",
        "--admin-listen", f"{HOST}:{free_port()}", "--data-dir", str(tmp_path / "data"),
    ]  # fmt: skip
    for args, needle in [
        (["--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(other_key)], "nope.pem"),
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], "is not the key of"),
        (["--tls-ca", str(tmp_path / "no-ca.pem")], "no-ca.pem does not exist"),
        (["--tls-ca", str(other_key)], "no PEM certificate"),
    ]:
        proc = p2psip(*base, *args)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        last = proc.stderr.splitlines()[-1]
        assert last.startswith("p2psip: error: --tls-"), last
        assert needle in last, last
    proc = p2psip(*base, "--tls-cert", str(cert))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "tls_cert and tls_key go together" in proc.stderr


# --- the transport: TLS connections are TCP connections, upgraded --------------------------


class Inbox:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Flow]] = asyncio.Queue()

    def __call__(self, data: bytes, flow: Flow) -> None:
        self.queue.put_nowait((data, flow))

    async def get(self, timeout: float = WAIT) -> tuple[bytes, Flow]:
        return await asyncio.wait_for(self.queue.get(), timeout)


class Certs:
    """A site's certificates and TLS endpoint, as build_site makes them."""

    def __init__(self, directory: Path, key: SiteKey | None = None) -> None:
        self.key = key or SiteKey.generate()
        self.trust = trust_of(self.key)
        self.phones = tls.phone_certificate(directory, [HOST])
        self.site = tls.site_certificate(directory, self.key, "test", [HOST])
        self.endpoint = tls.endpoint(self.phones, self.site, tls.PeerVerifier(self.trust))


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path / "certs")


@pytest.fixture
async def layers() -> AsyncIterator[list[TransportLayer]]:
    made: list[TransportLayer] = []
    yield made
    for layer in made:
        await layer.close()


async def tls_layer(
    layers: list[TransportLayer], certs: Certs, **kw: float
) -> tuple[TransportLayer, Inbox]:
    inbox = Inbox()
    layer = TransportLayer(inbox, **kw)  # type: ignore[arg-type]
    layers.append(layer)
    await layer.start(HOST, 0)
    await layer.listen_tls(HOST, 0, certs.endpoint)
    return layer, inbox


async def test_a_phone_talks_sip_over_tls_and_is_answered_on_its_connection(
    layers: list[TransportLayer], certs: Certs
) -> None:
    layer, inbox = await tls_layer(layers, certs)
    phone = await TlsPeer.connect(HOST, layer.tls_port, ca=certs.phones.cert)
    try:
        msg, call_id = sip_request("OPTIONS", f"sip:{HOST}", sent_by="10.0.0.1:5061",
                                   from_="sip:a@example.com")  # fmt: skip
        phone.send(msg[:30])
        phone.send(msg[30:])  # framed as on TCP
        data, flow = await inbox.get()
        assert data == msg
        assert (flow.transport, flow.host, flow.port) == ("tls", HOST, phone.port)
        assert str(flow) == f"tls:{HOST}:{phone.port}" and Flow.parse(str(flow)) == flow
        assert layer.has_connection(HOST, phone.port)
        req = parse_message(data)
        assert isinstance(req, Request)
        layer.send(flow, make_response(req, 200).to_bytes())
        assert (await phone.final(call_id)).status == 200
    finally:
        await phone.close()


async def test_sites_get_the_site_certificate_phones_the_phone_certificate(
    layers: list[TransportLayer], certs: Certs
) -> None:
    layer, _ = await tls_layer(layers, certs)
    for sni, member in ((tls.SITE_SNI, certs.key.key_id), (None, None)):
        peer = await TlsPeer.connect(HOST, layer.tls_port, server_hostname=sni)
        obj = peer.writer.get_extra_info("ssl_object")
        shown = x509.load_der_x509_certificate(obj.getpeercert(binary_form=True))
        assert tls.member_key(shown, certs.trust, _now()) == member
        await peer.close()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), timeout) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_a_connection_that_never_shakes_hands_gets_the_partial_timeout(
    layers: list[TransportLayer], certs: Certs
) -> None:
    layer, _ = await tls_layer(layers, certs, partial_timeout=0.3, idle_timeout=30.0)
    reader, writer = await asyncio.open_connection(HOST, layer.tls_port)
    started = asyncio.get_running_loop().time()
    assert await closed_by_peer(reader, WAIT)
    assert asyncio.get_running_loop().time() - started < 2.0
    writer.close()
    await asyncio.sleep(0.05)
    assert layer.tcp_total == 0


async def test_connections_over_the_caps_are_reset_before_any_handshake(
    layers: list[TransportLayer], certs: Certs
) -> None:
    layer, _ = await tls_layer(
        layers, certs, partial_timeout=5.0, max_tcp_per_address=2, max_tcp_connections=10
    )
    held = [await asyncio.open_connection(HOST, layer.tls_port) for _ in range(2)]
    await asyncio.sleep(0.1)
    assert layer.tcp_total == 2  # counted while they have not even said hello
    reader, writer = await asyncio.open_connection(HOST, layer.tls_port)
    assert await closed_by_peer(reader, 1.0)  # reset at once, not after 5 s
    assert layer.counters.tcp_refused == 1
    for _, w in [*held, (reader, writer)]:
        w.close()


class Rogue:
    """A TLS server that records every byte sent to it after the handshake."""

    def __init__(self) -> None:
        self.received = b""
        self.handshakes = 0
        self.server: asyncio.Server | None = None

    @classmethod
    async def start(cls, cert: Path, key: Path, host: str = HOST, port: int = 0) -> Rogue:
        rogue = cls()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        rogue.server = await asyncio.start_server(
            rogue._serve, host, port, ssl=ctx, reuse_address=True
        )
        return rogue

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            while data := await reader.read(65536):
                self.received += data
        except (OSError, ssl.SSLError):
            pass
        writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_nothing_is_written_to_a_server_whose_certificate_will_not_do(
    layers: list[TransportLayer], certs: Certs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "proxy.transport")
    layer, _ = await tls_layer(layers, certs)
    stranger = SiteKey.generate()  # a site key nobody here trusts
    cert, key = tls.issue_site_certificate(stranger, "stranger", [HOST])
    (tmp_path / "r.pem").write_bytes(cert)
    (tmp_path / "r.key").write_bytes(key)
    rogue = await Rogue.start(tmp_path / "r.pem", tmp_path / "r.key")
    try:
        msg, _ = sip_request("OPTIONS", f"sip:{HOST}", sent_by=f"{HOST}:1", from_="sip:a@b")
        layer.send(Flow("tls", HOST, rogue.port), msg)
        for _ in range(100):
            if "refused TLS peers" in caplog.text:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert rogue.received == b""
        assert f"issued by site key {stranger.key_id}, which is not trusted" in caplog.text
        assert not layer.has_connection(HOST, rogue.port)
    finally:
        await rogue.close()


async def test_a_member_sites_server_gets_what_is_sent(
    layers: list[TransportLayer], certs: Certs, tmp_path: Path
) -> None:
    layer, _ = await tls_layer(layers, certs)
    peer = Certs(tmp_path / "peer", certs.key)  # another process of a trusted site
    rogue = await Rogue.start(peer.site.cert, peer.site.key)
    try:
        msg, _ = sip_request("OPTIONS", f"sip:{HOST}", sent_by=f"{HOST}:1", from_="sip:a@b")
        layer.send(Flow("tls", HOST, rogue.port), msg)
        layer.send(Flow("tls", HOST, rogue.port), msg)  # queued behind the handshake
        for _ in range(100):
            if len(rogue.received) == 2 * len(msg):
                break
            await asyncio.sleep(0.05)
        assert rogue.received == 2 * msg
        conn = layer.connections[(HOST, rogue.port)]
        assert (
            conn.kind == "tls" and str(getattr(conn, "peer", "")) == f"site key {certs.key.key_id}"
        )
        # The key leaves the trust folder: the connection is closed, not used again.
        assert layer.forget_tls_peers(lambda kid: False) == 1
        for _ in range(40):
            if not layer.has_connection(HOST, rogue.port):
                break
            await asyncio.sleep(0.05)
        assert not layer.has_connection(HOST, rogue.port)
    finally:
        await rogue.close()


# --- a site: the listener, Via and Record-Route, SIPS over TLS only --------------------------


def site_config(tmp_path: Path, **kw: object) -> Config:
    return Config(
        domains=(DOMAIN,), sip_listen=HostPort(HOST, 0), dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data", tcp_partial_timeout=2.0, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    s = await build_site(site_config(tmp_path))
    await s.start()
    yield s
    await s.close()


async def test_without_a_certificate_a_site_makes_a_self_signed_one_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    site = await build_site(site_config(tmp_path))
    cert, key = tmp_path / "data" / "tls.crt", tmp_path / "data" / "tls.key"
    try:
        assert key.stat().st_mode & 0o777 == 0o600
        assert "no --tls-cert: phones get the self-signed certificate" in caplog.text
        made = _load(cert.read_bytes())
        assert isinstance(made.public_key(), ec.EllipticCurvePublicKey)  # P-256, for phones
        san = made.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address(HOST) in san.get_values_for_type(x509.IPAddress)
        assert DOMAIN in san.get_values_for_type(x509.DNSName)
        await site.start()
        port = site.identity.tls_port
        assert port and f"SIP over TLS listening on {HOST}:{port}" in caplog.text
        phone = await TlsPeer.connect(HOST, port, ca=cert)  # the phone checks it
        msg, call_id = sip_request("OPTIONS", f"sip:{HOST}:{port};transport=tls",
                                   sent_by="10.0.0.1:5061", from_=f"sip:a@{DOMAIN}")  # fmt: skip
        phone.send(msg)
        ok = await phone.final(call_id)
        assert ok.status == 200 and ok.top_via.received == HOST
        await phone.close()
    finally:
        await site.close()
    first = cert.read_bytes()
    again = await build_site(site_config(tmp_path))
    await again.close()
    assert cert.read_bytes() == first  # made once, kept


async def test_a_phone_registered_over_tls_is_reached_over_its_connection(site: Site) -> None:
    port = site.identity.tls_port
    assert port is not None
    bob = await TlsPeer.connect(HOST, port)
    alice = await TlsPeer.connect(HOST, port)
    try:
        # bob's Contact names a port nothing listens on: only his connection reaches him.
        reg, call_id = sip_request(
            "REGISTER", f"sip:{DOMAIN}", sent_by=f"{HOST}:5999", from_=f"sip:bob@{DOMAIN}",
            to=f"sip:bob@{DOMAIN}", contact=f"sip:bob@{HOST}:5999;transport=tls",
        )  # fmt: skip
        bob.send(reg)
        assert (await bob.final(call_id)).status == 200
        invite, call_id = sip_request(
            "INVITE", f"sips:bob@{DOMAIN}", sent_by=f"{HOST}:5998",
            from_="sips:alice@elsewhere.test", contact=f"sips:alice@{HOST}:5998",
        )  # fmt: skip
        alice.send(invite)
        got = await bob.next()
        assert isinstance(got, Request) and got.method == "INVITE"
        assert headers(got, "Via")[0].startswith(f"SIP/2.0/TLS {HOST}:{port};")
        # TLS in and out: one Record-Route, a SIPS URI for a SIPS request (§16.6 step 4).
        (rr,) = headers(got, "Record-Route")
        assert rr.startswith(f"<sips:{HOST}:{port};lr"), rr
        bob.send(make_response(got, 486, to_tag="bob").to_bytes())
        assert (await alice.final(call_id)).status == 486
    finally:
        await bob.close()
        await alice.close()


async def test_a_sips_request_never_leaves_over_anything_but_tls(site: Site) -> None:
    port = site.identity.tls_port
    assert port is not None
    carol = await Endpoint.open(HOST)  # registered over UDP; answers INVITEs 486
    alice = await TlsPeer.connect(HOST, port)
    try:
        ok = await Sip(carol, (HOST, site.sip_port)).request(
            "REGISTER", f"sip:{DOMAIN}", from_=f"sip:carol@{DOMAIN}", to=f"sip:carol@{DOMAIN}"
        )
        assert ok.status == 200
        invite, call_id = sip_request("INVITE", f"sips:carol@{DOMAIN}", sent_by=f"{HOST}:5998",
                                      from_="sips:alice@elsewhere.test")  # fmt: skip
        alice.send(invite)
        refused = await alice.final(call_id)
        assert refused.status == 480
        (warning,) = headers(refused, "Warning")
        assert warning.startswith("380 ") and '"SIPS Not Allowed"' in warning
        assert [r.method for r in carol.requests()] == []  # nothing went over UDP

        # A sip: request may change transport: double Record-Route, one per leg.
        invite, call_id = sip_request("INVITE", f"sip:carol@{DOMAIN}", sent_by=f"{HOST}:5998",
                                      from_="sip:alice@elsewhere.test")  # fmt: skip
        alice.send(invite)
        assert (await alice.final(call_id)).status == 486
        (got,) = [r for r in carol.requests() if r.method == "INVITE"]
        assert headers(got, "Via")[0].startswith(f"SIP/2.0/UDP {HOST}:{site.sip_port};")
        out, back = headers(got, "Record-Route")
        assert out.startswith(f"<sip:{HOST}:{site.sip_port};lr"), out
        assert back.startswith(f"<sip:{HOST}:{port};transport=tls;lr"), back
    finally:
        carol.close()
        await alice.close()
