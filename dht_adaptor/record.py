"""DHT records: the signed bindings of one AOR, their merge rules and their wire format.

Kademlia keeps one value per key, last write wins, so a site stores an AOR's record by
reading it, :func:`merge`-ing its own bindings in and writing the union back. Merge is a
join (commutative, associative, idempotent): a binding survives until its signer replaces
it (higher ``version``), hides it (a *tombstone* with a higher ``version``) or it expires.
Verify bindings (``keys.TrustStore.filter``) *before* merging them: a forged binding with
a huge version would otherwise win the merge and push the real one out.

Times are absolute wall-clock seconds passed in, never read here. Only
:func:`new_binding` turns a relative lifetime into ``expires_at``, and it refuses
lifetimes over :data:`MAX_LIFETIME`; :func:`merge` drops bindings that claim more. (The
39peers project made registrations live 57 years by adding ``now`` twice.)

Wire format v1, UTF-8 JSON without whitespace, untrusted on decode::

    {"v":1,"a":"sip:alice@example.com","b":[{"c":"sip:alice@192.0.2.4","h":"sip:192.0.2.1",
     "e":1700003600.5,"s":"paris","n":1700000000000000000,"k":"0123456789abcdef","g":"..."}]}

``a`` is the AOR shared by all bindings; per binding ``c`` contact, ``h`` home, ``e``
expires_at, ``s`` site, ``n`` version, ``k`` key_id, ``q``, ``i`` instance, ``r`` reg_id,
``t`` tombstone, ``g`` base64 signature; defaults are left out. Keys are short because a
record must fit one rpcudp datagram. Unknown fields are refused: a new field is a new ``v``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from dht_adaptor.strict_json import StrictJson, dump, kind

VERSION = 1

# kademlia/rpcudp refuses RPCs over 8192 bytes of msgpack (name+args incl. the 20-byte
# key). 7000 leaves room for the RPC name, the sender's node id, the key and framing.
# Measured (tests/dht/test_record.py::test_capacity_of_a_record): 21 typical signed
# bindings (instance, reg-id, 64-byte signature), about 330 bytes each, fit; 22 do not.
MAX_RECORD_BYTES = 7000
WIRE_LIMIT = 8192  # nothing larger can arrive through rpcudp; decode refuses it early
MAX_BINDINGS = 64
MAX_LIFETIME = 7 * 86400  # seconds; far above any registrar's max_expires
MAX_URI_CHARS = 1024
MAX_SITE_CHARS = 64
MAX_SIGNATURE_BYTES = 128  # Ed25519 needs 64
MAX_VERSION = 2**63 - 1
MAX_REG_ID = 2**32 - 1
MAX_EXPIRES_IN = 2**32 - 1  # RFC 3261 §25.1: delta-seconds fit 32 bits

_SIGNING_DOMAIN = b"p2psip-binding-v1\0"
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# C0/C1 controls and lone surrogates: not text. Refusing NUL also keeps identity() unique.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_FIELDS = ("c", "h", "e", "s", "n", "k", "q", "i", "r", "t", "g")
_REQUIRED = frozenset({"c", "h", "e", "s", "n"})


class RecordError(ValueError):
    """Bytes that are not a valid record, or a record that cannot be encoded."""


class RecordTooLarge(RecordError):
    """The encoded record exceeds max_bytes."""


_JSON = StrictJson(RecordError, version=VERSION, too_large=RecordTooLarge)


@dataclass(frozen=True, slots=True)
class DhtBinding:
    """One contact of one AOR, as one site's signing key published it.

    The constructor does not validate (the writer builds bindings freely);
    :func:`encode_record` and :func:`decode_record` do, with the same rules.
    """

    aor: str  # normalized "sip:user@host" (proxy.sip.uri.aor_of)
    contact: str  # the phone's contact URI
    home: str  # SIP URI of the home proxy that can reach the phone
    expires_at: float  # absolute unix time; for a tombstone, when the tombstone lapses
    site: str  # site id (a name)
    version: int  # per-binding version, larger wins
    key_id: str = ""  # id of the signing key: keys.key_id(public_bytes)
    q: float = 1.0
    instance: str | None = None  # +sip.instance (RFC 5626 §4.1)
    reg_id: int | None = None
    tombstone: bool = False
    signature: bytes = b""

    @property
    def identity(self) -> tuple[str, str, str]:
        """(aor, key_id, which binding): what one signer can replace or tombstone.

        RFC 5626 §6: with an instance, the flow (instance, reg-id) names the binding;
        otherwise the contact does. NUL cannot appear in valid text, so the two forms
        never collide.
        """
        if self.instance:
            reg_id = "" if self.reg_id is None else str(self.reg_id)
            return (self.aor, self.key_id, f"{self.instance}\0{reg_id}")
        return (self.aor, self.key_id, self.contact)

    def signing_bytes(self) -> bytes:
        """Canonical, domain-separated bytes of every field except the signature.

        Floats are normalized (``expires_at=4600`` and ``4600.0`` sign alike) so that a
        binding signs the same before and after a trip through the wire format. Raises
        TypeError/ValueError only for fields of the wrong type (never after decode).
        """
        # Every field but the signature, by name: a field added later is signed too.
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["signature"]
        fields.update(expires_at=float(self.expires_at), q=float(self.q))
        text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return _SIGNING_DOMAIN + text.encode("ascii")

    def is_expired(self, now: float) -> bool:
        """``expires_at <= now``, live binding or tombstone (NaN counts as expired)."""
        return not self.expires_at > now

    def is_live(self, now: float) -> bool:
        """Not a tombstone and not expired."""
        return not self.tombstone and not self.is_expired(now)

    def expires_in(self, now: float) -> int:
        """Whole seconds left, rounded up: > 0 exactly while unexpired, never negative."""
        left = self.expires_at - now
        if not left > 0:
            return 0
        if left >= MAX_EXPIRES_IN:
            return MAX_EXPIRES_IN
        return math.ceil(left)


def new_binding(
    *,
    aor: str,
    contact: str,
    home: str,
    site: str,
    version: int,
    now: float,
    expires: float,
    q: float = 1.0,
    instance: str | None = None,
    reg_id: int | None = None,
) -> DhtBinding:
    """An unsigned binding registered at ``now`` for ``expires`` seconds (relative).

    The only place where a relative lifetime becomes ``expires_at``. ``expires`` must
    be in (0, MAX_LIFETIME]: an absolute time passed by mistake raises instead of
    making a binding that lives for decades.
    """
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        _fail(f"expires must be a number of seconds, not {kind(expires)}")
    if not 0 < expires <= MAX_LIFETIME:
        _fail(f"expires must be relative seconds in (0, {MAX_LIFETIME}], not {expires!r}")
    b = DhtBinding(aor, contact, home, now + expires, site, version)
    return dataclasses.replace(b, q=q, instance=instance, reg_id=reg_id)


def tombstone_of(
    binding: DhtBinding, *, version: int, expires_at: float | None = None
) -> DhtBinding:
    """An unsigned tombstone that hides ``binding`` (same identity once signed by the
    same key) until ``expires_at``, by default the binding's own expiry.

    A tombstone must outlive every version it hides: once it lapses, merge no longer
    hides an older copy a stale node may still hold.
    """
    if version <= binding.version:
        _fail(f"a tombstone needs a version above {binding.version}, not {version}")
    return dataclasses.replace(
        binding,
        version=version,
        tombstone=True,
        expires_at=binding.expires_at if expires_at is None else expires_at,
        signature=b"",
    )


def dht_key(aor: str) -> bytes:
    """The 20-byte DHT key of an AOR: ``sha1(aor)``, as ``kademlia.utils.digest`` does."""
    try:
        return hashlib.sha1(aor.encode("utf-8")).digest()
    except UnicodeEncodeError:
        _fail("the AOR contains a lone surrogate")


# -- merging ---------------------------------------------------------------------------


def _beats(b: DhtBinding, held: DhtBinding) -> bool:
    # Highest version wins; a tie (a writer's bug, or an identical copy) goes to the
    # larger signature, then the larger canonical bytes, so every site picks the same.
    if b.version != held.version:
        return b.version > held.version
    if b.signature != held.signature:
        return b.signature > held.signature
    return b.signing_bytes() > held.signing_bytes()


def merge(
    *sets: Iterable[DhtBinding], now: float, max_lifetime: float = MAX_LIFETIME
) -> tuple[DhtBinding, ...]:
    """The union of binding sets: per identity the highest version, tombstones included.

    Expired bindings and tombstones, and bindings claiming to live more than
    ``max_lifetime`` seconds past ``now``, are dropped *before* versions are compared:
    a per-element filter keeps merge commutative, associative and idempotent for a given
    ``now``. A tombstone therefore hides what it names only while it is unexpired.
    Result sorted by identity. Pass verified bindings only (see the module docstring).
    """
    best: dict[tuple[str, str, str], DhtBinding] = {}
    horizon = now + max_lifetime
    for bindings in sets:
        for b in bindings:
            if b.is_expired(now) or not b.expires_at <= horizon:
                continue
            ident = b.identity
            held = best.get(ident)
            if held is None or _beats(b, held):
                best[ident] = b
    return tuple(best[ident] for ident in sorted(best))


def live(
    bindings: Iterable[DhtBinding], now: float, *, max_lifetime: float = MAX_LIFETIME
) -> tuple[DhtBinding, ...]:
    """The bindings a call can be routed to: merged, without tombstones, unexpired.

    Merging first means a tombstone in ``bindings`` hides what it names even when the
    caller did not merge.
    """
    merged = merge(bindings, now=now, max_lifetime=max_lifetime)
    return tuple(b for b in merged if not b.tombstone)


DIGEST_BYTES = 8


def held_digest(bindings: Iterable[DhtBinding]) -> bytes:
    """A short name for exactly which signed bindings are held (order does not matter):
    two nodes with equal digests for a key hold the same record. Replica sync offers
    digests instead of records (``NodeProtocol.rpc_offer``). A signature is unique to its
    binding's content, so the signatures name the set; each is length-prefixed."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for signature in sorted(b.signature for b in bindings):
        h.update(len(signature).to_bytes(2, "big"))
        h.update(signature)
    return h.digest()


