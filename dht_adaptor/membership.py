"""Membership of the overlay: every DHT datagram proves which trusted site sent it.

Pure functions and small values, no I/O: the clock is passed in, the salt is drawn by
the caller. :mod:`dht_adaptor.protocol` seals every datagram it sends with
:meth:`Member.seal` and opens every datagram it receives with :func:`open_datagram`
before doing anything else with it.

Wire format, version 1 (all of it in front of rpcudp's own datagram, which is unchanged)::

    offset  bytes
         0      2  b"P1": this format, version 1
         2      8  key id: the site key's id (TrustStore's 16 hex digits), raw
        10      8  salt: this node's; node id = SHA-1(site public key || salt)
        18      8  timestamp: milliseconds since the epoch, unsigned big-endian
        26     64  Ed25519 signature by the site key over
                   DOMAIN || bytes[0:26] || bytes[90:]
        90      n  the rpcudp datagram: kind (0 request, 1 answer), message id, msgpack

Why this shape:

* **Signed by the site key, not by node keys.** The trust folder already lists who is a
  member; nodes of one site (the compose file's ``dht`` and ``proxy``) share its key and
  need no certificates of their own. Signatures rather than MACs: sites share no secret.
* **Node ids bound to the key.** A node's id is SHA-1 of its site's public key and a
  salt that rides along, so the id is checked with one hash and nobody holding another
  key can take an id (that would need a SHA-1 preimage). The salt, not a counter, so
  that nodes sharing a key need no coordination. What it does not stop: any holder of a
  site's key can reuse that site's salts, or grind salts for ids near a chosen key. The
  nodes of one site are one operator, and a member site is trusted anyway (it can sign
  bindings); the binding makes every routing entry answerable to a site key.
* **A fixed header in front, the signature over everything.** A datagram is refused by
  the cheapest test first (length and tag, timestamp, key lookup, then one Ed25519
  verification); there is nothing to parse and no canonical form to get wrong: the
  signature covers the exact bytes. The domain string keeps these signatures apart
  from the same key's binding signatures and any other use of it. A plain rpcudp or
  kademlia datagram starts with 0x00 or 0x01, so it is refused as carrying no proof,
  and plain nodes ignore ours (their kind byte is unknown to them).
* **A timestamp window, no replay cache.** Within ``WINDOW`` seconds a captured datagram
  can be sent again: a repeated store merges idempotently, a repeated answer matches no
  outstanding message id, and a repeated lookup is answered to whoever repeats it, who
  had to see the original request on the path. Nothing is encrypted: a member's records
  are readable on the path between sites, as before (tunnel the sites if that matters).

Sites' clocks must agree within ``WINDOW`` (NTP), as record expiry assumes already.
"""

from __future__ import annotations

import enum
import hashlib
import math
import struct
from dataclasses import dataclass, field

from dht_adaptor.keys import SiteKey, TrustStore

__all__ = [
    "OVERHEAD",
    "SALT_BYTES",
    "WINDOW",
    "Member",
    "NotAMember",
    "Refusal",
    "RefusalLog",
    "Sender",
    "millis",
    "node_id_of",
    "open_datagram",
]

TAG = b"P1"
SALT_BYTES = 8
KEY_ID_BYTES = 8  # TrustStore key ids are 16 hex digits
SIGNATURE_BYTES = 64
WINDOW = 60.0  # seconds either side of our clock
LOG_INTERVAL = 60.0  # refused datagrams: one log line per interval
_HEADER = struct.Struct(">2s8s8sQ")  # tag, key id, salt, timestamp in ms
OVERHEAD = _HEADER.size + SIGNATURE_BYTES  # 90 bytes on every datagram
_DOMAIN = b"p2psip-dht-datagram-v1\0"


def node_id_of(public_bytes: bytes, salt: bytes) -> bytes:
    """The 20-byte node id that the site key ``public_bytes`` and ``salt`` stand for."""
    return hashlib.sha1(public_bytes + salt).digest()


class Refusal(enum.Enum):
    """Why a datagram was dropped; the values name the counters (``refused_<value>``)."""

    NO_PROOF = "no_proof"  # too short or no tag: a plain kademlia node, or junk
    STALE = "stale"  # timestamp outside the window
    UNTRUSTED_KEY = "untrusted_key"  # the key id is not in the trust store (now)
    BAD_SIGNATURE = "bad_signature"
    WRONG_NODE_ID = "wrong_node_id"  # a request naming an id not bound to its key and salt
    NO_SESSION = "no_session"  # a MAC datagram of a session we do not have (session.py)

    @property
    def text(self) -> str:
        """How the log line says it (a key id follows where there is one)."""
        return _TEXTS[self]


