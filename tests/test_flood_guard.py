"""proxy.flood.FloodGuard on a manual clock: windows, blocks, bounded tables, logging."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.flood import LOG_BURST, FloodGuard

A, B = "192.0.2.1", "198.51.100.7"


def send(guard: FloodGuard, host: str, n: int, now: float) -> list[bool]:
    return [guard.admit(host, now) for _ in range(n)]


def test_up_to_the_limit_in_a_window_is_admitted() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    assert send(guard, A, 5, now=100.0) == [True] * 5
    assert guard.blocks == 0 and guard.dropped == 0


def test_one_over_the_limit_blocks_the_source_for_the_block_time() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    send(guard, A, 5, now=100.0)
    assert guard.admit(A, 100.5) is False
    assert guard.blocks == 1
    assert guard.blocked(A, 100.5)
    # Everything it sends while blocked is dropped and counted, at any rate.
    assert send(guard, A, 1000, now=129.9) == [False] * 1000
    assert guard.dropped == 1001
    assert guard.blocks == 1  # one block, however much it sends during it
    assert guard.blocked_sources(129.9) == [(A, 1001)]
    # The block ends: the source starts again from zero.
    assert guard.blocked(A, 130.4)
    assert not guard.blocked(A, 130.5)
    assert send(guard, A, 5, now=130.5) == [True] * 5
    assert guard.dropped == 1001  # blocks that ended still count
    assert guard.blocked_sources(130.5) == []


def test_a_source_that_keeps_flooding_is_blocked_again_within_one_window() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    send(guard, A, 6, now=0.0)
    assert send(guard, A, 6, now=30.0) == [True] * 5 + [False]
    assert guard.blocks == 2


def test_the_count_starts_over_in_each_window() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    for second in range(0, 100, 2):  # 5 per 2 s, for 100 s: never too many
        assert send(guard, A, 5, now=float(second)) == [True] * 5
    assert guard.blocks == 0


def test_other_sources_are_not_affected_by_a_blocked_one() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    send(guard, A, 100, now=0.0)
    assert guard.blocked(A, 0.0)
    assert send(guard, B, 5, now=0.1) == [True] * 5
    assert not guard.blocked(B, 0.1)


def test_exempt_addresses_are_never_blocked() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    guard.exempt.add(A)
    assert all(send(guard, A, 1000, now=0.0))
    assert guard.blocks == 0


def test_tick_sweeps_expired_windows_and_blocks() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0)
    guard.admit(B, 0.0)
    send(guard, A, 6, now=0.0)
    assert guard.sources == 1  # B counting; A blocked
    guard.tick(1.0)
    assert guard.sources == 1
    guard.tick(2.0)
    assert guard.sources == 0
    assert guard.blocked_sources(29.0) == [(A, 1)]
    guard.tick(30.0)
    assert guard.blocked_sources(30.0) == []
    assert guard.dropped == 1


def test_the_table_of_sources_is_bounded() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0, max_sources=100)
    for i in range(10_000):  # a spoofed flood: every datagram from a new address
        assert guard.admit(f"10.0.{i // 256}.{i % 256}", now=i * 0.0001)
        assert guard.sources <= 100


def test_a_full_table_drops_expired_windows_before_live_ones() -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0, max_sources=3)
    guard.admit("old1", 0.0)
    guard.admit("old2", 0.0)
    send(guard, A, 5, now=2.5)  # A's window is live
    guard.admit("new", 3.0)  # full: old1 and old2 expired, so they go; A stays
    assert guard.admit(A, 3.0) is False  # A's sixth in its window still counts


def test_the_table_of_blocked_sources_is_bounded_and_never_lifts_a_live_block_early() -> None:
    guard = FloodGuard(max_requests=1, window=2.0, block_time=30.0, max_sources=10)
    for i in range(10):
        send(guard, f"10.0.0.{i}", 2, now=float(i))
    assert len(guard.blocked_sources(10.0, limit=100)) == 10
    send(guard, "10.0.1.1", 2, now=11.0)  # an eleventh: the first block (ends first) goes
    blocked = {h for h, _ in guard.blocked_sources(11.0, limit=100)}
    assert len(blocked) == 10 and "10.0.0.0" not in blocked and "10.0.1.1" in blocked


def test_one_log_line_per_block_and_a_summary_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0, log_interval=60.0)
    guard.tick(0.0)
    with caplog.at_level(logging.WARNING, logger="proxy.flood"):
        send(guard, A, 100_000, now=1.0)
        for t in range(2, 60):
            guard.tick(float(t))
        lines = [r.getMessage() for r in caplog.records]
        assert lines == ["flood: blocking 192.0.2.1 for 30 s: more than 5 messages in 2 s"]
        guard.tick(60.0)
        summary = caplog.records[-1].getMessage()
    assert "99995 message(s) dropped and 1 block(s) in the last 60 s" in summary
    assert summary.endswith("0 source(s) blocked now; most dropped: 192.0.2.1 (99995)")


def test_block_lines_are_limited_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    guard = FloodGuard(max_requests=1, window=2.0, block_time=30.0, log_interval=60.0)
    with caplog.at_level(logging.WARNING, logger="proxy.flood"):
        for i in range(100):
            send(guard, f"10.0.0.{i}", 2, now=0.0)
        assert len(caplog.records) == LOG_BURST
        guard.tick(60.0)
    assert "100 block(s)" in caplog.records[-1].getMessage()


def test_no_summary_when_nothing_was_dropped(caplog: pytest.LogCaptureFixture) -> None:
    guard = FloodGuard(max_requests=5, window=2.0, block_time=30.0, log_interval=60.0)
    with caplog.at_level(logging.WARNING, logger="proxy.flood"):
        for t in range(0, 300):
            guard.admit(A, float(t))
            guard.tick(float(t))
    assert caplog.records == []


@pytest.mark.parametrize(
    "kw",
    [
        {"max_requests": 0, "window": 1.0, "block_time": 1.0},
        {"max_requests": 1, "window": 0.0, "block_time": 1.0},
        {"max_requests": 1, "window": 1.0, "block_time": 0.0},
        {"max_requests": 1, "window": 1.0, "block_time": 1.0, "max_sources": 0},
    ],
)
def test_nonsense_limits_are_refused(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FloodGuard(**kw)  # type: ignore[arg-type]


class Model:
    """What FloodGuard decides, without its bounded, ordered tables."""

    def __init__(self, max_requests: int, window: float, block_time: float) -> None:
        self.max_requests, self.window, self.block_time = max_requests, window, block_time
        self.windows: dict[str, tuple[float, int]] = {}
        self.blocked: dict[str, float] = {}

    def admit(self, host: str, now: float) -> bool:
        if now < self.blocked.get(host, float("-inf")):
            return False
        start, count = self.windows.get(host, (float("-inf"), 0))
        if now - start >= self.window:
            start, count = now, 0
        count += 1
        self.windows[host] = (start, count)
        if count <= self.max_requests:
            return True
        self.blocked[host] = now + self.block_time
        del self.windows[host]
        return False


events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.floats(min_value=0.0, max_value=1.5),  # time step before the event
        st.booleans(),  # tick first
    ),
    max_size=300,
)


@given(events)
def test_decisions_match_the_model_and_ticks_change_none(
    seq: list[tuple[str, float, bool]],
) -> None:
    guard = FloodGuard(max_requests=3, window=2.0, block_time=5.0, max_sources=10)
    model = Model(3, 2.0, 5.0)
    now = 0.0
    for host, step, tick in seq:
        now += step
        if tick:
            guard.tick(now)
        assert guard.admit(host, now) == model.admit(host, now), (host, now)
        assert guard.sources <= 4
    blocked_now = {h for h, until in model.blocked.items() if now < until}
    assert {h for h, _ in guard.blocked_sources(now, limit=10)} == blocked_now
