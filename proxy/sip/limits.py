"""Input limits of the parser: bounds on the work one message can cause, each a setting
with a clear answer (``errors.InputLimitExceeded`` and ``MessageTooLarge``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .errors import (
    HeaderLineTooLong,
    ParseError,
    RequestUriTooLong,
    TooManyHeaders,
    TooManyRoutes,
    TooManyVias,
)
from .headers import Headers

MAX_MESSAGE_SIZE = 65535  # the largest UDP payload; no limit may be set above it


class LimitSettings(Protocol):
    """Where the limits come from: ``proxy.config.Config`` has fields of these names."""

    @property
    def max_message_bytes(self) -> int: ...
    @property
    def max_headers(self) -> int: ...
    @property
    def max_header_line(self) -> int: ...
    @property
    def max_via(self) -> int: ...
    @property
    def max_route(self) -> int: ...


@dataclass(frozen=True, slots=True)
class ParseLimits:
    """Bounds on the work one message can cause; past each, a clear answer (errors.py).

    ``max_message_bytes``: the whole message (513 Message Too Large, RFC 3261 §21.5.14).
    ``max_headers``: header fields, after unfolding (400 Too Many Headers).
    ``max_header_line``: characters in one header field after unfolding, name included
    (400 Header Line Too Long), and in the request line (414 Request-URI Too Long).
    ``max_via``, ``max_route``: Via and Route *values*, comma-separated ones counted
    one by one (400 Too Many Via Headers / Too Many Route Headers).

    ``max_via`` defaults to 70, the Max-Forwards a UA starts with (§8.1.1.6): a request
    that went through that many proxies carries as many Vias, and RFC 4475 §3.1.1.7
    (longreq), which every element must accept, carries 34.
    """

    max_message_bytes: int = MAX_MESSAGE_SIZE
    max_headers: int = 128
    max_header_line: int = 8192
    max_via: int = 70
    max_route: int = 32

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_headers", "max_header_line", "max_via",
                     "max_route"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_message_bytes > MAX_MESSAGE_SIZE:
            raise ValueError(f"max_message_bytes must not be above {MAX_MESSAGE_SIZE}")

    @classmethod
    def from_values(cls, settings: LimitSettings) -> ParseLimits:
        """The limits of the same names in ``settings`` (``ParseLimits.from_values(config)``)."""
        return cls(
            max_message_bytes=settings.max_message_bytes,
            max_headers=settings.max_headers,
            max_header_line=settings.max_header_line,
            max_via=settings.max_via,
            max_route=settings.max_route,
        )


DEFAULT_LIMITS = ParseLimits()


def _values_over(headers: Headers, name: str, limit: int) -> bool:
    """More than ``limit`` values of the list header ``name``, comma-separated ones counted."""
    lines = headers.get_all(name)
    # Lines plus commas bound the count from above; split (quotes, <>) only when needed.
    if len(lines) + sum(v.count(",") for v in lines) <= limit:
        return False
    return len(headers.values(name)) > limit


def check_limits(
    start_line: str, header_text: str, headers: Headers, is_request: bool, limits: ParseLimits
) -> None:
    # Each check first looks at a bound computed on the whole header text (C-speed), so
    # that an ordinary message pays almost nothing for them.
    if len(headers) > limits.max_headers:
        raise TooManyHeaders(f"more than {limits.max_headers} header fields")
    if len(header_text) > limits.max_header_line and (
        max(len(n) + len(v) for n, v in headers) + 2 > limits.max_header_line  # name ": " value
    ):
        raise HeaderLineTooLong(f"a header field longer than {limits.max_header_line}")
    if len(start_line) > limits.max_header_line:
        if is_request:
            raise RequestUriTooLong(f"request line longer than {limits.max_header_line}")
        raise ParseError("status line too long")
    values_bound = len(headers) + header_text.count(",")
    if values_bound > limits.max_via and _values_over(headers, "Via", limits.max_via):
        raise TooManyVias(f"more than {limits.max_via} Via values")
    if values_bound > limits.max_route and _values_over(headers, "Route", limits.max_route):
        raise TooManyRoutes(f"more than {limits.max_route} Route values")
