"""STUN binding requests on the SIP UDP port (RFC 5389), the keep-alive of RFC 5626
§4.4.2, free of I/O.

A phone registered with outbound over UDP sends a STUN Binding request on its flow every
Flow-Timer seconds; the answer (a success response with XOR-MAPPED-ADDRESS) both keeps
its NAT binding open and tells it the address the NAT gave it, so it notices a NAT
reboot. The UDP reader tells STUN from SIP by the first byte (RFC 7983 §7: STUN starts
with 0-3, SIP with a letter) and hands STUN here.

:func:`answer` takes the datagram and where it came from and returns the bytes to send
back, or None: only Binding requests are answered. Everything else that looks like STUN
(indications, which are keep-alives needing no answer, responses, other methods) is
dropped. Malformed messages raise :class:`StunError`, the one error of this module.
"""

from __future__ import annotations

import binascii
import ipaddress
import struct
from dataclasses import dataclass

MAGIC_COOKIE = 0x2112A442
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
_HEADER = struct.Struct("!HHI12s")  # type, length, cookie, transaction id (§6)
_ATTR = struct.Struct("!HH")
HEADER_SIZE = _HEADER.size  # 20

BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

XOR_MAPPED_ADDRESS = 0x0020
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
FINGERPRINT = 0x8028
_FINGERPRINT_XOR = 0x5354554E  # §15.5

# Larger requests are not keep-alives: nothing a phone sends needs more.
MAX_STUN_BYTES = 548


class StunError(ValueError):
    """Bytes that start like STUN but are not a well-formed STUN message."""


@dataclass(frozen=True, slots=True)
class StunMessage:
    type: int  # method and class, as on the wire (e.g. BINDING_REQUEST)
    transaction_id: bytes  # 12 bytes
    attributes: tuple[tuple[int, bytes], ...] = ()

    def attribute(self, kind: int) -> bytes | None:
        for k, v in self.attributes:
            if k == kind:
                return v
        return None


