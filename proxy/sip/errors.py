"""Errors of the SIP core. Peer-caused errors carry the status code to answer with."""

from __future__ import annotations


class SipError(Exception):
    """Base of every error the SIP core raises."""

    status_code: int = 500
    reason: str = "Server Internal Error"


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


class UnsupportedUriScheme(SipError):
    status_code = 416
    reason = "Unsupported URI Scheme"


class BadExtension(SipError):
    """Proxy-Require (or Require, for requests we serve ourselves) names unknown options."""

    status_code = 420
    reason = "Bad Extension"

    def __init__(self, options: list[str]) -> None:
        super().__init__("unsupported extension(s): " + ", ".join(options))
        self.options = options


class TooManyHops(SipError):
    status_code = 483
    reason = "Too Many Hops"


class LoopDetected(SipError):
    status_code = 482
    reason = "Loop Detected"
