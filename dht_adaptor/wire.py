"""rpcudp's datagram inside our sealed ones: encoding, sizes and argument checks.

The RPC datagram is rpcudp's (kind byte 0 request / 1 answer, 20-byte message id,
msgpack body), so a node still reads a stock peer's requests; it is packed and
unpacked here with the compiled ``msgpack`` (issue 11 measured the pure-Python
``umsgpack`` that rpcudp uses among the largest costs of an RPC). No DHT engine here.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Any

import msgpack

from dht_adaptor.record import DhtBinding, RecordTooLarge, encode_record

__all__ = [
    "MAX_NODES_IN_ANSWER",
    "MAX_OFFER",
    "RPC_NAMES",
    "UNPACK_ERRORS",
    "claimed_id",
    "is_node_id",
    "pack",
    "record_chunks",
    "unpack",
    "valid_ip",
]

log = logging.getLogger(__name__)

ID_BYTES = 20
MAX_NODES_IN_ANSWER = 64  # a find_node answer holds k nodes; more is a peer misbehaving
RPC_NAMES = frozenset({"ping", "stun", "store", "find_node", "find_value", "offer"})
# keys per replica-sync offer: [20-byte key, 8-byte digest] is 33 bytes of msgpack, so
# 200 of them (6.6 kB) fit the 8 kB datagram with the RPC framing.
MAX_OFFER = 200
# msgpack's own errors are ValueErrors (FormatError, StackError, ExtraData, bad UTF-8).
UNPACK_ERRORS = (ValueError, OverflowError, RecursionError, TypeError)

Bindings = tuple[DhtBinding, ...]

_packer = msgpack.Packer(use_bin_type=True)
pack: Callable[[Any], bytes] = _packer.pack


def unpack(data: bytes) -> Any:
    """One msgpack object (arrays as lists, str as str, bin as bytes); UNPACK_ERRORS."""
    return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)


def is_node_id(value: object) -> bool:
    """Is ``value`` a kademlia node id or key (20 bytes)?"""
    return isinstance(value, bytes) and len(value) == ID_BYTES


def claimed_id(request: object) -> bytes | None:
    """The node id a request names as its sender (its first argument), if it names one."""
    if not (isinstance(request, list) and len(request) == 2 and isinstance(request[1], list)):
        return None
    args = request[1]
    return bytes(args[0]) if args and is_node_id(args[0]) else None


def valid_ip(ip: object, family: socket.AddressFamily) -> bool:
    """Is ``ip`` a literal address of ``family`` (never a hostname: sendto would resolve
    it, blocking the event loop)?"""
    if not isinstance(ip, str):
        return False
    try:
        socket.inet_pton(family, ip)
    except (OSError, ValueError):
        return False
    return True


def record_chunks(bindings: Bindings) -> list[bytes]:
    """Records of at most MAX_RECORD_BYTES that together carry ``bindings``."""
    if not bindings:
        return []
    try:
        return [encode_record(bindings)]
    except RecordTooLarge:
        if len(bindings) == 1:
            log.warning("binding of %s too large for one record; not sent", bindings[0].aor)
            return []
        half = len(bindings) // 2
        return record_chunks(bindings[:half]) + record_chunks(bindings[half:])
