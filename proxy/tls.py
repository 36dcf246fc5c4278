"""TLS for SIP (RFC 3261 §26, RFC 5630): certificates, contexts, and who a TLS peer is.

A site shows one of two certificates on its TLS port, chosen by the name the client asks
for (SNI):

* phones get the *phone certificate*: ``--tls-cert``/``--tls-key``, or else a
  self-signed ECDSA P-256 pair made once into the data directory (``tls.crt``,
  ``tls.key``), with a warning: phones must be given it to trust, or told not to verify;
* other sites ask for :data:`SITE_SNI` and get the *site certificate*: a TLS key made at
  every start, in a small X.509 certificate issued by the site's own Ed25519 key (the key
  every other site already has in its trust folder). Nothing to set up.

When this site connects out over TLS it asks for :data:`SITE_SNI` and checks the
certificate itself after the handshake (:class:`PeerVerifier`; Python's ``ssl`` offers
no verify callback): a certificate that holds a trusted site key, or is signed by one,
is a member site's, and it must be the key that signs the bindings naming that home
proxy when we know which; anything else must be verified by a CA (the system's, and
``--tls-ca``) for the peer's address. The handshake proved the peer holds the
certificate's private key, so a valid signature by a trusted key is enough.

Nothing here opens a socket; the only I/O is reading and writing certificate files.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import ssl
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from dht_adaptor.keys import SiteKey, TrustStore, key_id

from .sip.errors import ParseError
from .sip.headers import parse_name_addr
from .sip.uri import SipUri

log = logging.getLogger(__name__)

# What a site asks for (SNI) to get the other site's site certificate. ".invalid" is
# reserved (RFC 2606): no real server is named so, and no public CA can certify it.
SITE_SNI = "site.p2psip.invalid"
PHONE_CERT, PHONE_KEY = "tls.crt", "tls.key"
SITE_CERT, SITE_KEY = "tls-site.crt", "tls-site.key"
# The issuer of a site certificate names the site key that signed it (a hint only: the
# signature is what counts).
ISSUER_PREFIX = "p2psip site key "
SELF_SIGNED_DAYS = 3650
SITE_CERT_DAYS = 365  # made afresh at every start
MAX_FILE_BYTES = 1 << 20
HANDSHAKE_TIMEOUT = 5.0  # seconds, for connections we open


class TlsError(Exception):
    """A certificate or key file that cannot be used; one line, fit for the operator."""


class PeerRefused(Exception):
    """A TLS peer whose certificate this site does not accept; the message says why."""


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Peer:
    """Who a TLS server we connected to is."""

    who: str  # for the log: "site key KID", or a CA-verified subject
    key_id: str | None = None  # the member site's key, when it is one

    def __str__(self) -> str:
        return self.who


@dataclass(frozen=True, slots=True)
class TlsEndpoint:
    """What the transport needs for TLS: the two contexts and the check of a server we
    connected to (returns who it is, raises :class:`PeerRefused`)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    check: Callable[[str, int, Sequence[bytes]], Peer]


# --- certificates -----------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64] or "p2psip")])


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
    except ValueError:
        return x509.DNSName(name)