_TEXTS = {
    Refusal.NO_PROOF: "no membership proof",
    Refusal.STALE: f"timestamp over {WINDOW:.0f} s off (clock?), key",
    Refusal.UNTRUSTED_KEY: "untrusted key",
    Refusal.BAD_SIGNATURE: "bad signature, key",
    Refusal.WRONG_NODE_ID: "node id not bound to its proof, key",
    Refusal.NO_SESSION: "no session (restarted?) with key",
}


class NotAMember(Exception):
    """A datagram without valid proof of membership; dropped, never answered."""

    def __init__(self, reason: Refusal, key_id: str | None = None) -> None:
        super().__init__(reason.text if key_id is None else f"{reason.text} {key_id}")
        self.reason = reason
        self.key_id = key_id


@dataclass(frozen=True, slots=True)
class Member:
    """This node's proof of membership: its site's key and its own salt."""

    key: SiteKey
    salt: bytes
    node_id: bytes = field(init=False)
    _prefix: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.salt) != SALT_BYTES:
            raise ValueError(f"a node salt is {SALT_BYTES} bytes, not {len(self.salt)}")
        object.__setattr__(self, "node_id", node_id_of(self.key.public_bytes, self.salt))
        object.__setattr__(self, "_prefix", TAG + bytes.fromhex(self.key.key_id) + self.salt)

    def seal(self, datagram: bytes, now: float) -> bytes:
        """``datagram`` with this node's proof in front (sent at wall-clock time ``now``)."""
        header = self._prefix + millis(now).to_bytes(8, "big")
        return header + self.key.sign(_DOMAIN + header + datagram) + datagram


@dataclass(frozen=True, slots=True)
class Sender:
    """A datagram that proved its membership, and who sent it."""

    key_id: str
    node_id: bytes  # bound to the key: SHA-1(public key || salt)
    datagram: bytes  # the rpcudp datagram inside
    legacy: bool = False  # sealed as P1 (no session offered): answer in P1 (session.py)


def open_datagram(data: bytes, trust: TrustStore, now: float, window: float = WINDOW) -> Sender:
    """The sender and inner datagram of ``data``, or NotAMember.

    The key is looked up in ``trust`` now, at every datagram: a key removed from it
    stops working at once. Never raises anything else, whatever ``data`` holds.
    """
    if len(data) < OVERHEAD or data[:2] != TAG:
        raise NotAMember(Refusal.NO_PROOF)
    _, raw_key_id, salt, stamp = _HEADER.unpack_from(data)
    key_id = raw_key_id.hex()
    if not abs(now - stamp / 1000) <= window:
        raise NotAMember(Refusal.STALE, key_id)
    public = trust.public_bytes(key_id)
    if public is None:
        raise NotAMember(Refusal.UNTRUSTED_KEY, key_id)
    body = data[OVERHEAD:]
    signature = data[_HEADER.size : OVERHEAD]
    if not trust.verify_signature(key_id, _DOMAIN + data[: _HEADER.size] + body, signature):
        raise NotAMember(Refusal.BAD_SIGNATURE, key_id)
    return Sender(key_id, node_id_of(public, salt), body)


def millis(now: float) -> int:
    """``now`` (wall-clock seconds) in the milliseconds the headers carry."""
    if not math.isfinite(now) or now < 0:
        raise ValueError(f"not a wall-clock time: {now}")
    return int(now * 1000)


class RefusalLog:
    """Says what to log about refused datagrams, at most one line per interval: the first
    refusal at once, the rest as one line with their count when the interval is over."""

    def __init__(self, interval: float = LOG_INTERVAL) -> None:
        self.interval = interval
        self._unlogged = 0
        self._detail = ""
        self._last: float | None = None

    def note(self, now: float, detail: str) -> str | None:
        """Count one refusal (``detail``: why, from where); a line to log, or None."""
        self._unlogged += 1
        self._detail = detail
        return self.flush(now)

    def flush(self, now: float) -> str | None:
        """The line for what was counted, unless nothing was or the last is too recent."""
        if not self._unlogged or (self._last is not None and now - self._last < self.interval):
            return None
        since = "" if self._last is None else f" in the last {now - self._last:.0f} s"
        line = f"refused {self._unlogged} DHT datagram(s){since} (last: {self._detail})"
        self._unlogged = 0
        self._last = now
        return line