# -- encoding --------------------------------------------------------------------------


def encode_record(bindings: Sequence[DhtBinding], *, max_bytes: int = MAX_RECORD_BYTES) -> bytes:
    """The bindings of one AOR as one record; :class:`RecordTooLarge` over ``max_bytes``.

    Every binding is checked with the decoder's rules first, so encode never produces a
    record that :func:`decode_record` would refuse.
    """
    try:
        # Exact types too: 1 == 1.0 == True, but only an int is a valid version.
        typed = tuple(type(v) for b in bindings for v in _typed_fields(b))
        key: tuple[object, ...] | None = (tuple(bindings), typed)
        data = _encoded.get((tuple(bindings), typed))
    except (TypeError, AttributeError):  # junk: let the checks below name it
        key, data = None, None
    if data is None:
        data = _encode(bindings)
        if key is not None:
            # A REGISTER's record is encoded by the adaptor (size check), the node (put)
            # and the store (merge): the same tuple each time on a lone node.
            if len(_encoded) >= 1024:
                _encoded.pop(next(iter(_encoded)))
            _encoded[key] = data
    if len(data) > max_bytes:
        raise RecordTooLarge(
            f"record of {len(bindings)} bindings is {len(data)} bytes, "
            f"over the limit of {max_bytes}"
        )
    return data


