"""SIP requests and responses: parse from bytes, serialize to bytes (RFC 3261 §7).

``parse_message`` does the framing work every message needs (start line, header
lines, unfolding, Content-Length) and nothing more, within the bounds of
:class:`ParseLimits` (size, header count and length, Via and Route depth); the typed
views (``top_via``, ``cseq``, ``from_``...) parse their header on first use and cache
it. ``validate`` checks what RFC 3261 §8.2 and §16.3 require before a request is
processed; a proxy calls it once per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import (
    InputLimitExceeded,
    MessageTooLarge,
    ParseError,
    SipError,
    VersionNotSupported,
)
from .grammar import TOKEN_CHARS, WS, first_element, is_token
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
from .limits import DEFAULT_LIMITS as DEFAULT_LIMITS  # re-exported: callers parse with them
from .limits import MAX_MESSAGE_SIZE as MAX_MESSAGE_SIZE
from .limits import ParseLimits as ParseLimits
from .limits import check_limits
from .uri import SipUri, Uri, parse_uri

SIP_VERSION = "SIP/2.0"

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
# Control characters other than HTAB, which no start line may carry (RFC 3261 §25.1).
_START_LINE_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_METHOD_CHARS = TOKEN_CHARS


class Message:
    """What requests and responses share: headers, body and cached typed views."""

    __slots__ = ("_contacts", "_cseq", "_from", "_to", "_top_via", "_vias", "body", "headers")

    def __init__(self, headers: Headers, body: bytes = b"") -> None:
        self.headers = headers
        self.body = body
        self._vias: list[Via] | None = None
        self._top_via: Via | None = None
        self._cseq: CSeq | None = None
        self._from: NameAddr | None = None
        self._to: NameAddr | None = None
        self._contacts: list[NameAddr] | None = None

    # Typed views. They parse on first use, once; code that changes a header it has read
    # through a view calls ``invalidate()`` (or, for the top Via, ``set_top_via``).
    def invalidate(self) -> None:
        self._vias = self._top_via = self._cseq = self._from = self._to = None
        self._contacts = None

    def set_top_via(self, via: Via) -> None:
        """Replace the top Via element by ``via``, in the header and in the views; every
        other view stays (noting where a request came from re-parses nothing)."""
        self.headers.replace_first_value("Via", str(via))
        self._top_via = via
        if self._vias is not None:
            self._vias = [via, *self._vias[1:]]

    def _single(self, name: str) -> str:
        value = self.headers.get(name)
        if value is None:
            raise ParseError(f"missing {name} header")
        return value

    @property
    def vias(self) -> list[Via]:
        """Every Via element, top first (comma lists split)."""
        v = self._vias
        if v is None:
            values = self.headers.values("Via")
            if not values:
                raise ParseError("missing Via header")
            top = self._top_via  # the same text as values[0] (first_element agrees)
            if top is None:
                v = [parse_via(x) for x in values]
                self._top_via = v[0]
            else:
                v = [top, *[parse_via(x) for x in values[1:]]]
            self._vias = v
        return v

    @property
    def top_via(self) -> Via:
        v = self._top_via
        if v is None:
            first = self.headers.get("Via")
            if first is None:
                raise ParseError("missing Via header")
            v = self._top_via = parse_via(first_element(first))
        return v

    @property
    def call_id(self) -> str:
        return self._single("Call-ID")

    @property
    def cseq(self) -> CSeq:
        v = self._cseq
        if v is None:
            v = self._cseq = parse_cseq(self._single("CSeq"))
        return v

    @property
    def from_(self) -> NameAddr:
        v = self._from
        if v is None:
            v = self._from = parse_name_addr(self._single("From"))
        return v

    @property
    def to(self) -> NameAddr:
        v = self._to
        if v is None:
            v = self._to = parse_name_addr(self._single("To"))
        return v

    @property
    def contacts(self) -> list[str]:
        """The raw Contact elements (``*`` included), comma lists split."""
        return self.headers.values("Contact")

    @property
    def contact_addrs(self) -> list[NameAddr]:
        """The Contact elements parsed, ``*`` left out; ParseError if one is malformed."""
        v = self._contacts
        if v is None:
            v = self._contacts = [parse_name_addr(c) for c in self.contacts if c != "*"]
        return v

    def to_bytes(self) -> bytes:
        raise NotImplementedError

    def _serialize(self, start_line: str) -> bytes:
        parts = [start_line, "\r\n"]
        for name, value in self.headers:
            if name != "Content-Length":
                parts += (name, ": ", value, "\r\n")
        # Content-Length is always written, from the body, so that stream transports can
        # frame the message and a stale header value can never go out.
        parts += ("Content-Length: ", str(len(self.body)), "\r\n\r\n")
        return "".join(parts).encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.to_bytes()

    def _same_fields(self, other: Message) -> bool:
        """Equal header fields, Content-Length aside: it is written from the body, so
        messages that differ only there serialize to the same bytes (and are equal)."""
        if self.headers == other.headers:
            return True
        mine = [item for item in self.headers if item[0] != "Content-Length"]
        return mine == [item for item in other.headers if item[0] != "Content-Length"]


class Request(Message):
    __slots__ = ("_ruri", "method", "uri")

    def __init__(self, method: str, uri: str, headers: Headers, body: bytes = b"") -> None:
        super().__init__(headers, body)
        self.method = method
        self.uri = uri
        self._ruri: tuple[str, Uri] | None = None

    @property
    def ruri(self) -> Uri:
        """The parsed Request-URI (re-parsed when ``uri`` is assigned a new text)."""
        cached = self._ruri
        if cached is None or cached[0] is not self.uri:
            cached = self._ruri = (self.uri, parse_uri(self.uri))
        return cached[1]

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
        return (
            isinstance(other, Request)
            and (self.method, self.uri, self.body) == (other.method, other.uri, other.body)
            and self._same_fields(other)
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
        return (
            isinstance(other, Response)
            and (self.status, self.reason, self.body) == (other.status, other.reason, other.body)
            and self._same_fields(other)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True, slots=True)
class PartialMessage:
    """What was read of a message whose start line is bad: enough to answer it."""

    headers: Headers
    is_request: bool


class StartLineError(ParseError):
    """A ParseError raised after the headers were read, so a response can still be built.

    Raised for a bad start line, a bad Content-Length and a message past a limit;
    ``partial`` holds the headers, ``cause`` the underlying error, whose status and reason
    phrase are kept (and class, for the subclasses below).
    """

    def __init__(self, cause: ParseError, partial: PartialMessage) -> None:
        super().__init__(str(cause))
        self.status_code = cause.status_code
        self.reason = cause.reason
        self.partial = partial
        self.cause = cause


class VersionStartLineError(StartLineError, VersionNotSupported):
    """An unsupported SIP version, read with the headers: answered with 505 (§21.5.26)."""


class TooLargeStartLineError(StartLineError, MessageTooLarge):
    """A message over ``max_message_bytes`` whose headers could be read: answered 513."""


class LimitStartLineError(StartLineError, InputLimitExceeded):
    """A message past another limit of :class:`ParseLimits`; ``cause`` says which."""


def _answerable(exc: ParseError, partial: PartialMessage) -> StartLineError:
    if isinstance(exc, VersionNotSupported):
        return VersionStartLineError(exc, partial)
    if isinstance(exc, MessageTooLarge):
        return TooLargeStartLineError(exc, partial)
    if isinstance(exc, InputLimitExceeded):
        return LimitStartLineError(exc, partial)
    return StartLineError(exc, partial)


def _is_ascii_upper(text: str, literal: str) -> bool:
    """``text`` is ``literal`` in any ASCII case: str.upper() alone maps "\u017f" to "S"."""
    return text.isascii() and text.upper() == literal


def _is_status_line(line: str) -> bool:
    return _is_ascii_upper(line[:4], "SIP/")


# Header names as written (what precedes the colon) -> canonical name, for the names
# seen so far: most messages spell the same dozen names, and one dictionary lookup
# replaces the strip, the token check and the canonical lookup of each. Only valid
# names are kept, and no more than _MAX_NAMES of them, so that a sender making up
# names cannot grow it: past the bound, new names are just checked every time.
_NAMES: dict[str, str] = {}
_MAX_NAMES = 1024


def _header_name(raw: str) -> str:
    """The canonical name of a header name as written; ParseError if it is no token."""
    name = raw.rstrip(WS)
    if not is_token(name):
        raise ParseError("malformed header name")
    name = canonical_name(name)
    if len(_NAMES) < _MAX_NAMES:
        _NAMES[raw] = name
    return name


def _split_header_block(text: str) -> list[tuple[str, str]]:
    """Split the header block into (canonical name, value) pairs, unfolding continuations."""
    items: list[tuple[str, str]] = []
    names = _NAMES
    for line in text.split("\r\n"):
        if not line:
            continue
        if line[0] in WS:
            # RFC 3261 §7.3.1: a line starting with whitespace continues the previous one;
            # the line break and the whitespace around it become one SP.
            if not items:
                raise ParseError("continuation line before any header")
            cont = line.strip(WS)
            if cont:
                name, value = items[-1]
                items[-1] = (name, f"{value} {cont}" if value else cont)
            continue
        colon = line.find(":")
        if colon <= 0:
            raise ParseError("header line without a colon")
        raw = line[:colon]
        name = names.get(raw) or _header_name(raw)
        items.append((name, line[colon + 1 :].strip(WS)))
    return items


def _parse_start_line(line: str, headers: Headers, body: bytes) -> Request | Response:
    if _START_LINE_CTL.search(line):
        raise ParseError("control character in start line")
    if _is_status_line(line):
        # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase (RFC 3261 §7.2)
        version, sp1, rest = line.partition(" ")
        code, sp2, reason = rest.partition(" ")
        if not _is_ascii_upper(version, SIP_VERSION):
            raise VersionNotSupported(f"unsupported version {version[:16]!r}")
        if not sp1 or not sp2 or len(code) != 3 or not code.isdigit() or not code.isascii():
            raise ParseError("malformed status line")  # e.g. RFC 4475 §3.1.2.19 bigcode
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
        raise ParseError("Request-URI must not be enclosed in <>")  # RFC 4475 §3.1.2.7
    if not _is_ascii_upper(version, SIP_VERSION):
        if _is_status_line(version):
            raise VersionNotSupported(f"unsupported version {version[:16]!r}")
        raise ParseError("malformed request line")
    return Request(method, uri, headers, body)


def _read_head(head: bytes) -> tuple[str, str, Headers]:
    """Start line, header text and header fields of a header block (CRLFCRLF cut off)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise ParseError("header block is not UTF-8") from None
    # Lines end with CRLF; a bare CR or LF is neither a line end nor header text
    # (quoted-pair excludes them too), and two parsers could frame it differently.
    crlf = text.count("\r\n")
    if text.count("\r") != crlf or text.count("\n") != crlf:
        raise ParseError("bare CR or LF in the header block")
    line_end = text.find("\r\n")
    start_line = text if line_end < 0 else text[:line_end]
    header_text = "" if line_end < 0 else text[line_end + 2 :]
    return start_line, header_text, Headers(_split_header_block(header_text))


