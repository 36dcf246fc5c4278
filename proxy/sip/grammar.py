"""Low-level RFC 3261 §25 grammar helpers: tokens, quoted strings, parameters, comma lists.

These work on already unfolded header values (``str``) and raise :class:`ParseError`.
They are small scanners over indices, so that no parse allocates more than the pieces it
returns; the runs of characters they skip are matched by regexes compiled once (C speed:
a loop over characters in Python cost more than all the rest of a header's parse).
"""

from __future__ import annotations

import re
import string

from .errors import ParseError

Params = tuple[tuple[str, str | None], ...]

WS = " \t"
ALNUM = frozenset(string.ascii_letters + string.digits)
# token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_CHARS = ALNUM | frozenset("-.!%*_+`'~")
# gen-value = token / host / quoted-string; a host adds ":" "[" "]" (IPv6 references).
GEN_VALUE_CHARS = TOKEN_CHARS | frozenset(":[]")

# The same sets as regex classes (ASCII ranges only, as above).
_TOKEN_CLASS = r"[A-Za-z0-9\-.!%*_+`'~]"
_GEN_VALUE_CLASS = r"[A-Za-z0-9\-.!%*_+`'~:\[\]]"
# quoted-string = DQUOTE *(qdtext / quoted-pair) DQUOTE, as scan_quoted reads it: any
# character but DQUOTE, backslash, CR and LF, or a backslash and any but CR and LF.
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_RUNS = {
    TOKEN_CHARS: re.compile(_TOKEN_CLASS + "*").match,
    GEN_VALUE_CHARS: re.compile(_GEN_VALUE_CLASS + "*").match,
}
# One generic-param with the SWS around SEMI and EQUAL, as parse_params reads it.
_PARAM = re.compile(
    rf"[ \t]*;[ \t]*({_TOKEN_CLASS}+)[ \t]*(?:=[ \t]*({_QUOTED}|{_GEN_VALUE_CLASS}+))?"
).match


def skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in WS:
        i += 1
    return i


def scan(s: str, i: int, chars: frozenset[str]) -> int:
    run = _RUNS.get(chars)
    if run is not None:
        return run(s, i).end()  # type: ignore[union-attr]  # "*" always matches
    n = len(s)
    while i < n and s[i] in chars:
        i += 1
    return i


def is_token(s: str) -> bool:
    return bool(s) and TOKEN_CHARS.issuperset(s)


def scan_quoted(s: str, i: int) -> int:
    """``s[i]`` is the opening quote; return the index just past the closing quote."""
    n = len(s)
    i += 1
    while i < n:
        c = s[i]
        if c == '"':
            return i + 1
        if c == "\\":
            # quoted-pair = "\" (%x00-09 / %x0B-0C / %x0E-7F)
            if i + 1 >= n or s[i + 1] in "\r\n":
                break
            i += 2
        elif c in "\r\n":
            break
        else:
            i += 1
    raise ParseError("unterminated quoted string")


def unquote(value: str) -> str:
    """The text of a quoted-string with quoted-pairs resolved; other text as is."""
    if len(value) < 2 or value[0] != '"':
        return value
    body = value[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            out.append(body[i + 1])
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_params(s: str, i: int) -> tuple[Params, int]:
    """Parse ``*( SEMI generic-param )`` from ``s[i:]``; return the params and the end index.

    LWS is allowed around ";" and "=" (SEMI and EQUAL are SWS-padded in RFC 3261 §25.1).
    """
    # One regex match per parameter. Where it stops short of a ";" or "=" the text is
    # malformed (or "=" has no value): the scanner below reads it again from the start
    # and raises with the precise reason.
    start = i
    params: list[tuple[str, str | None]] = []
    match = _PARAM(s, i)
    while match is not None:
        name, value = match.group(1, 2)
        params.append((name, value))
        i = match.end()
        match = _PARAM(s, i)
    i = skip_ws(s, i)
    if i < len(s) and s[i] in ";=":
        return _scan_params(s, start)
    return tuple(params), i


def _scan_params(s: str, i: int) -> tuple[Params, int]:
    params: list[tuple[str, str | None]] = []
    n = len(s)
    while True:
        i = skip_ws(s, i)
        if i >= n or s[i] != ";":
            return tuple(params), i
        i = skip_ws(s, i + 1)
        j = scan(s, i, TOKEN_CHARS)
        if j == i:
            raise ParseError("empty or malformed parameter name")
        name = s[i:j]
        i = skip_ws(s, j)
        value: str | None = None
        if i < n and s[i] == "=":
            i = skip_ws(s, i + 1)
            if i < n and s[i] == '"':
                j = scan_quoted(s, i)
            else:
                j = scan(s, i, GEN_VALUE_CHARS)
                if j == i:
                    raise ParseError(f"parameter {name!r} has an empty value")
            value = s[i:j]
            i = j
        params.append((name, value))


def format_params(params: Params) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params)


def get_param(params: Params, name: str) -> str | None:
    """Value of a parameter (names are case-insensitive); "" when present without value."""
    name = name.lower()
    for k, v in params:
        if k.lower() == name:
            return "" if v is None else v
    return None


def has_param(params: Params, name: str) -> bool:
    name = name.lower()
    return any(k.lower() == name for k, _ in params)


def first_element(value: str) -> str:
    """The first element of a comma-separated list header, scanning no further than needed.

    Commas inside quoted strings and inside ``<...>`` do not split (as in :func:`split_commas`).
    """
    comma = value.find(",")
    if comma < 0:
        return value.strip(WS)
    if '"' not in value[:comma] and "<" not in value[:comma]:
        return value[:comma].strip(WS)
    i = 0
    n = len(value)
    in_angle = False
    while i < n:
        c = value[i]
        if c == '"':
            i = scan_quoted(value, i)
            continue
        if c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            return value[:i].strip(WS)
        i += 1
    return value.strip(WS)


def split_commas(value: str) -> list[str]:
    """Split a header value on the commas that separate list elements.

    Commas inside quoted strings and inside ``<...>`` do not split. Empty elements are
    kept (as "") so that the caller can reject them: ``Via: a,,b`` is malformed.
    """
    if "," not in value:
        return [value.strip(WS)]
    parts: list[str] = []
    start = 0
    i = 0
    n = len(value)
    in_angle = False
    while i < n:
        c = value[i]
        if c == '"':
            i = scan_quoted(value, i)
            continue
        if c == "<":
            in_angle = True
        elif c == ">":
            in_angle = False
        elif c == "," and not in_angle:
            parts.append(value[start:i].strip(WS))
            start = i + 1
        i += 1
    parts.append(value[start:].strip(WS))
    return parts