_encoded: dict[tuple[object, ...], bytes] = {}


def _typed_fields(b: DhtBinding) -> tuple[object, ...]:
    return (b.version, b.q, b.expires_at, b.reg_id, b.tombstone, b.instance, b.signature)


def _encode(bindings: Sequence[DhtBinding]) -> bytes:
    if len(bindings) > MAX_BINDINGS:
        raise RecordTooLarge(f"{len(bindings)} bindings, over the limit of {MAX_BINDINGS}")
    items = []
    for index, b in enumerate(bindings):
        if not isinstance(b, DhtBinding):
            _fail(f"bindings[{index}] is a {kind(b)}, not a DhtBinding")
        with _JSON.within(f"bindings[{index}]"):
            _check_binding(b)
        items.append(_binding_to_obj(b))
    obj: dict[str, Any] = {"v": VERSION}
    if bindings:
        _check_same_aor(bindings, None)
        obj["a"] = bindings[0].aor
    obj["b"] = items
    # Cannot fail: every value was checked (finite numbers, text without surrogates).
    return dump(obj)


def _binding_to_obj(b: DhtBinding) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "c": b.contact,
        "h": b.home,
        "e": float(b.expires_at),
        "s": b.site,
        "n": b.version,
    }
    if b.key_id:
        obj["k"] = b.key_id
    if b.q != 1.0:
        obj["q"] = float(b.q)
    if b.instance is not None:
        obj["i"] = b.instance
    if b.reg_id is not None:
        obj["r"] = b.reg_id
    if b.tombstone:
        obj["t"] = True
    if b.signature:
        obj["g"] = base64.b64encode(b.signature).decode("ascii")
    return obj


# -- decoding --------------------------------------------------------------------------


