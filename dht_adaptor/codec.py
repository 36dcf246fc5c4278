"""Record codec: :class:`Binding` values to and from compact, versioned JSON bytes.

The bytes are what the Redis store keeps per AOR, and later what the DHT carries, so the
decoder treats them as untrusted: it returns a valid binding or raises :class:`CodecError`,
nothing else (no ``KeyError``, ``TypeError`` or ``RecursionError`` leaks out).

Format, version 1 (UTF-8 JSON, no whitespace)::

    {"v":1,"aor":"sip:alice@example.com","contact":"sip:alice@192.0.2.4","expires_at":1700000000.5}
    {"v":1,"bindings":[{"aor":...,"contact":...,"expires_at":...}, ...]}

``aor``, ``contact`` and ``expires_at`` are always present. The other fields are written
only when they differ from the :class:`Binding` default, to keep records small (kademlia
values must fit in one UDP datagram). Unknown fields are rejected: a new field means a new
``v``, so an old node refuses a record it cannot fully understand instead of dropping data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from dht_adaptor.strict_json import StrictJson, dump, kind
from proxy.sip.binding import Binding

VERSION = 1

# RFC 3261 §8.1.1.5: the CSeq number is a 32-bit unsigned integer; reg-id (RFC 5626 §4.2)
# fits too. Bounding them keeps absurd JSON integers out of the binding.
_MAX_UINT32 = 2**32 - 1

_REQUIRED = ("aor", "contact", "expires_at")
_OPTIONAL = ("q", "call_id", "cseq", "source", "instance", "reg_id", "path", "registered_at")
_FIELDS = frozenset(_REQUIRED + _OPTIONAL)
_DEFAULTS: dict[str, Any] = {
    "q": 1.0,
    "call_id": "",
    "cseq": 0,
    "source": "",
    "instance": None,
    "reg_id": None,
    "path": (),
    "registered_at": 0.0,
}


class CodecError(ValueError):
    """The bytes are not a valid binding record (or a binding cannot be encoded)."""


_JSON = StrictJson(CodecError, version=VERSION)


# -- encoding --------------------------------------------------------------------------


def encode_binding(binding: Binding) -> bytes:
    """One binding as a standalone record."""
    return _dump({"v": VERSION, **_binding_to_obj(binding)})


def encode_bindings(bindings: Iterable[Binding]) -> bytes:
    """A list of bindings (the bindings of one AOR) as one record."""
    return _dump({"v": VERSION, "bindings": [_binding_to_obj(b) for b in bindings]})


def _binding_to_obj(binding: Binding) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "aor": binding.aor,
        "contact": binding.contact,
        "expires_at": binding.expires_at,
    }
    if not isinstance(binding.path, tuple):  # a list would not survive the round trip
        _fail(f"'path' must be a tuple, not {kind(binding.path)}")
    for name in _OPTIONAL:
        value = getattr(binding, name)
        if value != _DEFAULTS[name]:
            obj[name] = list(value) if name == "path" else value
    # Validate what we wrote with the decoder's rules, so that encode never produces a
    # record that decode would refuse (NaN, q > 1, a lone surrogate, a list as path...).
    _binding_from_obj(obj)
    return obj


def _dump(obj: dict[str, Any]) -> bytes:
    try:
        return dump(obj)
    except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
        raise CodecError(f"cannot encode binding: {exc}") from exc


# -- decoding --------------------------------------------------------------------------


def decode_binding(data: bytes) -> Binding:
    """Parse a record made by :func:`encode_binding`."""
    obj = _JSON.load(data)
    _JSON.check_keys(obj, required={"v", *_REQUIRED}, allowed={"v", *_FIELDS}, where="record")
    return _binding_from_obj({k: v for k, v in obj.items() if k != "v"})


def decode_bindings(data: bytes) -> list[Binding]:
    """Parse a record made by :func:`encode_bindings`."""
    obj = _JSON.load(data)
    _JSON.check_keys(obj, required={"v", "bindings"}, allowed={"v", "bindings"}, where="record")
    items = obj["bindings"]
    if not isinstance(items, list):
        _fail(f"'bindings' must be a list, not {kind(items)}")
    result = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            _fail(f"bindings[{index}] must be an object, not {kind(item)}")
        with _JSON.within(f"bindings[{index}]"):
            result.append(_binding_from_obj(item))
    return result


def _binding_from_obj(obj: dict[str, Any]) -> Binding:
    _JSON.check_keys(obj, required=_REQUIRED, allowed=_FIELDS, where="binding")
    path = obj.get("path", [])
    if not isinstance(path, list):
        _fail(f"'path' must be a list of strings, not {kind(path)}")
    return Binding(
        aor=_text(obj, "aor", nonempty=True),
        contact=_text(obj, "contact", nonempty=True),
        expires_at=_number(obj, "expires_at"),
        q=_number(obj, "q", check=lambda q: 0.0 <= q <= 1.0, rule="between 0 and 1"),
        call_id=_text(obj, "call_id"),
        cseq=_uint(obj, "cseq"),
        source=_text(obj, "source"),
        instance=None if obj.get("instance") is None else _text(obj, "instance"),
        reg_id=None if obj.get("reg_id") is None else _uint(obj, "reg_id"),
        path=tuple(_text({"path": p}, "path") for p in path),
        registered_at=_number(obj, "registered_at"),
    )


def _text(obj: dict[str, Any], name: str, *, nonempty: bool = False) -> str:
    value = obj.get(name, _DEFAULTS.get(name))
    if not isinstance(value, str):
        _fail(f"'{name}' must be a string, not {kind(value)}")
    if nonempty and not value:
        _fail(f"'{name}' must not be empty")
    # JSON escapes can spell lone surrogates ("\ud800"); they are not text and would
    # make the binding impossible to encode again.
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            _fail(f"'{name}' contains a lone surrogate")
    return value


def _number(
    obj: dict[str, Any],
    name: str,
    *,
    check: Callable[[float], bool] | None = None,
    rule: str = "",
) -> float:
    number = _JSON.number(obj.get(name, _DEFAULTS.get(name)), name)
    if not math.isfinite(number):  # 1e999 parses to inf
        _fail(f"'{name}' must be finite")
    if check is not None and not check(number):
        _fail(f"'{name}' must be {rule}, not {number}")
    return number


def _uint(obj: dict[str, Any], name: str) -> int:
    return _JSON.uint(obj.get(name, _DEFAULTS.get(name)), name, _MAX_UINT32)


def _fail(message: str) -> NoReturn:
    raise CodecError(message)
