"""The cheapest answer to a new request: a 503 built from its raw bytes, unparsed.

Under overload (``proxy.overload``) a new out-of-dialog request is answered ``503
Service Unavailable`` with ``Retry-After`` (RFC 3261 §21.5.4, §20.33) before any other
work. Parsing it properly costs about 50 µs (bench/parse.py), most of what a small
request costs to serve, so :func:`shed` only splits the header lines and copies the five
a response must echo (§8.2.6.2: Via, From, To, Call-ID, CSeq), adding a To tag.

Everything else is not shed: responses, ACK and CANCEL (§17.2.1: never answered that
way; a CANCEL belongs to a transaction already accepted), and requests with a To tag,
which belong to a dialog (§12.2.2) and keep their priority. Those come back as
:attr:`Verdict.PASS` and go on to the full parser. What cannot be read as a request with
those five headers is :attr:`Verdict.DROP`: under overload there is no time to write a
400 for it.

A request with a made-up To tag passes, as any in-dialog request does: the per-source
flood limit, not this function, bounds what a single sender can make us do.
"""

from __future__ import annotations

import re
import zlib
from enum import Enum

__all__ = ["Verdict", "shed"]


class Verdict(Enum):
    PASS = "pass"  # not a new out-of-dialog request: handle it as usual
    DROP = "drop"  # not readable as a request: drop it


# Header names (and their compact forms, RFC 3261 §7.3.3) copied into the response.
_VIA, _FROM, _TO, _CALL_ID, _CSEQ = range(5)
_COPIED = {
    b"via": _VIA,
    b"v": _VIA,
    b"from": _FROM,
    b"f": _FROM,
    b"to": _TO,
    b"t": _TO,
    b"call-id": _CALL_ID,
    b"i": _CALL_ID,
    b"cseq": _CSEQ,
}
_NOT_SHED = frozenset({b"ACK", b"CANCEL"})
# tag-param = "tag" EQUAL token, EQUAL = SWS "=" SWS (§25.1), among the header's params.
_TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.IGNORECASE)
_STATUS_LINE = b"SIP/2.0 503 Service Unavailable\r\n"


def shed(data: bytes, retry_after: int) -> bytes | Verdict:
    """The 503 for the request in ``data`` if it is a new out-of-dialog request, or a
    :class:`Verdict` saying what to do with it instead."""
    if data.startswith(b"SIP/"):
        return Verdict.PASS  # a response
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[:end]
    lines = head.split(b"\r\n")
    start = lines[0].split(b" ")
    if len(start) != 3 or not start[2].startswith(b"SIP/"):
        return Verdict.DROP
    if start[0] in _NOT_SHED:
        return Verdict.PASS
    copied: list[bytes] = []
    seen = [0, 0, 0, 0, 0]
    to_at = -1
    keep = False  # whether the previous header line was copied (for folded lines)
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):  # §7.3.1 line folding: part of the line above
            if keep:
                copied[-1] += b"\r\n" + line
            continue
        name, colon, _value = line.partition(b":")
        if not colon:
            return Verdict.DROP
        kind = _COPIED.get(name.strip().lower())
        keep = kind is not None
        if kind is not None:
            seen[kind] += 1
            if kind == _TO:
                to_at = len(copied)
            copied.append(line)
    if not seen[_VIA] or seen[_FROM] != 1 or seen[_TO] != 1 or seen[1 + _TO :] != [1, 1]:
        return Verdict.DROP
    to_line = copied[to_at]
    value = to_line.partition(b":")[2]
    params = value[value.rfind(b">") + 1 :] if b"<" in value else value
    if _TAG.search(params):
        return Verdict.PASS  # in a dialog
    # §8.2.7: a stateless UAS gives a retransmission the same tag: derive it from the
    # request (the Via lines hold the branch, the Call-ID the call).
    tag = b"%08x" % zlib.crc32(b"".join(copied))
    copied[to_at] = to_line.rstrip(b" \t") + b";tag=" + tag
    return b"".join(
        (
            _STATUS_LINE,
            b"\r\n".join(copied),
            b"\r\nRetry-After: %d\r\nContent-Length: 0\r\n\r\n" % retry_after,
        )
    )
