"""Fuzz the stream framer: frame it, or raise ParseError; anything else is a bug.

The input is a TCP byte stream. It is fed to one StreamFramer whole, and to another in
pieces cut at points drawn from the input itself (so a crash reproduces from the saved
input alone), and for short inputs byte by byte. Any split must give the same frames,
pings and bytes pending, or the same refusal (tests/sip/test_framing.py states it for
valid streams; here it is checked on anything). Every frame must then parse as a stream
message or raise ParseError, with a body exactly as long as its Content-Length.
"""

from __future__ import annotations

import random
import zlib

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.sip.errors import ParseError
    from proxy.sip.framing import Event, Frame, StreamFramer
    from proxy.sip.message import ParseLimits, parse_message

from harness import run

BYTE_BY_BYTE = 512  # inputs up to this long are also fed byte by byte (quadratic)
SMALL = ParseLimits(max_message_bytes=1024)


def feed(chunks: list[bytes], limits: ParseLimits) -> tuple[list[Event], int] | None:
    """(events, bytes pending), or None when the framer refused the stream."""
    framer = StreamFramer(limits=limits)
    events: list[Event] = []
    try:
        for chunk in chunks:
            events += framer.feed(chunk)
    except ParseError:
        return None
    return events, framer.pending


def cuts(data: bytes) -> list[bytes]:
    rnd = random.Random(zlib.crc32(data))
    points = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(1, 12))))
    return [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


def check(data: bytes) -> None:
    if not data:
        return
    for limits in (ParseLimits(), SMALL):
        whole = feed([data], limits)
        splits = [cuts(data)]
        if len(data) <= BYTE_BY_BYTE:
            splits.append([data[i : i + 1] for i in range(len(data))])
        for chunks in splits:
            assert feed(chunks, limits) == whole, (len(chunks), whole)
        if whole is None:
            continue
        for event in whole[0]:
            if isinstance(event, Frame):
                assert len(event.data) <= limits.max_message_bytes
                try:
                    msg = parse_message(event.data, stream=True, limits=limits)
                except ParseError:
                    continue
                length = msg.headers.get("Content-Length")
                assert length is not None and int(length) == len(msg.body)


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    run(test_one_input)
