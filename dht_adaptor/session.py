"""Peer sessions: one Ed25519 signature per pair of nodes, then a MAC per datagram.

:mod:`dht_adaptor.membership` seals every datagram with an Ed25519 signature by the
site key. Measured (``bench/dht_rpc_cost.py``), the signature and its verification were
two thirds of the CPU of an RPC (about 40 µs to sign and 120-230 µs to verify, against
about 100 µs for the rest). Here two nodes that talk more than once pay for them once:

* **P2, signed, with a key offer.** A P1 datagram (membership.py) with two more header
  fields under the signature: this process's X25519 public key, and the first 8 bytes
  of the receiver's X25519 key as the sender knows it (zeros if it knows none). The
  receiver verifies the signature as for P1 and derives the pair's session key from
  X25519 and both node ids.
* **P3, MAC.** Once a node knows that the peer holds the session key (the peer's P2
  named our X25519 key, or the peer sent a valid P3), it sends P3 datagrams: the P1
  header without the signature, and HMAC-SHA256 (first 16 bytes) under the session key
  over the header and the datagram. Verifying costs about 2 µs.

Wire formats, in front of rpcudp's datagram as for P1::

    P2: b"P2" | key id 8 | salt 8 | ms 8 | our X25519 key 32 | theirs, first 8 | Ed25519 64
    P3: b"P3" | key id 8 | salt 8 | ms 8 | HMAC-SHA256 first 16

What stays as in membership.py, and why:

* **Members only.** A session exists only after a P2 verified under a key of the
  TrustStore; the X25519 key rides under that signature, so only the holder of a
  trusted site key can set one up, for the node id bound to that key and salt.
* **A removed key stops working at once.** Every P3 looks its key id up in the
  TrustStore, as every P1 and P2 does: a key removed from it refuses the next datagram
  and the session is dropped.
* **Replays** within the timestamp window are possible, as before (membership.py).
* **No secrecy**, as before; the session key only authenticates.

A P1 datagram (a peer that offers no session, e.g. a raw test socket) is still
accepted, and answered in P1. A P3 whose session we do not have (we restarted) is
refused like any datagram without proof; :meth:`Sessions.open` says so with
``Refusal.NO_SESSION`` so that the protocol can offer a session back (a signed ping).

Pure: no I/O, the clock passed in.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from dht_adaptor.keys import TrustStore
from dht_adaptor.membership import (
    SIGNATURE_BYTES,
    TAG,
    WINDOW,
    Member,
    NotAMember,
    Refusal,
    Sender,
    millis,
    node_id_of,
    open_datagram,
)

__all__ = ["MAC_OVERHEAD", "MAX_SESSIONS", "OFFER_OVERHEAD", "Sessions"]

OFFER_TAG = b"P2"
MAC_TAG = b"P3"
X25519_BYTES = 32
KNOWN_BYTES = 8
MAC_BYTES = 16
MAX_SESSIONS = 8192  # peers remembered (oldest forgotten first): ~200 bytes each
_HEADER = struct.Struct(">2s8s8sQ")  # as membership's: tag, key id, salt, ms
_OFFER = _HEADER.size + X25519_BYTES + KNOWN_BYTES  # signed header
OFFER_OVERHEAD = _OFFER + SIGNATURE_BYTES  # 130 bytes
MAC_OVERHEAD = _HEADER.size + MAC_BYTES  # 42 bytes
_OFFER_DOMAIN = b"p2psip-dht-offer-v1\0"
_MAC_DOMAIN = b"p2psip-dht-mac-v1\0"
_KEY_DOMAIN = b"p2psip-dht-session-v1\0"
_NO_KEY = bytes(KNOWN_BYTES)
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(slots=True)
class _Peer:
    key_id: str
    node_id: bytes
    xpub: bytes  # the peer's X25519 key
    mac_key: bytes
    knows_us: bool  # the peer holds the session key too: we may send P3
    header: bytes = b""  # its key id and salt as they appear in its datagrams
    address: object = None  # where its last authenticated datagram came from


class Sessions:
    """This node's sessions with its peers, and how it seals and opens datagrams."""

    def __init__(self, member: Member, trust: TrustStore, *, max_peers: int = MAX_SESSIONS):
        self.member = member
        self._trust = trust
        self._private = X25519PrivateKey.generate()  # per process: sessions die with it
        self.xpub = self._private.public_key().public_bytes(*_RAW)
        self._max = max_peers
        self._by_node: dict[bytes, _Peer] = {}
        self._by_header: dict[bytes, _Peer] = {}  # key id + salt (header bytes 2:18)
        ours = bytes.fromhex(member.key.key_id) + member.salt  # as in every header
        self._prefix_offer = OFFER_TAG + ours
        self._prefix_mac = MAC_TAG + ours
        self.made = 0  # sessions set up

    def __len__(self) -> int:
        return len(self._by_node)

    def ready(self, node_id: bytes) -> bool:
        """Do we send MAC datagrams to ``node_id``?"""
        peer = self._by_node.get(node_id)
        return peer is not None and peer.knows_us

    def seal(
        self,
        datagram: bytes,
        now: float,
        node_id: bytes | None,
        address: object = None,
        *,
        legacy: bool = False,
    ) -> bytes:
        """``datagram`` sealed for the node ``node_id`` at ``address`` (node id None:
        unknown, e.g. a ping to an address): P3 if it holds our session key and was last
        heard at that address, P1 if ``legacy``, else P2."""
        if legacy:
            return self.member.seal(datagram, now)
        peer = None if node_id is None else self._by_node.get(node_id)
        stamp = millis(now).to_bytes(8, "big")
        if peer is not None and peer.knows_us and peer.address == address:
            if self._trust.public_bytes(peer.key_id) is not None:
                header = self._prefix_mac + stamp
                mac = hmac.digest(peer.mac_key, _MAC_DOMAIN + header + datagram, "sha256")
                return header + mac[:MAC_BYTES] + datagram
            self._forget(peer)
            peer = None
        known = _NO_KEY if peer is None else peer.xpub[:KNOWN_BYTES]
        header = self._prefix_offer + stamp + self.xpub + known
        signature = self.member.key.sign(_OFFER_DOMAIN + header + datagram)
        return header + signature + datagram

    def open(
        self, data: bytes, now: float, address: object = None, window: float = WINDOW
    ) -> Sender:
        """The sender and inner datagram of a P1, P2 or P3 datagram that came from
        ``address``, or NotAMember. Never raises anything else, whatever ``data`` holds.
        """
        tag = data[:2]
        if tag == MAC_TAG:
            return self._open_mac(data, now, address, window)
        if tag == OFFER_TAG:
            return self._open_offer(data, now, address, window)
        if tag == TAG:
            sender = open_datagram(data, self._trust, now, window)
            return Sender(sender.key_id, sender.node_id, sender.datagram, legacy=True)
        raise NotAMember(Refusal.NO_PROOF)

    def _checked_header(self, data: bytes, size: int, now: float, window: float) -> str:
        if len(data) < size:
            raise NotAMember(Refusal.NO_PROOF)
        _, raw_key_id, _, stamp = _HEADER.unpack_from(data)
        key_id: str = raw_key_id.hex()
        if not abs(now - stamp / 1000) <= window:
            raise NotAMember(Refusal.STALE, key_id)
        return key_id

    def _open_mac(self, data: bytes, now: float, address: object, window: float) -> Sender:
        key_id = self._checked_header(data, MAC_OVERHEAD, now, window)
        if self._trust.public_bytes(key_id) is None:
            peer = self._by_header.get(data[2:18])
            if peer is not None:
                self._forget(peer)  # the key was removed: its sessions die with it
            raise NotAMember(Refusal.UNTRUSTED_KEY, key_id)
        peer = self._by_header.get(data[2:18])
        if peer is None:
            raise NotAMember(Refusal.NO_SESSION, key_id)
        header_end = _HEADER.size
        body = data[MAC_OVERHEAD:]
        expected = hmac.digest(peer.mac_key, _MAC_DOMAIN + data[:header_end] + body, "sha256")
        if not hmac.compare_digest(expected[:MAC_BYTES], data[header_end:MAC_OVERHEAD]):
            raise NotAMember(Refusal.BAD_SIGNATURE, key_id)
        peer.knows_us = True
        peer.address = address
        return Sender(key_id, peer.node_id, body)

    def _open_offer(self, data: bytes, now: float, address: object, window: float) -> Sender:
        key_id = self._checked_header(data, OFFER_OVERHEAD, now, window)
        public = self._trust.public_bytes(key_id)
        if public is None:
            raise NotAMember(Refusal.UNTRUSTED_KEY, key_id)
        body = data[OFFER_OVERHEAD:]
        signature = data[_OFFER:OFFER_OVERHEAD]
        if not self._trust.verify_signature(
            key_id, _OFFER_DOMAIN + data[:_OFFER] + body, signature
        ):
            raise NotAMember(Refusal.BAD_SIGNATURE, key_id)
        node_id = node_id_of(public, data[10:18])
        xpub = data[_HEADER.size : _HEADER.size + X25519_BYTES]
        knows_us = data[_HEADER.size + X25519_BYTES : _OFFER] == self.xpub[:KNOWN_BYTES]
        peer = self._by_node.get(node_id)
        if peer is None or peer.xpub != xpub or peer.key_id != key_id:
            mac_key = self._derive(node_id, xpub)
            if mac_key is not None:
                if peer is not None:
                    self._forget(peer)
                peer = _Peer(key_id, node_id, xpub, mac_key, knows_us, data[2:18], address)
                self._remember(peer)
        else:
            peer.knows_us = knows_us
            peer.address = address
        return Sender(key_id, node_id, body)

    def _derive(self, node_id: bytes, xpub: bytes) -> bytes | None:
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(xpub))
        except ValueError:  # a low-order point: no session, the datagram still counts
            return None
        ids = sorted((self.member.node_id, node_id))
        xpubs = sorted((self.xpub, xpub))
        return hashlib.sha256(_KEY_DOMAIN + shared + b"".join(ids) + b"".join(xpubs)).digest()

    def _remember(self, peer: _Peer) -> None:
        while len(self._by_node) >= self._max:
            self._forget(next(iter(self._by_node.values())))
        self._by_node[peer.node_id] = peer
        self._by_header[peer.header] = peer
        self.made += 1

    def _forget(self, peer: _Peer) -> None:
        if self._by_node.get(peer.node_id) is peer:
            del self._by_node[peer.node_id]
        if self._by_header.get(peer.header) is peer:
            del self._by_header[peer.header]

    def forget_untrusted(self) -> int:
        """Drop the sessions of keys no longer trusted; returns how many."""
        gone = [p for p in self._by_node.values() if self._trust.public_bytes(p.key_id) is None]
        for peer in gone:
            self._forget(peer)
        return len(gone)
