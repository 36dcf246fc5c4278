"""Errors of the SIP core: one family, each error carrying the response it asks for.

Every error a request can cause is a :class:`SipError`. It carries the status code and
reason phrase to answer with, and any header that answer needs (``Retry-After``,
``Min-Expires``, ``Unsupported``), so that one place (``message.error_response``) turns
any of them into a response. Layers outside the core (the location stores, the DHT
adaptor) raise these too, at their boundary, so the proxy never maps foreign errors.
"""

from __future__ import annotations

from collections.abc import Sequence

Header = tuple[str, str]


class SipError(Exception):
    """Base of every error that is answered with a SIP response.

    ``status_code`` and ``reason`` default to the class's; a caller may give others
    (``SipError("no route", status_code=404, reason="Not Found")``). ``headers`` are
    extra header fields for the response.
    """

    status_code: int = 500
    reason: str = "Server Internal Error"

    def __init__(
        self,
        detail: str = "",
        *,
        status_code: int | None = None,
        reason: str | None = None,
        headers: Sequence[Header] = (),
    ) -> None:
        super().__init__(detail or reason or self.reason)
        if status_code is not None:
            self.status_code = status_code
        if reason is not None:
            self.reason = reason
        self._headers = tuple(headers)

    @property
    def headers(self) -> tuple[Header, ...]:
        """Extra header fields for the response (in addition to the copied ones)."""
        return self._headers


class ParseError(SipError):
    """The bytes are not a well-formed SIP message (RFC 3261 §7, §25)."""

    status_code = 400
    reason = "Bad Request"


class MessageTooLarge(ParseError):
    status_code = 513
    reason = "Message Too Large"


class VersionNotSupported(ParseError):
    status_code = 505
    reason = "Version Not Supported"


class InputLimitExceeded(ParseError):
    """The message is past one of the parser's limits (``message.ParseLimits``).

    RFC 3261 §20 sets none; these are a proxy's bounds on the work one message can cause.
    Each subclass's reason phrase says which limit, so that the sender can tell.
    """


class TooManyHeaders(InputLimitExceeded):
    reason = "Too Many Headers"


class HeaderLineTooLong(InputLimitExceeded):
    reason = "Header Line Too Long"


class RequestUriTooLong(InputLimitExceeded):
    """A request line past the header line limit: what makes one long is its URI."""

    status_code = 414
    reason = "Request-URI Too Long"


class TooManyVias(InputLimitExceeded):
    reason = "Too Many Via Headers"


class TooManyRoutes(InputLimitExceeded):
    reason = "Too Many Route Headers"


class UnsupportedUriScheme(SipError):
    status_code = 416
    reason = "Unsupported URI Scheme"


class BadExtension(SipError):
    """Proxy-Require (or Require, for requests we serve ourselves) names unknown options."""

    status_code = 420
    reason = "Bad Extension"

    def __init__(self, options: list[str]) -> None:
        super().__init__(
            "unsupported extension(s): " + ", ".join(options),
            headers=[("Unsupported", ", ".join(options))],
        )
        self.options = options


class TooManyHops(SipError):
    status_code = 483
    reason = "Too Many Hops"


class LoopDetected(SipError):
    status_code = 482
    reason = "Loop Detected"


class Forbidden(SipError):
    status_code = 403
    reason = "Forbidden"


class NotFound(SipError):
    status_code = 404
    reason = "Not Found"


class TemporarilyUnavailable(SipError):
    status_code = 480
    reason = "Temporarily Unavailable"


class IntervalTooBrief(SipError):
    """RFC 3261 §10.3 step 7: the 423 names the shortest interval we accept."""

    status_code = 423
    reason = "Interval Too Brief"

    def __init__(self, min_expires: int) -> None:
        super().__init__(headers=[("Min-Expires", str(min_expires))])
        self.min_expires = min_expires


class ServiceUnavailable(SipError):
    """A backend this request needs (the location store, the DHT) did not answer.

    The 503 carries ``Retry-After`` so that phones come back later instead of at once
    (RFC 3261 §21.5.4).
    """

    status_code = 503
    reason = "Service Unavailable"

    def __init__(
        self, detail: str = "", *, reason: str | None = None, retry_after: int = 5
    ) -> None:
        super().__init__(detail, reason=reason, headers=[("Retry-After", str(retry_after))])
        self.retry_after = retry_after