def _leaf(
    builder: x509.CertificateBuilder,
    public: ec.EllipticCurvePublicKey,
    issuer: ec.EllipticCurvePublicKey | Ed25519PublicKey,
    names: Sequence[str],
) -> x509.CertificateBuilder:
    builder = (
        builder.public_key(public)
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer), critical=False)
    )
    unique = list(dict.fromkeys(n for n in names if n))
    if unique:
        san = x509.SubjectAlternativeName([_general_name(n) for n in unique])
        builder = builder.add_extension(san, critical=False)
    return builder


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_self_signed(names: Sequence[str], now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """A self-signed ECDSA P-256 certificate for ``names`` (host names or addresses):
    (certificate PEM, key PEM). P-256 because phones rarely speak Ed25519 certificates."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(names[0] if names else "p2psip")
    builder = _leaf(x509.CertificateBuilder(), key.public_key(), key.public_key(), names)
    cert = (
        builder.subject_name(name)
        .issuer_name(name)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=SELF_SIGNED_DAYS))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def issue_site_certificate(
    site_key: SiteKey, site_id: str, names: Sequence[str], now: dt.datetime | None = None
) -> tuple[bytes, bytes]:
    """A fresh TLS key in a certificate issued by the site key: (certificate PEM, key PEM)."""
    now = now or _now()
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = site_key.private.public_key()
    builder = _leaf(x509.CertificateBuilder(), key.public_key(), issuer, names)
    cert = (
        builder.subject_name(_name(f"p2psip site {site_id}"))
        .issuer_name(_name(ISSUER_PREFIX + site_key.key_id))
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=SITE_CERT_DAYS))
        .sign(site_key.private, None)  # Ed25519 signs the whole TBS: no separate hash
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise TlsError(f"{what} {path}: larger than {MAX_FILE_BYTES} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise TlsError(f"{what} {path}: {exc.strerror or exc}") from None


def check_pair(cert: Path, key: Path) -> CertPair:
    """Files that make a usable certificate chain and private key, or TlsError: one line
    naming the file that is wrong."""
    try:
        certs = x509.load_pem_x509_certificates(_read(cert, "--tls-cert"))
    except ValueError:
        raise TlsError(f"--tls-cert {cert}: no PEM certificate in it") from None
    try:
        private = serialization.load_pem_private_key(_read(key, "--tls-key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TlsError(f"--tls-key {key}: not an unencrypted PEM private key") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*raw) != certs[0].public_key().public_bytes(*raw):
        raise TlsError(f"--tls-key {key} is not the key of the certificate in {cert}")
    if certs[0].not_valid_after_utc < _now():
        raise TlsError(f"--tls-cert {cert}: expired on {certs[0].not_valid_after_utc:%Y-%m-%d}")
    return CertPair(cert, key)


def phone_certificate(data_dir: Path, names: Sequence[str]) -> CertPair:
    """The self-signed pair in the data directory, made the first time (with a warning
    every start: phones cannot check it unless they are given it)."""
    pair = CertPair(data_dir / PHONE_CERT, data_dir / PHONE_KEY)
    if not (pair.cert.exists() and pair.key.exists()):
        cert, key = make_self_signed(names)
        try:
            _write(pair.key, key, 0o600)
            _write(pair.cert, cert, 0o644)
        except OSError as exc:
            raise TlsError(f"cannot write {pair.cert}: {exc.strerror or exc}") from None
    try:
        check_pair(pair.cert, pair.key)
    except TlsError as exc:
        raise TlsError(
            f"the self-signed pair in {data_dir} is unusable ({exc}); remove "
            f"{pair.cert.name} and {pair.key.name} to make a new one"
        ) from None
    log.warning(
        "no --tls-cert: phones get the self-signed certificate %s (give it to phones as "
        "their CA, or set --tls-cert and --tls-key)", pair.cert,
    )  # fmt: skip
    return pair


def site_certificate(
    data_dir: Path, site_key: SiteKey, site_id: str, names: Sequence[str]
) -> CertPair:
    """This start's site certificate, issued by the site key, written into the data dir
    (``ssl`` loads certificates from files only)."""
    cert, key = issue_site_certificate(site_key, site_id, names)
    pair = CertPair(data_dir / SITE_CERT, data_dir / SITE_KEY)
    try:
        _write(pair.key, key, 0o600)
        _write(pair.cert, cert, 0o644)
    except OSError as exc:
        raise TlsError(f"cannot write {pair.cert}: {exc.strerror or exc}") from None
    return pair


# --- contexts ----------------------------------------------------------------------------


def _context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(phones: CertPair, site: CertPair) -> ssl.SSLContext:
    """The TLS listener's context: the phone certificate, or the site certificate for a
    client that asks for :data:`SITE_SNI`. Client certificates are not asked for (phones
    prove who they are with digest; sites with the signed relay header)."""
    site_ctx = _context(ssl.Purpose.CLIENT_AUTH)
    site_ctx.load_cert_chain(site.cert, site.key)
    ctx = _context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(phones.cert, phones.key)

    def choose(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name == SITE_SNI:
            sock.context = site_ctx
        return None

    ctx.sni_callback = choose
    return ctx


def client_context() -> ssl.SSLContext:
    """For connections we open: OpenSSL checks nothing, :class:`PeerVerifier` does."""
    ctx = _context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# --- who a peer is -----------------------------------------------------------------------


def _issuer_key_id(cert: x509.Certificate) -> str | None:
    for attr in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attr.value if isinstance(attr.value, str) else ""
        if value.startswith(ISSUER_PREFIX):
            return value[len(ISSUER_PREFIX) :]
    return None


def member_key(cert: x509.Certificate, trust: TrustStore, now: dt.datetime) -> str | None:
    """The trusted site key this certificate speaks for: one it holds, or one that signed
    it (within its validity). None if neither."""
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return None
    public = cert.public_key()
    if isinstance(public, Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        own = key_id(raw)
        if trust.public_bytes(own) == raw:
            return own
    issuer = _issuer_key_id(cert)
    if issuer is None or cert.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
        return None
    if trust.verify_signature(issuer, cert.tbs_certificate_bytes, cert.signature):
        return issuer
    return None


def describe(cert: x509.Certificate, now: dt.datetime) -> str:
    """What a refused certificate is, in a few words for the log."""
    if now > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if now < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d}"
    kid = _issuer_key_id(cert)
    if kid is not None:
        return f"issued by site key {kid}, which is not trusted or did not sign it"
    if cert.issuer == cert.subject:
        return f"self-signed {cert.subject.rfc4514_string()!r}"
    return f"{cert.subject.rfc4514_string()!r} issued by {cert.issuer.rfc4514_string()!r}"


def home_keys(homes: Iterable[tuple[str, str]]) -> dict[tuple[str, int], str]:
    """(host, port) -> key id, from member sites' (home proxy URI, signing key id): the
    key a TLS server at that address must show. Only home proxies named by an address
    count (a name would need resolving; those servers may show any trusted key)."""
    out: dict[tuple[str, int], str] = {}
    for home, kid in homes:
        try:
            uri = parse_name_addr(f"<{home}>").uri
        except ParseError:
            continue
        if not isinstance(uri, SipUri):
            continue
        host = uri.host.strip("[]")
        try:
            host = ipaddress.ip_address(host).compressed
        except ValueError:
            continue
        out[(host, uri.port or 5061)] = kid
    return out


class PeerVerifier:
    """Checks the certificate of a TLS server this site connected to.

    ``homes`` gives the member sites' (home proxy URI, key id) pairs of the moment
    (:meth:`proxy.sites.SiteDirectory.snapshot`); ``ca_file`` adds CAs to the system's
    for servers that are no member site.
    """

    def __init__(
        self,
        trust: TrustStore,
        *,
        homes: Callable[[], Iterable[tuple[str, str]]] = lambda: (),
        ca_file: Path | None = None,
        clock: Callable[[], dt.datetime] = _now,
    ) -> None:
        self._trust = trust
        self._homes = homes
        self._clock = clock
        self._extra: list[x509.Certificate] = []
        if ca_file is not None:
            try:
                self._extra = x509.load_pem_x509_certificates(_read(ca_file, "--tls-ca"))
            except ValueError:
                raise TlsError(f"--tls-ca {ca_file}: no PEM certificate in it") from None
        self._store: Store | None = None

    def __call__(self, host: str, port: int, chain: Sequence[bytes]) -> Peer:
        """Who the server at host:port is (a member site's key, or its CA-verified
        subject); raises PeerRefused saying why not."""
        if not chain:
            raise PeerRefused("no certificate")
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
        except ValueError:
            raise PeerRefused("a certificate that does not parse") from None
        now = self._clock()
        try:
            kid = member_key(leaf, self._trust, now)
        except (ValueError, UnsupportedAlgorithm):  # a key type cryptography cannot load
            kid = None
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise PeerRefused(f"{host} is not an address") from None
        expected = home_keys(self._homes()).get((addr.compressed, port))
        if kid is not None:
            if expected is not None and kid != expected:
                raise PeerRefused(
                    f"certificate of site key {kid}, but the home proxy at this address "
                    f"is the site of key {expected}"
                )
            return Peer(f"site key {kid}", kid)
        if expected is not None:
            raise PeerRefused(
                f"not a certificate of site key {expected}, whose home proxy this is: "
                f"{describe(leaf, now)}"
            )
        return self._by_ca(addr, leaf, chain[1:], now)

    def _by_ca(
        self,
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address,
        leaf: x509.Certificate,
        rest: Sequence[bytes],
        now: dt.datetime,
    ) -> Peer:
        store = self._ca_store()
        if store is None:
            raise PeerRefused(f"no member site's certificate, and no CA to check it: "
                              f"{describe(leaf, now)}")  # fmt: skip
        try:
            intermediates = [x509.load_der_x509_certificate(c) for c in rest]
            verifier = (
                PolicyBuilder().store(store).time(now).build_server_verifier(x509.IPAddress(addr))
            )
            verifier.verify(leaf, intermediates)
        except (VerificationError, ValueError) as exc:
            raise PeerRefused(
                f"no member site's certificate, and no CA verifies it for {addr} "
                f"({describe(leaf, now)}: {exc})"
            ) from None
        return Peer(f"{leaf.subject.rfc4514_string()} (verified by a CA)")

    def _ca_store(self) -> Store | None:
        if self._store is None:
            certs = list(self._extra)
            paths = ssl.get_default_verify_paths()
            for name in {os.path.realpath(p) for p in (paths.cafile, paths.openssl_cafile) if p}:
                try:
                    with warnings.catch_warnings():
                        # Old roots in the system bundle have non-positive serials.
                        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                        certs += x509.load_pem_x509_certificates(Path(name).read_bytes())
                except (OSError, ValueError) as exc:
                    log.debug("no CA certificates from %s: %s", name, exc)
            if not certs:
                return None
            self._store = Store(certs)
        return self._store


def endpoint(
    phones: CertPair, site: CertPair, verifier: Callable[[str, int, Sequence[bytes]], Peer]
) -> TlsEndpoint:
    """Load the certificates into contexts; TlsError (one line) if ``ssl`` refuses them."""
    try:
        server = server_context(phones, site)
    except ssl.SSLError as exc:
        raise TlsError(f"--tls-cert {phones.cert}: {exc.reason or exc}") from None
    return TlsEndpoint(server, client_context(), verifier)