def decode_record(
    data: bytes | bytearray | memoryview, *, aor: str | None = None, max_bytes: int = WIRE_LIMIT
) -> tuple[DhtBinding, ...]:
    """Parse an untrusted record: valid bindings, or :class:`RecordError` and nothing else.

    With ``aor``, the record must belong to that AOR (a node checks that the value it
    fetched under ``dht_key(aor)`` is really about ``aor``). Signatures are not checked
    here: that is ``TrustStore.filter``'s job.
    """
    obj = _JSON.load(data, max_bytes)
    _JSON.check_keys(obj, required={"v", "b"}, allowed={"v", "a", "b"}, where="record")
    items = obj["b"]
    if not isinstance(items, list):
        _fail(f"record 'b' must be a list, not {kind(items)}")
    if len(items) > MAX_BINDINGS:
        _fail(f"record has {len(items)} bindings, over the limit of {MAX_BINDINGS}")
    if not items:
        if "a" in obj:
            _check_aor(obj["a"])
        return ()
    if "a" not in obj:
        _fail("record lacks 'a'")
    record_aor = _check_aor(obj["a"])
    result = []
    for index, item in enumerate(items):
        with _JSON.within(f"bindings[{index}]"):
            result.append(_binding_from_obj(item, record_aor))
    if aor is not None and record_aor != aor:
        _fail(f"record is about {record_aor!r}, not {aor!r}")
    return tuple(result)


def _binding_from_obj(obj: object, aor: str) -> DhtBinding:
    if not isinstance(obj, dict):
        _fail(f"must be an object, not {kind(obj)}")
    _JSON.check_keys(obj, required=_REQUIRED, allowed=_FIELDS, where="binding")
    signature = obj.get("g", "")
    if not isinstance(signature, str):
        _fail(f"'g' must be a base64 string, not {kind(signature)}")
    if len(signature) > 2 * MAX_SIGNATURE_BYTES:
        _fail("'g' is too long")
    try:
        sig = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
        _fail("'g' is not valid base64")
    b = DhtBinding(
        aor=aor,
        contact=obj["c"],
        home=obj["h"],
        expires_at=_number(obj["e"], "expires_at"),
        site=obj["s"],
        version=obj["n"],
        key_id=obj.get("k", ""),
        q=_number(obj.get("q", 1.0), "q"),
        instance=obj.get("i"),
        reg_id=obj.get("r"),
        tombstone=obj.get("t", False),
        signature=sig,
    )
    _check_binding(b)
    return b


# -- validation (shared by encode and decode) ------------------------------------------


def _check_binding(b: DhtBinding) -> None:
    _check_aor(b.aor)
    _check_text(b.contact, "contact", MAX_URI_CHARS)
    _check_text(b.home, "home", MAX_URI_CHARS)
    _check_text(b.site, "site", MAX_SITE_CHARS)
    _number(b.expires_at, "expires_at", 0.0, math.inf)
    _JSON.uint(b.version, "version", MAX_VERSION)
    if not isinstance(b.key_id, str) or (b.key_id and not _KEY_ID.fullmatch(b.key_id)):
        _fail("'key_id' must be empty or 16 lower-case hex digits")
    _number(b.q, "q", 0.0, 1.0)
    if b.instance is not None:
        _check_text(b.instance, "instance", MAX_URI_CHARS)
    if b.reg_id is not None:
        _JSON.uint(b.reg_id, "reg_id", MAX_REG_ID)
    if not isinstance(b.tombstone, bool):
        _fail(f"'tombstone' must be a boolean, not {kind(b.tombstone)}")
    if not isinstance(b.signature, bytes) or len(b.signature) > MAX_SIGNATURE_BYTES:
        _fail(f"'signature' must be at most {MAX_SIGNATURE_BYTES} bytes")


def _check_aor(value: object) -> str:
    aor = _check_text(value, "aor", MAX_URI_CHARS)
    if not aor.startswith("sip:"):
        _fail("'aor' must be a normalized sip: URI")
    return aor


def _check_same_aor(bindings: Sequence[DhtBinding], aor: str | None) -> None:
    expected = bindings[0].aor if aor is None else aor
    for b in bindings:
        if b.aor != expected:
            _fail(f"record mixes AORs {expected!r} and {b.aor!r}")


def _check_text(value: object, name: str, limit: int) -> str:
    if not isinstance(value, str):
        _fail(f"'{name}' must be a string, not {kind(value)}")
    if not value:
        _fail(f"'{name}' must not be empty")
    if len(value) > limit:
        _fail(f"'{name}' is longer than {limit} characters")
    if _NOT_TEXT.search(value):
        _fail(f"'{name}' contains a control character or lone surrogate")
    return value


def _number(value: object, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    number = _JSON.number(value, name)
    if not math.isfinite(number):
        _fail(f"'{name}' must be finite, not {number}")
    if not low <= number <= high:
        _fail(f"'{name}' must be between {low:g} and {high:g}, not {number}")
    return number


def _fail(message: str) -> NoReturn:
    raise RecordError(message)
