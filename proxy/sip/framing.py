"""Cutting a byte stream (TCP) into SIP messages (RFC 3261 §18.3), without I/O.

Content-Length frames each message. Bare CRLFs between messages are keep-alives
(RFC 5626 §3.5.1): a double CRLF "ping" is answered with a single CRLF "pong".
Header blocks and bodies are bounded so that a peer cannot make us buffer forever: a
message over ``ParseLimits.max_message_bytes`` (the same limit the parser applies to a
datagram) ends the stream.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import MessageTooLarge, ParseError
from .headers import parse_uint
from .limits import DEFAULT_LIMITS, ParseLimits

MAX_HEADER_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    """The peer sent a CRLFCRLF keep-alive; answer with b"\\r\\n"."""


Event = Frame | Ping


class StreamFramer:
    """Frames of one stream. ``max_message`` defaults to ``limits.max_message_bytes``; the
    header block is bounded by ``max_header`` and never more than the message."""

    def __init__(
        self,
        max_header: int = MAX_HEADER_BYTES,
        max_message: int | None = None,
        *,
        limits: ParseLimits = DEFAULT_LIMITS,
    ) -> None:
        self._buf = bytearray()
        self._max_message = limits.max_message_bytes if max_message is None else max_message
        self._max_header = min(max_header, self._max_message)

    @property
    def pending(self) -> int:
        """Bytes of a partial message held (0 when idle between messages)."""
        # A lone CRLF (a pong, or the keep-alive some phones send) may still become a
        # ping; it is not the start of a message, so the connection is idle, not stalled.
        if b"\r\n\r\n".startswith(self._buf):
            return 0
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        """Add received bytes; return the complete messages and pings found.

        Raises :class:`ParseError` (or :class:`MessageTooLarge`) when the stream cannot be
        framed any more; the connection must then be closed.
        """
        self._buf += data
        events: list[Event] = []
        buf = self._buf
        while buf:
            # Leading CRLFs: keep-alives. "\r\n\r\n" is a ping; a lone "\r\n" is a pong.
            if buf[0] in (0x0D, 0x0A):
                if buf.startswith(b"\r\n\r\n"):
                    del buf[:4]
                    events.append(Ping())
                elif len(buf) < 4 and b"\r\n\r\n".startswith(buf):
                    break  # may still become a ping
                elif buf.startswith(b"\r\n"):
                    del buf[:2]  # a pong, or a CRLF before the next message
                else:
                    raise ParseError("stray line break in stream")
                continue
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self._max_header:
                    raise MessageTooLarge("header block too large")
                break
            if end > self._max_header:
                raise MessageTooLarge("header block too large")
            length = self._content_length(bytes(buf[:end]))
            total = end + 4 + length
            if total > self._max_message:
                raise MessageTooLarge("message too large")
            if len(buf) < total:
                break
            events.append(Frame(bytes(buf[:total])))
            del buf[:total]
        return events

    @staticmethod
    def _content_length(head: bytes) -> int:
        # Unfold first (RFC 3261 §7.3.1), as the parser does: a line starting with
        # whitespace continues the previous field and is never a header of its own.
        lines: list[bytes] = []
        for line in head.split(b"\r\n")[1:]:
            if line[:1] in (b" ", b"\t") and lines:
                lines[-1] += b" " + line.strip(b" \t")
            else:
                lines.append(line)
        for line in lines:
            name, sep, value = line.partition(b":")
            if sep and name.strip().lower() in (b"content-length", b"l"):
                try:
                    text = value.decode("ascii")
                except UnicodeDecodeError:
                    raise ParseError("malformed Content-Length") from None
                return parse_uint(text, "Content-Length", MAX_MESSAGE_BYTES)
        # RFC 3261 §18.3: on a stream, Content-Length MUST be present.
        raise ParseError("Content-Length is required on stream transports")
