"""Proof that a request relayed between sites comes from a member site.

A site that relays a call to a user's home proxy (``;p2psip=home``, see
``proxy.dht_routing``) adds one header::

    P-P2PSIP-Relay: v=1;key=<site key id>;ts=<unix seconds>;nonce=<hex>;sig=<base64url>

``sig`` is the sending site's Ed25519 signature over the fields that matter: the method,
the Request-URI (with its relay marker), Call-ID, CSeq, From, the caller identity the
sending site asserts (P-Asserted-Identity, or none), the time and the nonce. The home
proxy verifies it against its trust folder, within ``WINDOW`` seconds of its clock, and
remembers each (key, nonce) for as long, so a captured request cannot be replayed, and
none of its signed fields can be changed or cut and pasted into another request.

Why not RFC 8224 (SIP Identity)? Its PASSporT signs the originating and destination
identities and a time, not the method, Call-ID or CSeq, so a captured request could be
re-sent within its freshness window as another call; and it names a certificate to fetch
(``info``), where our sites trust bare Ed25519 keys exchanged out of band (the trust
folder). One compact header (about 200 bytes, one signature) fits what the federation
already has; a PASSporT could carry the same claims if another network needs them.

Free of I/O: the caller passes the time, the signing key and the trust store.
"""

from __future__ import annotations

import base64
import secrets
from collections import OrderedDict
from typing import Protocol

from .sip.errors import ParseError
from .sip.grammar import get_param, parse_params
from .sip.message import Request

HEADER = "P-P2PSIP-Relay"
VERSION = "1"
WINDOW = 30.0  # seconds either side of our clock
MAX_NONCES = 100_000


class Signer(Protocol):
    """This site's key (``dht_adaptor.keys.SiteKey``)."""

    @property
    def key_id(self) -> str: ...

    def sign(self, data: bytes) -> bytes: ...


class Verifier(Protocol):
    """The member sites' keys (``dht_adaptor.keys.TrustStore``)."""

    def verify_signature(self, kid: str, data: bytes, signature: bytes) -> bool: ...

    def allows(self, kid: str, aor: str) -> bool:
        """May ``kid`` speak for ``aor`` (its scope in the trust folder)?"""
        ...


def _signed_bytes(req: Request, ts: str, nonce: str) -> bytes:
    fields = (
        "p2psip-relay/" + VERSION,
        req.method,
        req.uri,
        req.call_id,
        f"{req.cseq.number} {req.cseq.method}",
        req.headers.get("From") or "",
        req.headers.get("P-Asserted-Identity") or "",
        ts,
        nonce,
    )
    return "\n".join(fields).encode("utf-8", "surrogateescape")


def sign(req: Request, key: Signer, now: float) -> str:
    """The header value proving that ``key``'s site sends ``req`` (as it will be sent)."""
    ts, nonce = str(int(now)), secrets.token_hex(8)
    sig = base64.urlsafe_b64encode(key.sign(_signed_bytes(req, ts, nonce))).decode().rstrip("=")
    return f"v={VERSION};key={key.key_id};ts={ts};nonce={nonce};sig={sig}"


class RelayVerifier:
    """Checks relay proofs; remembers nonces so that none is accepted twice."""

    def __init__(self, trust: Verifier, *, window: float = WINDOW) -> None:
        self._trust = trust
        self._window = window
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def may_assert(self, kid: str, aor: str) -> bool:
        """May the site of ``kid`` assert ``aor`` as a caller's identity? The same scope
        as for publishing bindings (a site speaks for its own users only)."""
        return self._trust.allows(kid, aor)

    def verify(self, req: Request, now: float) -> str | None:
        """The key id of the member site that sent ``req``, or None (no proof, a bad one,
        a stale one, or a replay)."""
        values = req.headers.get_all(HEADER)
        if len(values) != 1:
            return None
        text = ";" + values[0].strip()
        try:
            params, end = parse_params(text, 0)
        except ParseError:
            return None
        kid, ts, nonce, sig = (get_param(params, n) for n in ("key", "ts", "nonce", "sig"))
        if end != len(text) or get_param(params, "v") != VERSION:
            return None
        if not (kid and ts and nonce and sig):
            return None
        if not ts.isdigit() or abs(now - int(ts)) > self._window or len(nonce) > 64:
            return None
        try:
            signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        except ValueError:
            return None
        if not self._trust.verify_signature(kid, _signed_bytes(req, ts, nonce), signature):
            return None
        self._forget(now)
        if (kid, nonce) in self._seen:
            return None  # a replay
        self._seen[(kid, nonce)] = int(ts) + self._window
        while len(self._seen) > MAX_NONCES:
            self._seen.popitem(last=False)
        return kid

    def _forget(self, now: float) -> None:
        # Insertion order is close to expiry order (ts within the window of arrival).
        while self._seen:
            key, until = next(iter(self._seen.items()))
            if until >= now - self._window:
                break
            del self._seen[key]