def parse_message(
    data: bytes, *, stream: bool = False, limits: ParseLimits = DEFAULT_LIMITS
) -> Request | Response:
    """Parse one SIP message.

    ``data`` is a whole datagram, or one frame cut by :class:`~proxy.sip.framing.StreamFramer`.
    On a datagram, bytes past Content-Length are discarded (RFC 3261 §18.3); a
    Content-Length larger than what arrived is an error (RFC 4475 §3.1.2.2). Raises
    only :class:`ParseError` (and its subclasses): :class:`StartLineError` once the
    header fields could be read, so that a request can still be answered; that includes
    a message past one of ``limits`` (see :class:`ParseLimits`).
    """
    oversized = len(data) > limits.max_message_bytes
    # RFC 3261 §7.5: CRLFs before the start line are ignored.
    start = 0
    while data.startswith(b"\r\n", start):
        start += 2
    # The header block is looked for within the size limit only, so that an oversized
    # message costs no more than one that fits: past it, it is refused unread.
    end = data.find(b"\r\n\r\n", start, limits.max_message_bytes)
    try:
        if end < 0:
            raise ParseError("no end of headers")
        start_line, header_text, headers = _read_head(data[start:end])
    except ParseError:
        if oversized:
            raise MessageTooLarge(f"message over {limits.max_message_bytes} bytes") from None
        raise
    body = data[end + 4 :]
    partial = PartialMessage(headers, not _is_status_line(start_line))
    try:
        if oversized:
            raise MessageTooLarge(f"message over {limits.max_message_bytes} bytes")
        check_limits(start_line, header_text, headers, partial.is_request, limits)
        cl_values = headers.get_all("Content-Length")
        if len(cl_values) > 1:
            raise ParseError("more than one Content-Length")  # RFC 4475 §3.3.3
        if cl_values:
            length = parse_uint(cl_values[0], "Content-Length", MAX_MESSAGE_SIZE)
            if length > len(body):
                raise ParseError("Content-Length larger than the message body")
            body = body[:length]
        elif stream:
            raise ParseError("Content-Length is required on stream transports")
        return _parse_start_line(start_line, headers, body)
    except ParseError as exc:
        raise _answerable(exc, partial) from None


