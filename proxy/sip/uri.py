"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966), plus opaque absolute URIs.

``parse_uri`` validates the characters of each part, so a URI with embedded spaces,
brackets or stray quotes is a :class:`ParseError`; any other scheme parses to an
:class:`AbsoluteUri` so that header fields naming unknown schemes stay acceptable
(RFC 4475 §3.3.4).
"""

from __future__ import annotations

import ipaddress
import re
import string
from dataclasses import dataclass, replace
from urllib.parse import unquote as _pct_unquote

from .errors import ParseError
from .grammar import Params, get_param

_ALPHA = frozenset(string.ascii_letters)
_SCHEME_CHARS = _ALPHA | frozenset(string.digits + "+-.")
_HEX = frozenset(string.hexdigits)
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-_.!~*'()")
_USER_CHARS = _UNRESERVED | frozenset("%&=+$,;?/")
_PASSWORD_CHARS = _UNRESERVED | frozenset("%&=+$,")
_PARAM_CHARS = _UNRESERVED | frozenset("%[]/:&+$")
_HEADER_CHARS = _UNRESERVED | frozenset("%[]/?:+$=&")
_HOSTNAME_CHARS = frozenset(string.ascii_letters + string.digits + "-.")
_IPV6_CHARS = frozenset(string.hexdigits + ":.")
# Characters allowed in an opaque URI: any visible ASCII but the ones that delimit a URI
# inside a SIP header field (brackets, quotes) and no whitespace.
_OPAQUE_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F)) - frozenset('<>"')


def _check_escapes(text: str, what: str) -> None:
    i = text.find("%")
    while i >= 0:
        pair = text[i + 1 : i + 3]
        if len(pair) != 2 or not all(h in _HEX for h in pair):
            raise ParseError(f"bad %-escape in URI {what}")
        i = text.find("%", i + 3)


def _check_chars(text: str, allowed: frozenset[str], what: str) -> None:
    if not allowed.issuperset(text):
        bad = next(c for c in text if c not in allowed)
        raise ParseError(f"invalid character {bad!r} in URI {what}")
    if "%" in text:
        _check_escapes(text, what)


def _ipv6_reference(ref: str) -> str:
    """Check ``[IPv6address]`` (RFC 3261 §25.1 IPv6reference); return it as written."""
    inner = ref[1:-1]
    if ":" not in inner or not _IPV6_CHARS.issuperset(inner):
        raise ParseError("malformed IPv6 reference")
    try:
        ipaddress.IPv6Address(inner)
    except ValueError:
        raise ParseError("malformed IPv6 reference") from None
    return ref


def parse_port(text: str) -> int:
    """A port number, 1-65535 (leading zeros allowed)."""
    # Length first: int() of a few thousand digits is slow, and raises ValueError past
    # sys.get_int_max_str_digits().
    if not text.isascii() or not text.isdigit():
        raise ParseError("malformed port")
    digits = text.lstrip("0")
    if len(digits) > 5:
        raise ParseError("port out of range")
    port = int(digits or "0")
    if not 0 < port < 65536:
        raise ParseError("port out of range")
    return port


def parse_host(text: str) -> tuple[str, int | None]:
    """Parse ``host [":" port]``; hosts are returned as written (compare lower-cased)."""
    if not text:
        raise ParseError("empty host")
    if text[0] == "[":
        end = text.find("]")
        if end < 0:
            raise ParseError("unterminated IPv6 reference")
        host = _ipv6_reference(text[: end + 1])
        rest = text[end + 1 :]
    else:
        host, sep, port_text = text.partition(":")
        rest = sep + port_text
        if not host or not _HOSTNAME_CHARS.issuperset(host):
            raise ParseError(f"malformed host {host[:40]!r}")
    if not rest:
        return host, None
    if rest[0] != ":":
        raise ParseError("malformed port")
    return host, parse_port(rest[1:])


@dataclass(frozen=True, slots=True)
class SipUri:
    scheme: str  # "sip" or "sips", lower case
    user: str | None
    host: str
    port: int | None = None
    params: Params = ()
    headers: str | None = None  # the raw text after "?"
    password: str | None = None

    def param(self, name: str) -> str | None:
        return get_param(self.params, name)

    @property
    def transport(self) -> str:
        """The transport this URI asks for, lower case (``udp`` when unspecified)."""
        t = self.param("transport")
        if t:
            return t.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def lr(self) -> bool:
        return self.param("lr") is not None

    def with_params(self, params: Params) -> SipUri:
        return replace(self, params=params)

    def __str__(self) -> str:
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(self.host)
        if self.port is not None:
            out.append(f":{self.port}")
        for k, v in self.params:
            out.append(f";{k}" if v is None else f";{k}={v}")
        if self.headers is not None:
            out.append("?" + self.headers)
        return "".join(out)


@dataclass(frozen=True, slots=True)
class TelUri:
    number: str  # e.g. "+14085551234"
    params: Params = ()

    scheme = "tel"

    def __str__(self) -> str:
        return (
            "tel:"
            + self.number
            + "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params)
        )


@dataclass(frozen=True, slots=True)
class AbsoluteUri:
    scheme: str
    opaque: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.opaque}"


Uri = SipUri | TelUri | AbsoluteUri


def _split_params(text: str, allowed: frozenset[str]) -> Params:
    params: list[tuple[str, str | None]] = []
    for item in text.split(";"):
        name, eq, value = item.partition("=")
        if not name:
            raise ParseError("empty URI parameter")
        _check_chars(name, allowed, "parameter")
        if eq:
            if not value:
                raise ParseError(f"URI parameter {name!r} has an empty value")
            _check_chars(value, allowed, "parameter")
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


# The SIP URI most messages carry: [user "@"] hostname-or-IPv4 [":" port] [";" params],
# with no password, no %-escapes, no headers and no other "@". The classes are subsets
# of the ones parse_sip_uri checks (the user's: _USER_CHARS but "%"), so a match means
# the checks it skips would pass; the parameters are split and checked as there.
_COMMON_SIP = re.compile(
    r"(?:([A-Za-z0-9\-_.!~*'()&=+$,;?/]+)@)?([A-Za-z0-9\-.]+)(?::([0-9]+))?(?:;([^?@]*))?"
).fullmatch


def parse_sip_uri(scheme: str, rest: str) -> SipUri:
    m = _COMMON_SIP(rest)
    if m is None:
        return _scan_sip_uri(scheme, rest)
    user, host, digits, ptext = m.groups()
    port = None if digits is None else parse_port(digits)
    params = () if ptext is None else _split_params(ptext, _PARAM_CHARS)
    return SipUri(scheme, user, host, port, params)


def _scan_sip_uri(scheme: str, rest: str) -> SipUri:
    user: str | None = None
    password: str | None = None
    at = rest.find("@")
    if at >= 0:
        userinfo = rest[:at]
        rest = rest[at + 1 :]
        user, colon, pw = userinfo.partition(":")
        if not user:
            raise ParseError("empty user part")
        _check_chars(user, _USER_CHARS, "user")
        if colon:
            _check_chars(pw, _PASSWORD_CHARS, "password")
            password = pw
    headers: str | None = None
    q = rest.find("?")
    if q >= 0:
        headers = rest[q + 1 :]
        rest = rest[:q]
        _check_chars(headers, _HEADER_CHARS, "headers")
    hostport, semi, ptext = rest.partition(";")
    host, port = parse_host(hostport)
    params = _split_params(ptext, _PARAM_CHARS) if semi else ()
    return SipUri(scheme, user, host, port, params, headers, password)


def parse_uri(text: str) -> Uri:
    if text.startswith("sip:"):  # most URIs: the scheme's checks below would pass
        return parse_sip_uri("sip", text[4:])
    colon = text.find(":")
    if colon <= 0 or text[0] not in _ALPHA or not _SCHEME_CHARS.issuperset(text[:colon]):
        raise ParseError(f"not a URI: {text[:40]!r}")
    scheme = text[:colon].lower()
    rest = text[colon + 1 :]
    if scheme in ("sip", "sips"):
        return parse_sip_uri(scheme, rest)
    if not rest or not _OPAQUE_CHARS.issuperset(rest):
        raise ParseError(f"malformed {scheme} URI")
    if scheme == "tel":
        number, semi, ptext = rest.partition(";")
        if not number:
            raise ParseError("empty tel number")
        return TelUri(number, _split_params(ptext, _PARAM_CHARS) if semi else ())
    return AbsoluteUri(scheme, rest)


def unescape(text: str) -> str:
    """Resolve every %-escape (invalid UTF-8 becomes lone surrogates: surrogateescape)."""
    return _pct_unquote(text, errors="surrogateescape") if "%" in text else text


# Characters a user part may carry unescaped (RFC 3261 §25.1 user).
_USER_PLAIN = _USER_CHARS - frozenset("%")


def normalize_escapes(text: str, plain: frozenset[str] = _USER_PLAIN) -> str:
    """The canonical spelling of %-escaped text (RFC 3261 §19.1.4: "%75" equals "u").

    Escapes of characters in ``plain`` are resolved; every other escape is kept, with
    upper-case hex digits. The result is still a valid URI part and plain ASCII.
    """
    if "%" not in text:
        return text
    out: list[str] = []
    i = 0
    while True:
        j = text.find("%", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        pair = text[j + 1 : j + 3]
        if len(pair) == 2 and _HEX.issuperset(pair):
            ch = chr(int(pair, 16))
            out.append(ch if ch in plain else "%" + pair.upper())
            i = j + 3
        else:  # not an escape (only possible in a URI built by hand)
            out.append("%")
            i = j + 1


def _normalize_host(host: str) -> str:
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            return host
    return host


def aor_of(uri: Uri, default_domain: str | None = None) -> str:
    """The normalized address-of-record of a URI: ``sip:user@host``.

    Lower-cased scheme and host (IPv6 in compressed form), ``sips`` folded into ``sip``,
    the user's %-escapes resolved where the character may appear plain (the rest kept,
    upper-cased: the AOR stays a valid ASCII URI), and no port, password, parameters or
    headers. A tel URI maps to its number at ``default_domain``. Raises
    :class:`ParseError` for URIs that cannot name an AOR.
    """
    if isinstance(uri, SipUri):
        host = _normalize_host(uri.host)
        if uri.user is None:
            return f"sip:{host}"
        return f"sip:{normalize_escapes(uri.user)}@{host}"
    if isinstance(uri, TelUri) and default_domain:
        return f"sip:{uri.number}@{default_domain.lower()}"
    raise ParseError(f"a {uri.scheme} URI does not name an address-of-record")
