"""Cutting a TCP byte stream into SIP messages (RFC 3261 §18.3, RFC 5626 §3.5.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.errors import MessageTooLarge, ParseError
from proxy.sip.framing import (
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    Event,
    Frame,
    Ping,
    StreamFramer,
)
from proxy.sip.message import Request, parse_message


def options(n: int = 1, body: bytes = b"", *, length_header: str = "Content-Length") -> bytes:
    head = (
        "OPTIONS sip:proxy.example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/TCP 192.0.2.10:5060;branch=z9hG4bK{n}\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:proxy.example.com>\r\n"
        "From: <sip:alice@example.com>;tag=t\r\n"
        f"Call-ID: call-{n}\r\n"
        f"CSeq: {n} OPTIONS\r\n"
        f"{length_header}: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def frames(events: list[Event]) -> list[bytes]:
    return [e.data for e in events if isinstance(e, Frame)]


def feed_all(chunks: list[bytes]) -> tuple[list[Event], StreamFramer]:
    framer = StreamFramer()
    events: list[Event] = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events, framer


# --- Content-Length framing ------------------------------------------------------------------


def test_one_message_in_one_feed() -> None:
    msg = options(body=b"v=0\r\n")
    framer = StreamFramer()
    assert framer.feed(msg) == [Frame(msg)]
    assert framer.pending == 0
    parsed = parse_message(msg, stream=True)
    assert isinstance(parsed, Request) and parsed.body == b"v=0\r\n"


def test_body_is_cut_at_content_length_and_the_rest_kept() -> None:
    first, second = options(1, b"abc"), options(2)
    framer = StreamFramer()
    events = framer.feed(first + second[:10])
    assert events == [Frame(first)]
    assert framer.pending == 10
    assert framer.feed(second[10:]) == [Frame(second)]
    assert framer.pending == 0


def test_message_split_inside_the_headers_and_the_body() -> None:
    msg = options(body=b"0123456789" * 20)
    framer = StreamFramer()
    cut_in_head = msg.index(b"CSeq")
    cut_in_body = len(msg) - 50
    assert framer.feed(msg[:cut_in_head]) == []
    assert framer.pending == cut_in_head
    assert framer.feed(msg[cut_in_head:cut_in_body]) == []
    assert framer.feed(msg[cut_in_body:]) == [Frame(msg)]
    assert framer.pending == 0


def test_message_split_inside_the_blank_line() -> None:
    msg = options()
    cut = msg.index(b"\r\n\r\n") + 2
    events, framer = feed_all([msg[:cut], msg[cut:]])
    assert framer.pending == 0
    assert events == [Frame(msg)]


def test_byte_by_byte() -> None:
    msg = options(body=b"hello")
    events, framer = feed_all([msg[i : i + 1] for i in range(len(msg))])
    assert events == [Frame(msg)]
    assert framer.pending == 0


def test_several_messages_in_one_feed_come_out_in_order() -> None:
    msgs = [options(i, b"x" * i) for i in range(1, 6)]
    assert frames(StreamFramer().feed(b"".join(msgs))) == msgs


def test_compact_content_length() -> None:
    msg = options(body=b"abcd", length_header="l")
    tail = options(2)
    assert frames(StreamFramer().feed(msg + tail)) == [msg, tail]


def test_content_length_name_is_case_insensitive() -> None:
    msg = options(body=b"abcd", length_header="content-LENGTH")
    assert frames(StreamFramer().feed(msg)) == [msg]


def test_zero_length_body() -> None:
    msg = options()
    assert msg.endswith(b"Content-Length: 0\r\n\r\n")
    assert StreamFramer().feed(msg) == [Frame(msg)]


def test_folded_line_is_not_a_content_length_header() -> None:
    # "Subject: hi\r\n Content-Length: 0" is one Subject field (RFC 3261 §7.3.1). Were
    # the framer to take it for the length, the body would become the next "message".
    msg = options(body=b"0123456789").replace(
        b"Max-Forwards", b"Subject: hi\r\n Content-Length: 0\r\nMax-Forwards"
    )
    framer = StreamFramer()
    assert frames(framer.feed(msg)) == [msg]
    assert framer.pending == 0
    parsed = parse_message(msg, stream=True)
    assert parsed.body == b"0123456789"
    assert parsed.headers.get("Subject") == "hi Content-Length: 0"


def test_folded_content_length_value() -> None:
    msg = options(body=b"abc").replace(b"Content-Length: 3", b"Content-Length:\r\n 3")
    tail = options(2)
    assert frames(StreamFramer().feed(msg + tail)) == [msg, tail]
    assert parse_message(msg, stream=True).body == b"abc"


def test_missing_content_length_is_refused_on_a_stream() -> None:
    # RFC 3261 §18.3: on a stream the length is the only way to find the message end.
    msg = options().replace(b"Content-Length: 0\r\n", b"")
    with pytest.raises(ParseError, match="Content-Length"):
        StreamFramer().feed(msg)


@pytest.mark.parametrize("value", ["-1", "abc", "1 2", "0x10", ""])
def test_malformed_content_length_is_refused(value: str) -> None:
    msg = options().replace(b"Content-Length: 0", f"Content-Length: {value}".encode())
    with pytest.raises(ParseError):
        StreamFramer().feed(msg)


# --- keep-alives (RFC 5626 §3.5.1) -------------------------------------------------------------


def test_double_crlf_is_a_ping() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n\r\n") == [Ping()]
    assert framer.pending == 0


def test_ping_split_across_feeds() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\r\n") == []
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n") == [Ping()]
    assert framer.pending == 0


@pytest.mark.parametrize("keepalive", [b"\r\n", b"\r\n\r\n\r\n"])
def test_lone_crlf_keepalive_is_not_a_partial_message(keepalive: bytes) -> None:
    # The transport gives a peer stuck half-way through a message a short timeout; a
    # phone sending single-CRLF keep-alives is idle, not stuck.
    framer = StreamFramer()
    framer.feed(keepalive)
    assert framer.pending == 0
    msg = options()
    assert frames(framer.feed(msg)) == [msg]


def test_pings_between_messages() -> None:
    a, b = options(1), options(2)
    events = StreamFramer().feed(b"\r\n\r\n" + a + b"\r\n\r\n\r\n\r\n" + b)
    assert events == [Ping(), Frame(a), Ping(), Ping(), Frame(b)]


def test_single_crlf_before_a_message_is_skipped() -> None:
    # A pong (or a stray CRLF, RFC 3261 §7.5) before the next message is not a ping.
    msg = options()
    assert StreamFramer().feed(b"\r\n" + msg) == [Frame(msg)]


def test_crlf_inside_a_body_is_not_a_ping() -> None:
    msg = options(body=b"\r\n\r\n\r\n\r\n")
    assert StreamFramer().feed(msg) == [Frame(msg)]


@pytest.mark.parametrize("junk", [b"\n", b"\n\n", b"\r\r\n\r\n", b"\r\n\n"])
def test_stray_line_breaks_are_refused(junk: bytes) -> None:
    with pytest.raises(ParseError):
        StreamFramer().feed(junk + options())


# --- bounds --------------------------------------------------------------------------------


def test_header_block_without_end_is_refused_once_too_large() -> None:
    framer = StreamFramer()
    head = b"OPTIONS sip:x SIP/2.0\r\n"
    assert framer.feed(head) == []
    # Headers that never end: the framer must not buffer them forever.
    with pytest.raises(MessageTooLarge):
        for _ in range(MAX_HEADER_BYTES // 64 + 2):
            framer.feed(b"X-Filler: " + b"a" * 52 + b"\r\n")
    assert framer.pending <= MAX_HEADER_BYTES + 64


def test_complete_header_block_too_large_is_refused() -> None:
    filler = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 60) for i in range(300))
    assert len(filler) > MAX_HEADER_BYTES
    msg = options().replace(b"Max-Forwards", filler + b"Max-Forwards")
    with pytest.raises(MessageTooLarge):
        StreamFramer().feed(msg)


def test_message_over_64_kib_is_refused_before_its_body_arrives() -> None:
    body_length = MAX_MESSAGE_BYTES  # with the headers, more than 64 KiB
    head = options().replace(b"Content-Length: 0", f"Content-Length: {body_length}".encode())
    framer = StreamFramer()
    with pytest.raises(ParseError):
        framer.feed(head)  # refused on the header alone: no 64 KiB buffered


def test_message_just_under_the_limit_is_framed() -> None:
    head_size = len(options())
    body = b"x" * (MAX_MESSAGE_BYTES - head_size - 8)
    msg = options(body=body)
    assert len(msg) <= MAX_MESSAGE_BYTES
    assert frames(StreamFramer().feed(msg)) == [msg]


def test_message_just_over_the_limit_is_refused() -> None:
    head_size = len(options())
    body = b"x" * (MAX_MESSAGE_BYTES - head_size + 8)
    msg = options(body=body)
    assert len(msg) > MAX_MESSAGE_BYTES
    with pytest.raises(MessageTooLarge):
        StreamFramer().feed(msg)


def test_smaller_limits_can_be_configured() -> None:
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_message=200).feed(options(body=b"x" * 200))
    with pytest.raises(MessageTooLarge):
        StreamFramer(max_header=50).feed(options())


# --- properties -----------------------------------------------------------------------------

_items = st.lists(
    st.one_of(
        st.just(b"\r\n\r\n"),
        st.builds(
            options,
            st.integers(min_value=1, max_value=999),
            st.binary(max_size=300),
        ),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(items=_items, data=st.data())
def test_any_split_of_the_stream_gives_the_same_events(
    items: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(items)
    cuts = sorted(data.draw(st.sets(st.integers(min_value=0, max_value=len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    events, framer = feed_all(chunks)
    expected: list[Event] = [Ping() if item == b"\r\n\r\n" else Frame(item) for item in items]
    assert events == expected
    assert framer.pending == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=5))
def test_arbitrary_bytes_frame_or_raise_parse_error(chunks: list[bytes]) -> None:
    framer = StreamFramer()
    try:
        for chunk in chunks:
            for event in framer.feed(chunk):
                assert isinstance(event, Frame | Ping)
    except ParseError:
        pass
    assert framer.pending <= sum(map(len, chunks))