def _check_via_version(via: Via) -> None:
    # parse_via reads any version, to answer a foreign request 505 at its Via; a SIP/2.0
    # message with a Via of another version is malformed (RFC 3261 §20.42).
    if via.version != "2.0":
        raise ParseError("unsupported Via protocol version")


def _check_single_valued(headers: Headers, names: frozenset[str]) -> None:
    seen: set[str] = set()
    for name, _ in headers:
        if name in names:
            if name in seen:
                raise ParseError(f"more than one {name} header")  # RFC 4475 §3.3.8
            seen.add(name)


def validate_request(req: Request) -> None:
    """Check what RFC 3261 §8.2/§16.3 need before a request is acted upon.

    Raises :class:`ParseError` (400) for missing or malformed mandatory header fields,
    duplicated single-valued fields (RFC 4475 §3.3.8), a CSeq method that does not
    match (§3.1.2.17), a malformed Date (§3.1.2.12), or a Request-URI carrying headers
    (RFC 3261 §19.1.1, RFC 4475 §3.1.2.11). An unknown Request-URI scheme parses (to an
    :class:`~proxy.sip.uri.AbsoluteUri`); the caller, which knows what it can route,
    answers 416 (:class:`~proxy.sip.errors.UnsupportedUriScheme`).
    """
    h = req.headers
    _check_single_valued(h, SINGLE_VALUED)
    for via in req.vias:  # every Via element must parse (RFC 4475 §3.1.2.1)
        _check_via_version(via)
    call_id = req.call_id
    if not call_id or " " in call_id or "\t" in call_id:
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
        _ = req.contact_addrs