def looks_like_stun(data: bytes) -> bool:
    """RFC 5389 §6: the two top bits are zero and the magic cookie is in place."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == _COOKIE


def decode(data: bytes) -> StunMessage:
    """Parse a STUN message (RFC 5389 §6, §15) or raise StunError."""
    if not looks_like_stun(data):
        raise StunError("not a STUN message (first bits or magic cookie)")
    if len(data) > MAX_STUN_BYTES:
        raise StunError(f"{len(data)} bytes is longer than a keep-alive needs")
    kind, length, _cookie, tid = _HEADER.unpack_from(data)
    if length != len(data) - HEADER_SIZE or length % 4:
        raise StunError(f"message length {length} does not match {len(data)} bytes")
    attributes: list[tuple[int, bytes]] = []
    i = HEADER_SIZE
    while i < len(data):
        if i + _ATTR.size > len(data):
            raise StunError("truncated attribute header")
        akind, alen = _ATTR.unpack_from(data, i)
        start = i + _ATTR.size
        end = start + alen
        if end > len(data):
            raise StunError(f"attribute 0x{akind:04x} runs past the message")
        if akind == FINGERPRINT:
            # §15.5: the last attribute, a CRC-32 of everything before it.
            if alen != 4 or end != len(data):
                raise StunError("FINGERPRINT is not the last 4-byte attribute")
            crc = (binascii.crc32(data[:i]) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
            if data[start:end] != crc.to_bytes(4, "big"):
                raise StunError("FINGERPRINT does not match")
        attributes.append((akind, data[start:end]))
        i = end + (-alen % 4)  # attributes are padded to 4 bytes (§15)
    if i != len(data):
        raise StunError("padding runs past the message")
    return StunMessage(kind, tid, tuple(attributes))


def encode(msg: StunMessage, *, fingerprint: bool = False) -> bytes:
    body = b"".join(_ATTR.pack(k, len(v)) + v + b"\0" * (-len(v) % 4) for k, v in msg.attributes)
    if fingerprint:
        length = len(body) + 8
        head = _HEADER.pack(msg.type, length, MAGIC_COOKIE, msg.transaction_id)
        crc = (binascii.crc32(head + body) ^ _FINGERPRINT_XOR) & 0xFFFFFFFF
        return head + body + _ATTR.pack(FINGERPRINT, 4) + crc.to_bytes(4, "big")
    return _HEADER.pack(msg.type, len(body), MAGIC_COOKIE, msg.transaction_id) + body


def binding_request(transaction_id: bytes, *, fingerprint: bool = False) -> bytes:
    """A Binding request with no attributes (what RFC 5626 keep-alives send)."""
    if len(transaction_id) != 12:
        raise ValueError("a STUN transaction id is 12 bytes")
    return encode(StunMessage(BINDING_REQUEST, transaction_id), fingerprint=fingerprint)


def xor_address(host: str, port: int, transaction_id: bytes) -> bytes:
    """The value of XOR-MAPPED-ADDRESS (§15.2) for host:port."""
    addr = ipaddress.ip_address(host)
    family = 0x01 if addr.version == 4 else 0x02
    key = _COOKIE + (transaction_id if addr.version == 6 else b"")
    packed = bytes(a ^ b for a, b in zip(addr.packed, key, strict=False))
    return struct.pack("!BBH", 0, family, port ^ (MAGIC_COOKIE >> 16)) + packed


def mapped_address(msg: StunMessage) -> tuple[str, int]:
    """The XOR-MAPPED-ADDRESS of a response, decoded (what a phone learns)."""
    value = msg.attribute(XOR_MAPPED_ADDRESS)
    if value is None or len(value) not in (8, 20):
        raise StunError("no XOR-MAPPED-ADDRESS")
    _zero, family, xport = struct.unpack_from("!BBH", value)
    key = _COOKIE + (msg.transaction_id if family == 0x02 else b"")
    packed = bytes(a ^ b for a, b in zip(value[4:], key, strict=False))
    if (family, len(packed)) not in ((0x01, 4), (0x02, 16)):
        raise StunError(f"bad address family {family}")
    return str(ipaddress.ip_address(packed)), xport ^ (MAGIC_COOKIE >> 16)


def _error(msg: StunMessage, code: int, reason: str, unknown: list[int]) -> StunMessage:
    phrase = reason.encode()
    value = struct.pack("!HBB", 0, code // 100, code % 100) + phrase
    attrs = [(ERROR_CODE, value)]
    if unknown:
        attrs.append((UNKNOWN_ATTRIBUTES, b"".join(struct.pack("!H", k) for k in unknown)))
    return StunMessage(BINDING_ERROR, msg.transaction_id, tuple(attrs))


def answer(data: bytes, host: str, port: int) -> bytes | None:
    """The reply to a STUN datagram from host:port, or None when it needs none.

    A Binding request gets a success response naming host:port (§7.3.1), with a
    FINGERPRINT when the request had one. A request with comprehension-required
    attributes we do not know (USERNAME, MESSAGE-INTEGRITY: we hold no credentials)
    gets 420 listing them (§7.3.1). Raises StunError for malformed messages.
    """
    msg = decode(data)
    if msg.type != BINDING_REQUEST:
        return None  # indications are keep-alives that want no answer; responses are not ours
    fingerprint = msg.attribute(FINGERPRINT) is not None
    unknown = [k for k, _ in msg.attributes if k < 0x8000]
    if unknown:
        return encode(_error(msg, 420, "Unknown Attribute", unknown), fingerprint=fingerprint)
    value = xor_address(host, port, msg.transaction_id)
    reply = StunMessage(BINDING_SUCCESS, msg.transaction_id, ((XOR_MAPPED_ADDRESS, value),))
    return encode(reply, fingerprint=fingerprint)


__all__ = [
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "MAGIC_COOKIE",
    "StunError",
    "StunMessage",
    "answer",
    "binding_request",
    "decode",
    "encode",
    "looks_like_stun",
    "mapped_address",
    "xor_address",
]
