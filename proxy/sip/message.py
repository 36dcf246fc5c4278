"""SIP requests and responses: parse from bytes, serialize to bytes (RFC 3261 §7).

``parse_message`` does the framing work every message needs (start line, header
lines, unfolding, Content-Length) and nothing more; the typed views (``top_via``,
``cseq``, ``from_``...) parse their header on first use and cache it. ``validate``
checks what RFC 3261 §8.2 and §16.3 require before a request is processed; a
proxy calls it once per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import ParseError, VersionNotSupported
from .grammar import TOKEN_CHARS, is_token
from .headers import (
    SINGLE_VALUED,
    CSeq,
    Headers,
    NameAddr,
    Via,
    canonical_name,
    parse_cseq,
    parse_name_addr,
    parse_uint,
    parse_via,
)
from .uri import SipUri, Uri, parse_uri

SIP_VERSION = "SIP/2.0"
MAX_MESSAGE_SIZE = 65535

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service", 400: "Bad Request", 401: "Unauthorized",
    402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    410: "Gone", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}  # fmt: skip

# rfc1123-date = wkday "," SP date1 SP time SP "GMT" (RFC 3261 §20.17)
_DATE_RE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT"
)
_METHOD_CHARS = TOKEN_CHARS


class Message:
    """What requests and responses share: headers, body and cached typed views."""

    __slots__ = ("_cache", "body", "headers")

    def __init__(self, headers: Headers, body: bytes = b"") -> None:
        self.headers = headers
        self.body = body
        self._cache: dict[str, Any] = {}

    # Typed views. They parse on first use; code that changes a header it has read
    # through a view calls ``invalidate()``.
    def invalidate(self) -> None:
        self._cache.clear()

    def _single(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise ParseError(f"missing {name} header")
        return value

    @property
    def vias(self) -> list[Via]:
        v = self._cache.get("vias")
        if v is None:
            values = self.headers.values("Via")
            if not values:
                raise ParseError("missing Via header")
            v = self._cache["vias"] = [parse_via(x) for x in values]
        return v  # type: ignore[no-any-return]

    @property
    def top_via(self) -> Via:
        v = self._cache.get("top_via")
        if v is None:
            first = self.headers.get("Via")
            if first is None:
                raise ParseError("missing Via header")
            comma = first.find(",")
            v = self._cache["top_via"] = parse_via(first if comma < 0 else first[:comma])
        return v  # type: ignore[no-any-return]

    @property
    def call_id(self) -> str:
        return self._single("Call-ID")

    @property
    def cseq(self) -> CSeq:
        v = self._cache.get("cseq")
        if v is None:
            v = self._cache["cseq"] = parse_cseq(self._single("CSeq"))
        return v  # type: ignore[no-any-return]

    @property
    def from_(self) -> NameAddr:
        v = self._cache.get("from")
        if v is None:
            v = self._cache["from"] = parse_name_addr(self._single("From"))
        return v  # type: ignore[no-any-return]

    @property
    def to(self) -> NameAddr:
        v = self._cache.get("to")
        if v is None:
            v = self._cache["to"] = parse_name_addr(self._single("To"))
        return v  # type: ignore[no-any-return]

    @property
    def contacts(self) -> list[str]:
        """The raw Contact elements (``*`` included), comma lists split."""
        return self.headers.values("Contact")

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    def _serialize(self, start_line: str) -> bytes:
        parts = [start_line, "\r\n"]
        for name, value in self.headers:
            if name != "Content-Length":
                parts += (name, ": ", value, "\r\n")
        # Content-Length is always written, so stream transports can frame the message.
        parts += ("Content-Length: ", str(len(self.body)), "\r\n\r\n")
        return "".join(parts).encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()


class Request(Message):
    __slots__ = ("method", "uri")

    def __init__(self, method: str, uri: str, headers: Headers, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri

    @property
    def ruri(self) -> Uri:
        """The parsed Request-URI."""
        v = self._cache.get("ruri")
        if v is None:
            v = self._cache["ruri"] = parse_uri(self.uri)
        return v  # type: ignore[no-any-return]

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("Max-Forwards")
        return None if value is None else parse_uint(value, "Max-Forwards", 255)

    def copy(self) -> Request:
        return Request(self.method, self.uri, self.headers.copy(), self.body)

    def to_bytes(self) -> bytes:
        return self._serialize(f"{self.method} {self.uri} {SIP_VERSION}")

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and (self.method, self.uri, self.headers, self.body) == (
            other.method,
            other.uri,
            other.headers,
            other.body,
        )

    __hash__ = None  # type: ignore[assignment]


class Response(Message):
    __slots__ = ("reason", "status")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def copy(self) -> Response:
        return Response(self.status, self.reason, self.headers.copy(), self.body)

    def to_bytes(self) -> bytes:
        return self._serialize(f"{SIP_VERSION} {self.status} {self.reason}")

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Response) and (
            self.status,
            self.reason,
            self.headers,
            self.body,
        ) == (other.status, other.reason, other.headers, other.body)

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class PartialMessage:
    """What was read of a message whose start line is bad: enough to answer it."""

    headers: Headers
    is_request: bool


class StartLineError(ParseError):
    """A ParseError raised after the headers were read, so a response can still be built."""

    def __init__(self, cause: ParseError, partial: PartialMessage) -> None:
        super().__init__(str(cause))
        self.status_code = cause.status_code
        self.reason = cause.reason
        self.partial = partial


def _split_header_block(text: str) -> list[tuple[str, str]]:
    """Split the header block into (canonical name, value) pairs, unfolding continuations."""
    items: list[tuple[str, str]] = []
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in " \t":
            # RFC 3261 §7.3.1: a line starting with whitespace continues the previous one.
            if not items:
                raise ParseError("continuation line before any header")
            name, value = items[-1]
            items[-1] = (name, f"{value} {line.strip()}")
            continue
        colon = line.find(":")
        if colon <= 0:
            raise ParseError("header line without a colon")
        name = line[:colon].rstrip(" \t")
        if not is_token(name):
            raise ParseError("malformed header name")
        items.append((canonical_name(name), line[colon + 1 :].strip(" \t")))
    return items


def _parse_start_line(line: str, headers: Headers, body: bytes) -> Request | Response:
    if line.startswith("SIP/"):
        version, sp1, rest = line.partition(" ")
        code, sp2, reason = rest.partition(" ")
        if version.upper() != SIP_VERSION:
            raise VersionNotSupported(f"unsupported version {version[:16]!r}")
        if not sp1 or not sp2 or len(code) != 3 or not code.isdigit() or not code.isascii():
            raise ParseError("malformed status line")
        status = int(code)
        if not 100 <= status <= 699:
            raise ParseError("status code out of range")
        return Response(status, reason, headers, body)
    # Request-Line = Method SP Request-URI SP SIP-Version: exactly one SP each
    # (RFC 4475 §3.1.2.9, §3.1.2.10), and no spaces inside the URI (§3.1.2.8).
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise ParseError("malformed request line")
    method, uri, version = parts
    if not _METHOD_CHARS.issuperset(method):
        raise ParseError("malformed method")
    if uri[0] == "<":
        raise ParseError("Request-URI must not be enclosed in <>")
    if version.upper() != SIP_VERSION:
        if version.upper().startswith("SIP/"):
            raise VersionNotSupported(f"unsupported version {version[:16]!r}")
        raise ParseError("malformed request line")
    return Request(method, uri, headers, body)


def parse_message(data: bytes, *, stream: bool = False) -> Request | Response:
    """Parse one SIP message.

    ``data`` is a whole datagram, or one frame cut by :class:`~proxy.sip.framing.StreamFramer`.
    On a datagram, bytes past Content-Length are discarded (RFC 3261 §18.3); a
    Content-Length larger than what arrived is an error (RFC 4475 §3.1.2.2). Raises
    only :class:`ParseError` (and its subclasses).
    """
    if len(data) > MAX_MESSAGE_SIZE:
        from .errors import MessageTooLarge

        raise MessageTooLarge("message larger than 64 KiB")
    end = data.find(b"\r\n\r\n")
    if end < 0:
        raise ParseError("no end of headers")
    try:
        text = data[:end].decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("header block is not UTF-8") from None
    line_end = text.find("\r\n")
    start_line = text if line_end < 0 else text[:line_end]
    header_text = "" if line_end < 0 else text[line_end + 2 :]
    headers = Headers(_split_header_block(header_text))
    body = data[end + 4 :]
    partial = PartialMessage(headers, not start_line.startswith("SIP/"))
    try:
        if any(c < " " and c != "\t" for c in start_line):
            raise ParseError("control character in start line")
        cl_values = headers.get_all("Content-Length")
        if len(cl_values) > 1:
            raise ParseError("more than one Content-Length")
        if cl_values:
            length = parse_uint(cl_values[0], "Content-Length", MAX_MESSAGE_SIZE)
            if length > len(body):
                raise ParseError("Content-Length larger than the message body")
            body = body[:length]
        elif stream:
            raise ParseError("Content-Length is required on stream transports")
        return _parse_start_line(start_line, headers, body)
    except StartLineError:
        raise
    except ParseError as exc:
        raise StartLineError(exc, partial) from None


def validate_request(req: Request) -> None:
    """Check what RFC 3261 §8.2/§16.3 need before a request is acted upon.

    Raises :class:`ParseError` (400) for missing or malformed mandatory header fields,
    duplicated single-valued fields (RFC 4475 §3.3.8), a CSeq method that does not
    match (§3.1.2.17), a malformed Date (§3.1.2.12), or a Request-URI carrying headers
    (RFC 3261 §19.1.1, RFC 4475 §3.1.2.11). An unknown Request-URI scheme raises
    :class:`~proxy.sip.errors.UnsupportedUriScheme` via the caller, which knows what
    it can route.
    """
    h = req.headers
    for name in SINGLE_VALUED:
        if h.count(name) > 1:
            raise ParseError(f"more than one {name} header")
    _ = req.vias  # every Via element must parse (RFC 4475 §3.1.2.1)
    call_id = req.call_id
    if not call_id or any(c in " \t" for c in call_id):
        raise ParseError("malformed Call-ID")
    if req.cseq.method != req.method:
        raise ParseError("CSeq method does not match the request method")
    _ = req.from_, req.to
    _ = req.max_forwards
    date = h.get("Date")
    if date is not None and not _DATE_RE.fullmatch(date):
        raise ParseError("malformed Date")
    uri = req.ruri
    if isinstance(uri, SipUri) and uri.headers is not None:
        raise ParseError("Request-URI must not contain headers")
    if req.method == "REGISTER":
        # The registrar stores these, so they must parse (RFC 4475 §3.1.2.13).
        for contact in req.contacts:
            if contact != "*":
                parse_name_addr(contact)


def validate_response(resp: Response) -> None:
    """Check the fields a proxy reads from a response (RFC 3261 §16.7)."""
    for name in ("Call-ID", "CSeq", "From", "To"):
        if resp.headers.count(name) > 1:
            raise ParseError(f"more than one {name} header")
    _ = resp.top_via, resp.cseq, resp.call_id, resp.from_, resp.to


def make_response(
    req: Request | PartialMessage,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> Response:
    """Build a response to ``req`` per RFC 3261 §8.2.6: copy Via, From, To, Call-ID, CSeq.

    ``to_tag`` is added to To when the request's To has none (a UAS response); the
    100 Trying never gets one.
    """
    src = req.headers
    headers = Headers()
    for name, value in src:
        if name in ("Via", "From", "Call-ID", "CSeq"):
            headers.add(name, value)
        elif name == "To":
            if to_tag and status != 100 and ";tag=" not in value.replace(" ", "").lower():
                value = f"{value};tag={to_tag}"
            headers.add(name, value)
        elif name == "Record-Route" and 100 < status < 300:
            # RFC 3261 §12.1.1: a UAS copies Record-Route into responses that create dialogs.
            headers.add(name, value)
    for name, value in extra or ():
        headers.add(name, value)
    return Response(status, reason or REASONS.get(status, "Unknown"), headers, body)