_RESPONSE_SINGLE_VALUED = frozenset(["Call-ID", "CSeq", "From", "To"])


def validate_response(resp: Response) -> None:
    """Check the fields a proxy reads from a response (RFC 3261 §16.7)."""
    _check_single_valued(resp.headers, _RESPONSE_SINGLE_VALUED)
    _check_via_version(resp.top_via)
    _ = resp.cseq, resp.call_id, resp.from_, resp.to


def _has_tag(req: Request | PartialMessage, to_value: str) -> bool:
    try:
        # A request's To is parsed already (when it has one To: a malformed request may
        # have several, each answered with its own).
        if isinstance(req, Request) and req.headers.get("To") is to_value:
            return req.to.tag is not None
        return parse_name_addr(to_value).tag is not None
    except ParseError:
        # A request we answer because it is malformed: look for the text only.
        return ";tag=" in to_value.replace(" ", "").replace("\t", "").lower()


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
    100 Trying never gets one, and copies Timestamp instead (§8.2.6.1). Record-Route is
    copied into 101-299 responses (§12.1.1).
    """
    headers = Headers()
    for name, value in req.headers:
        if name in ("Via", "From", "Call-ID", "CSeq"):
            headers.add(name, value)
        elif name == "To":
            if to_tag and status != 100 and not _has_tag(req, value):
                value = f"{value};tag={to_tag}"
            headers.add(name, value)
        elif (name == "Record-Route" and 100 < status < 300) or (
            name == "Timestamp" and status == 100
        ):
            # §12.1.1: Record-Route goes into responses that can create a dialog;
            # §8.2.6.1: the 100 Trying echoes Timestamp.
            headers.add(name, value)
    for name, value in extra or ():
        headers.add(name, value)
    return Response(status, reason or REASONS.get(status, "Unknown"), headers, body)


def error_response(
    req: Request | PartialMessage, exc: SipError, *, to_tag: str | None = None
) -> Response:
    """The response an error of the SIP family asks for: its status, reason and headers."""
    return make_response(req, exc.status_code, exc.reason, to_tag=to_tag, extra=list(exc.headers))
