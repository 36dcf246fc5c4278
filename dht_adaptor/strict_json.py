"""Strict JSON for untrusted records: the rules both record formats share, in one place.

:mod:`dht_adaptor.codec` (a site's bindings in Redis) and :mod:`dht_adaptor.record` (the
DHT's signed records) both read bytes that an attacker may have written. Each builds one
:class:`StrictJson` with its own error type (``CodecError``, ``RecordError``), so that a
decoder returns a valid object or raises that error and nothing else: no
``UnicodeDecodeError``, ``RecursionError``, ``KeyError`` or ``TypeError`` leaks out.

Refused: bytes that are not UTF-8 or not JSON, ``NaN``/``Infinity``, duplicate keys
(which a second parser might read differently), nesting too deep for the parser,
integers longer than Python's digit limit, a top-level value that is not an object, and
a ``v`` that is not the reader's version. Also here: :func:`dump` (compact JSON) and the
type checks both formats apply to fields.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NoReturn

__all__ = ["StrictJson", "dump", "kind"]


def kind(value: object) -> str:
    """The type of ``value`` for an error message (``null`` for None)."""
    return "null" if value is None else type(value).__name__


def dump(obj: object) -> bytes:
    """Compact UTF-8 JSON (no whitespace, non-ASCII kept as is).

    Raises ValueError for NaN, infinities and lone surrogates (UnicodeEncodeError), and
    TypeError for values JSON cannot carry.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8")


class StrictJson:
    """The strict reader and field checks of one record format, raising its ``error``."""

    def __init__(
        self,
        error: type[ValueError],
        *,
        version: int,
        too_large: type[ValueError] | None = None,
    ) -> None:
        self.error = error
        self.version = version
        self._too_large = error if too_large is None else too_large

    def fail(self, message: str) -> NoReturn:
        raise self.error(message)

    def load(self, data: object, max_bytes: float = math.inf) -> dict[str, Any]:
        """The JSON object in ``data`` (untrusted), whose ``"v"`` is our version.

        Over ``max_bytes`` raises ``too_large`` before anything is parsed.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            self.fail(f"record must be bytes, not {kind(data)}")
        raw = bytes(data)
        if len(raw) > max_bytes:
            raise self._too_large(f"record is {len(raw)} bytes, over the limit of {max_bytes}")
        try:
            obj = json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=self._no_duplicates,
                parse_constant=self._no_constant,
            )
        except self.error:
            raise
        except UnicodeDecodeError as exc:
            raise self.error(f"record is not UTF-8: {exc.reason} at byte {exc.start}") from None
        except ValueError as exc:  # JSONDecodeError, and ints over the digit limit
            raise self.error(f"record is not JSON: {exc}") from None
        except RecursionError:
            raise self.error("record is not JSON: nested too deeply") from None
        if not isinstance(obj, dict):
            self.fail(f"record must be a JSON object, not {kind(obj)}")
        version = obj.get("v")
        if type(version) is not int:  # bool is an int subclass; `true` is not a version
            self.fail(f"record 'v' must be an integer, not {kind(version)}")
        if version != self.version:
            self.fail(f"unsupported record version {version} (this node reads {self.version})")
        return obj

    def _no_duplicates(self, pairs: Sequence[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            self.fail("record has a duplicate field")
        return obj

    def _no_constant(self, name: str) -> NoReturn:
        self.fail(f"record contains {name}, which is not JSON")

    def check_keys(
        self, obj: dict[str, Any], *, required: Iterable[str], allowed: Iterable[str], where: str
    ) -> None:
        """Every ``required`` key is in ``obj``, and no key outside ``allowed``."""
        missing = set(required) - obj.keys()
        if missing:
            self.fail(f"{where} lacks {', '.join(sorted(missing))}")
        unknown = obj.keys() - set(allowed)
        if unknown:
            self.fail(f"{where} has unknown field(s) {', '.join(sorted(repr(k) for k in unknown))}")

    def number(self, value: object, name: str) -> float:
        """``value`` as a float if it is a JSON number (not a bool); may be inf or NaN."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(f"'{name}' must be a number, not {kind(value)}")
        try:
            return float(value)
        except OverflowError:  # an int too big for a float
            self.fail(f"'{name}' is out of range")

    def uint(self, value: object, name: str, high: int) -> int:
        """``value`` if it is an int (not a bool) in [0, high]."""
        if type(value) is not int:
            self.fail(f"'{name}' must be an integer, not {kind(value)}")
        if not 0 <= value <= high:
            self.fail(f"'{name}' must be between 0 and {high}")
        return value

    @contextlib.contextmanager
    def within(self, where: str) -> Iterator[None]:
        """Prefix the message of an error raised inside with ``where`` (``bindings[3]``)."""
        try:
            yield
        except self.error as exc:
            raise self.error(f"{where}: {exc}") from None
