"""Header fields: the ordered header list and the typed views a proxy needs.

Header names are stored in canonical form (``Call-ID``, ``CSeq``, compact forms
expanded), values as unfolded text. Typed views (:class:`Via`, :class:`NameAddr`,
:class:`CSeq`) are parsed on demand, so a proxy never parses what it does not read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from .errors import ParseError
from .grammar import (
    TOKEN_CHARS,
    WS,
    Params,
    format_params,
    get_param,
    is_token,
    parse_params,
    scan,
    scan_quoted,
    skip_ws,
    split_commas,
    unquote,
)
from .uri import AbsoluteUri, SipUri, Uri, parse_host, parse_port, parse_uri

COMPACT = {
    "a": "Accept-Contact", "b": "Referred-By", "c": "Content-Type", "d": "Request-Disposition",
    "e": "Content-Encoding", "f": "From", "i": "Call-ID", "j": "Reject-Contact", "k": "Supported",
    "l": "Content-Length", "m": "Contact", "o": "Event", "r": "Refer-To", "s": "Subject",
    "t": "To", "u": "Allow-Events", "v": "Via", "x": "Session-Expires", "y": "Identity",
}  # fmt: skip
_KNOWN = [
    "Accept", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow", "Authentication-Info",
    "Authorization", "Call-ID", "Call-Info", "Contact", "Content-Disposition",
    "Content-Encoding", "Content-Language", "Content-Length", "Content-Type", "CSeq", "Date",
    "Error-Info", "Expires", "From", "In-Reply-To", "Max-Forwards", "Min-Expires",
    "MIME-Version", "Organization", "Path", "Priority", "Proxy-Authenticate",
    "Proxy-Authorization", "Proxy-Require", "Record-Route", "Reply-To", "Require",
    "Retry-After", "Route", "Server", "Subject", "Supported", "Timestamp", "To", "Unsupported",
    "User-Agent", "Via", "Warning", "WWW-Authenticate", "Event", "Allow-Events", "RSeq", "RAck",
    "Session-Expires", "Min-SE", "Refer-To", "Referred-By", "P-Asserted-Identity",
]  # fmt: skip
CANONICAL: dict[str, str] = {n.lower(): n for n in [*_KNOWN, *COMPACT.values()]}
CANONICAL.update(COMPACT)

# Header fields that RFC 3261 §7.3.1 lets carry several comma-separated values and that
# a proxy reads element by element.
MULTI_VALUED = frozenset(
    ["Via", "Route", "Record-Route", "Contact", "Path", "Proxy-Require", "Require",
     "Supported", "Unsupported", "Allow"]
)  # fmt: skip
# Header fields that may appear at most once (RFC 4475 §3.3.8, §3.3.9).
SINGLE_VALUED = frozenset(
    ["Call-ID", "CSeq", "From", "To", "Max-Forwards", "Content-Length", "Content-Type",
     "Expires", "Min-Expires"]
)  # fmt: skip


def canonical_name(name: str) -> str:
    return CANONICAL.get(name.lower(), name)


_CANONICAL_NAMES = frozenset(CANONICAL.values())


def _key(name: str) -> str:
    # Lookups usually pass the canonical name already: skip the lower() and dict probe.
    return name if name in _CANONICAL_NAMES else CANONICAL.get(name.lower(), name)


class Headers:
    """An ordered list of ``(canonical name, value)`` pairs.

    Names of known header fields are stored in canonical form (compact forms expanded);
    lookups and removals accept any spelling of a known name. Extension header names are
    kept and matched as written.
    """

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items: list[tuple[str, str]] = items if items is not None else []

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> Headers:
        return cls([(_key(n), v) for n, v in pairs])

    def copy(self) -> Headers:
        return Headers(list(self._items))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._items == other._items

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def get(self, name: str) -> str | None:
        """The first value of ``name``, or None."""
        name = _key(name)
        for n, v in self._items:
            if n == name:
                return v
        return None

    def get_all(self, name: str) -> list[str]:
        """Every header line of ``name`` (not split on commas)."""
        name = _key(name)
        return [v for n, v in self._items if n == name]

    def values(self, name: str) -> list[str]:
        """Every element of a comma-separated list header, across all its lines."""
        name = _key(name)
        out: list[str] = []
        for n, v in self._items:
            if n == name:
                out.extend(split_commas(v))
        return out

    def count(self, name: str) -> int:
        name = _key(name)
        return sum(1 for n, _ in self._items if n == name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        name = _key(name)
        return any(n == name for n, _ in self._items)

    def add(self, name: str, value: str) -> None:
        self._items.append((_key(name), value))

    def prepend(self, name: str, value: str) -> None:
        self._items.insert(0, (_key(name), value))

    def insert_before_first(self, name: str, value: str) -> None:
        """Insert a header line above the first line of the same name (or at the top)."""
        name = _key(name)
        for i, (n, _) in enumerate(self._items):
            if n == name:
                self._items.insert(i, (name, value))
                return
        self._items.insert(0, (name, value))

    def remove(self, name: str) -> None:
        """Remove every line of ``name``."""
        name = _key(name)
        self._items = [(n, v) for n, v in self._items if n != name]

    def set(self, name: str, value: str) -> None:
        """Replace every line of ``name`` with one line, kept where the first one was."""
        name = _key(name)
        for i, (n, _) in enumerate(self._items):
            if n == name:
                self._items[i] = (name, value)
                self._items = [
                    item for j, item in enumerate(self._items) if j <= i or item[0] != name
                ]
                return
        self._items.append((name, value))

    def replace_first_value(self, name: str, value: str) -> None:
        """Replace the first list element of ``name`` (e.g. the top Via) by ``value``, on
        a line of its own: as ``pop_first_value`` then ``insert_before_first``, in one
        pass. Adds the line when there is none."""
        name = _key(name)
        items = self._items
        for i, (n, v) in enumerate(items):
            if n == name:
                if "," in v and len(parts := split_commas(v)) > 1:
                    items[i] = (n, ", ".join(parts[1:]))
                    items.insert(i, (name, value))
                else:
                    items[i] = (name, value)
                return
        items.insert(0, (name, value))

    def pop_first_value(self, name: str) -> str | None:
        """Remove and return the first list element of ``name`` (e.g. the top Via)."""
        name = _key(name)
        for i, (n, v) in enumerate(self._items):
            if n == name:
                parts = split_commas(v)
                first = parts[0]
                if len(parts) == 1:
                    del self._items[i]
                else:
                    self._items[i] = (n, ", ".join(parts[1:]))
                return first
        return None


# --- Via (RFC 3261 §20.42) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Via:
    transport: str  # upper case: UDP, TCP, TLS, SCTP, WS, ...
    host: str
    port: int | None = None
    params: Params = ()
    # The SIP version of the hop that wrote it. Only "2.0" passes validation; another is
    # read so that a request of that version can still be answered 505 (see parse_via).
    version: str = "2.0"

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    @property
    def branch(self) -> str | None:
        return get_param(self.params, "branch")

    @property
    def received(self) -> str | None:
        return get_param(self.params, "received")

    @property
    def rport(self) -> str | None:
        """ "" when the client asked for rport (RFC 3581), the port once filled in."""
        return get_param(self.params, "rport")

    def sent_by(self) -> tuple[str, int | None]:
        return self.host.lower(), self.port

    def with_params(self, params: Params) -> Via:
        return replace(self, params=params)

    def __str__(self) -> str:
        hp = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"SIP/{self.version}/{self.transport} {hp}{format_params(self.params)}"


def _expect(s: str, i: int, ch: str, what: str) -> int:
    i = skip_ws(s, i)
    if i >= len(s) or s[i] != ch:
        raise ParseError(f"malformed {what}")
    return skip_ws(s, i + 1)


# The Via every phone and proxy writes: "SIP/2.0/UDP host[:port]" with single spaces, a
# host name or IPv4 address of _HOSTNAME_CHARS (or an IPv6 reference), and parameters
# or nothing after it. Matched at once; anything else (and any error) goes to the
# scanner of parse_via, which reads the whole grammar and names what is wrong.
_COMMON_VIA = re.compile(
    r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9\-.]+|\[[0-9A-Fa-f:.]+\])(?::([0-9]+))?(?=[ \t;]|\Z)"
).match


def parse_via(value: str) -> Via:
    """Parse one Via element. LWS is allowed around "/" and ":" (RFC 3261 §25.1 SLASH).

    Any protocol-version token is read (``Via.version``): a request of another SIP
    version is answered 505, and the answer goes to the sent-by of a Via its sender wrote
    in that version (RFC 4475 §3.1.2.16 badvers: ``SIP/7.0/UDP``). ``validate_request``
    and ``validate_response`` refuse a SIP/2.0 message that carries one.
    """
    m = _COMMON_VIA(value)
    if m is not None:
        transport, host, digits = m.groups()
        try:
            if host[0] == "[":
                host, port = parse_host(host if digits is None else f"{host}:{digits}")
            else:
                port = None if digits is None else parse_port(digits)
            params, end = parse_params(value, m.end())
        except ParseError:
            pass  # the scanner says why
        else:
            if end == len(value):
                return Via(transport.upper(), host, port, params, "2.0")
    return _scan_via(value)


def _scan_via(value: str) -> Via:
    s = value
    i = skip_ws(s, 0)
    j = scan(s, i, TOKEN_CHARS)
    if s[i:j].upper() != "SIP":
        raise ParseError("malformed Via protocol")
    i = _expect(s, j, "/", "Via protocol")
    j = scan(s, i, TOKEN_CHARS)
    if j == i:
        raise ParseError("missing Via protocol version")
    version = s[i:j]
    i = _expect(s, j, "/", "Via protocol")
    j = scan(s, i, TOKEN_CHARS)
    if j == i:
        raise ParseError("missing Via transport")
    transport = s[i:j].upper()
    i = j
    if i >= len(s) or s[i] not in WS:
        raise ParseError("malformed Via sent-by")
    i = skip_ws(s, i)
    # sent-by = host [ COLON port ]; the host may be an IPv6 reference.
    j = i
    if j < len(s) and s[j] == "[":
        j = s.find("]", j)
        if j < 0:
            raise ParseError("malformed Via sent-by")
        j += 1
    else:
        j = scan(s, j, TOKEN_CHARS)
    host_end = j
    k = skip_ws(s, j)
    hostport = s[i:host_end]
    if k < len(s) and s[k] == ":":
        k = skip_ws(s, k + 1)
        p = k
        while p < len(s) and s[p].isdigit():
            p += 1
        hostport += ":" + s[k:p]
        j = p
    host, port = parse_host(hostport)
    params, end = parse_params(s, j)
    if skip_ws(s, end) != len(s):
        raise ParseError("malformed Via parameters")
    return Via(transport, host, port, params, version)


# --- name-addr / addr-spec (RFC 3261 §20.10, §25.1) ------------------------------------


@dataclass(frozen=True, slots=True)
class NameAddr:
    uri: Uri
    display: str | None = None  # as written: a quoted-string or tokens
    params: Params = ()
    bracketed: bool = True

    @property
    def tag(self) -> str | None:
        return get_param(self.params, "tag")

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    @property
    def display_text(self) -> str | None:
        return None if self.display is None else unquote(self.display)

    def with_params(self, params: Params) -> NameAddr:
        return replace(self, params=params)

    def __str__(self) -> str:
        prefix = f"{self.display} " if self.display else ""
        return f"{prefix}<{self.uri}>{format_params(self.params)}"


_DISPLAY_TOKEN_CHARS = TOKEN_CHARS | frozenset(WS)


def parse_name_addr(value: str) -> NameAddr:
    s = value.strip(WS)
    if not s:
        raise ParseError("empty address")
    display: str | None = None
    i = 0
    if s[0] == '"':
        i = scan_quoted(s, 0)
        display = s[:i]
        i = skip_ws(s, i)
        if i >= len(s) or s[i] != "<":
            raise ParseError("display name without <URI>")
    else:
        lt = s.find("<")
        if lt > 0 and ":" not in s[:lt]:
            text = s[:lt].strip(WS)
            if not _DISPLAY_TOKEN_CHARS.issuperset(text):
                raise ParseError("display name must be tokens or a quoted string")
            display = text or None
            i = lt
        elif lt == 0:
            i = 0
        else:
            i = -1
    if i >= 0:
        gt = s.find(">", i)
        if gt < 0:
            raise ParseError("unterminated <URI>")
        text = s[i + 1 : gt]
        if not text or " " in text or "\t" in text:
            raise ParseError("whitespace inside <URI>")
        uri = parse_uri(text)
        params, end = parse_params(s, gt + 1)
        bracketed = True
    else:
        # addr-spec: RFC 3261 §20: "if the URI contains a comma, question mark or semicolon,
        # the URI MUST be enclosed in angle brackets", so parameters here are header params.
        semi = s.find(";")
        text = (s if semi < 0 else s[:semi]).strip(WS)
        if "?" in text or " " in text or "\t" in text:
            raise ParseError("address with headers or spaces must be enclosed in <>")
        uri = parse_uri(text)
        params, end = parse_params(s, len(text) if semi < 0 else semi)
        bracketed = False
    if end != len(s):
        raise ParseError("malformed address parameters")
    # (parse_params reads names as tokens only: nothing more to check here.)
    return NameAddr(uri, display, params, bracketed)


# --- CSeq (RFC 3261 §20.16) ---------------------------------------------------------------

MAX_CSEQ = 2**31 - 1


@dataclass(frozen=True, slots=True)
class CSeq:
    number: int
    method: str

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def parse_cseq(value: str) -> CSeq:
    """CSeq = 1*DIGIT LWS Method (RFC 3261 §20.16); the number is below 2**31."""
    s = value.strip(WS)
    i = 0
    n = len(s)
    while i < n and s[i] not in WS:
        i += 1
    number = s[:i]
    method = s[skip_ws(s, i) :]
    if i == n or not _is_ascii_digits(number):
        raise ParseError("malformed CSeq")
    if len(number.lstrip("0")) > 10 or int(number) > MAX_CSEQ:
        raise ParseError("CSeq number out of range")
    if not is_token(method):
        raise ParseError("malformed CSeq method")
    return CSeq(int(number), method)


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() alone also accepts "²" and other Unicode digits int() may reject.
    return text.isascii() and text.isdigit()


def _decimal(value: str, what: str, maximum: int) -> tuple[int, bool]:
    """(value, in range) of a decimal header value; (maximum, False) past ``maximum``."""
    v = value.strip(WS)
    if not _is_ascii_digits(v):
        raise ParseError(f"malformed {what}")
    # Length before int(): int() of thousands of digits is slow, and raises ValueError
    # past sys.get_int_max_str_digits(), leading zeros included.
    digits = v.lstrip("0") or "0"
    if len(digits) > len(str(maximum)):
        return maximum, False
    number = int(digits)
    if number > maximum:
        return maximum, False
    return number, True


def parse_uint(value: str, what: str, maximum: int) -> int:
    """A decimal header value (``Max-Forwards: 0068``); out-of-range values are errors."""
    number, in_range = _decimal(value, what, maximum)
    if not in_range:
        raise ParseError(f"{what} out of range")
    return number


def parse_delta_seconds(value: str, maximum: int = 2**32 - 1) -> int:
    """delta-seconds, clamped: RFC 3261 §20.19 treats huge values as the largest legal one."""
    return _decimal(value, "delta-seconds", maximum)[0]


__all__ = [
    "AbsoluteUri",
    "CSeq",
    "Headers",
    "NameAddr",
    "SipUri",
    "Via",
    "canonical_name",
    "parse_cseq",
    "parse_name_addr",
    "parse_via",
]
