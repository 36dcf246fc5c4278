"""A proxied request's branches (RFC 3261 §16.6-§16.10), driven by a manual clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.fork import (
    STALE_STATUSES,
    BranchState,
    CancelBranch,
    Fork,
    ForkError,
    ForkOutput,
    HoldFinal,
    SendUpstream,
    StaleTarget,
    StartBranch,
    make_cancel,
)
from proxy.sip.message import Request, Response, make_response, parse_message, validate_request

TIMER_C = 180.0
START = 100.0  # not 0, so that absolute and relative times cannot be confused
UPSTREAM_VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcaller"


def received(method: str = "INVITE") -> Request:
    """The request as it reached the proxy."""
    text = (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: {UPSTREAM_VIA}\r\n"
        "Max-Forwards: 70\r\n"
        "To: Bob <sip:bob@example.com>\r\n"
        "From: Alice <sip:alice@example.org>;tag=a1\r\n"
        "Call-ID: fork-1@192.0.2.10\r\n"
        f"CSeq: 7 {method}\r\n"
        "Contact: <sip:alice@192.0.2.10>\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def forwarded(req: Request, i: int) -> Request:
    """Branch ``i``'s copy: a new Request-URI, our Via on top, a Route to the next hop."""
    fwd = req.copy()
    fwd.uri = f"sip:bob@192.0.2.{20 + i}"
    fwd.headers.prepend("Via", f"SIP/2.0/UDP proxy.example.com;branch=z9hG4bKfork{i}")
    fwd.headers.set("Max-Forwards", "69")
    fwd.headers.add("Route", f"<sip:edge{i}.example.com;lr>")
    return fwd


def make_fork(
    n: int = 2, method: str = "INVITE", *, retry_stale: bool = False
) -> tuple[Fork, list[Request]]:
    """A fork of ``n`` branches, started at START."""
    req = received(method)
    branches = [forwarded(req, i) for i in range(n)]
    fork = Fork(req, branches, timer_c=TIMER_C, retry_stale=retry_stale)
    assert fork.start(START) == [StartBranch(i, b) for i, b in enumerate(branches)]
    return fork, branches


def resp(branch: Request, status: int, tag: str = "callee") -> Response:
    """A downstream response to a branch: it still carries our Via on top."""
    return make_response(branch, status, to_tag=tag)


def up(outs: Sequence[ForkOutput]) -> list[int]:
    """The statuses sent upstream."""
    return [o.response.status for o in outs if isinstance(o, SendUpstream)]


def cancels(outs: Sequence[ForkOutput]) -> list[int]:
    return [o.index for o in outs if isinstance(o, CancelBranch)]


def stale(outs: Sequence[ForkOutput]) -> list[tuple[int, int]]:
    return [(o.index, o.status) for o in outs if isinstance(o, StaleTarget)]


# --- start ---------------------------------------------------------------------------------


def test_start_forwards_every_branch_and_arms_timer_c_for_invite() -> None:
    fork, _ = make_fork(3)
    assert fork.get_timer() == START + TIMER_C
    assert [fork.state(i) for i in range(3)] == [BranchState.CALLING] * 3
    assert not fork.done and not fork.cancelled and fork.held is None


def test_misuse_raises() -> None:
    req = received()
    with pytest.raises(ValueError):
        Fork(req, [], timer_c=TIMER_C)
    with pytest.raises(ValueError):
        Fork(req, [forwarded(req, 0)], timer_c=0)
    fork = Fork(req, [forwarded(req, 0)], timer_c=TIMER_C)
    with pytest.raises(ForkError):
        fork.receive_response(0, resp(forwarded(req, 0), 180), START)
    with pytest.raises(ForkError):
        fork.handle_timer(START)
    fork.start(START)
    with pytest.raises(ForkError):
        fork.start(START)
    for index in (-1, 1):
        with pytest.raises(ForkError):
            fork.receive_response(index, resp(forwarded(req, 0), 180), START)
        with pytest.raises(ForkError):
            fork.branch_timeout(index, START)


# --- Timer C (§16.8) -------------------------------------------------------------------------


def test_timer_c_without_a_provisional_is_a_408_upstream() -> None:
    fork, _ = make_fork(1)
    deadline = START + TIMER_C
    assert fork.handle_timer(deadline - 0.001) == []  # early: nothing happens
    out = fork.handle_timer(deadline)
    assert stale(out) == [(0, 408)]
    assert up(out) == [408]
    (sent,) = [o.response for o in out if isinstance(o, SendUpstream)]
    assert sent.headers.get_all("Via") == [UPSTREAM_VIA]
    assert cancels(out) == []
    assert fork.state(0) is BranchState.COMPLETED
    assert fork.get_timer() is None
    assert fork.done


def test_timer_c_after_a_180_cancels_and_the_487_goes_upstream() -> None:
    fork, (b0,) = make_fork(1)
    now = START + 10
    ringing = fork.receive_response(0, resp(b0, 180), now)
    assert up(ringing) == [180]
    (sent,) = [o.response for o in ringing if isinstance(o, SendUpstream)]
    assert sent.headers.get_all("Via") == [UPSTREAM_VIA]  # our Via is gone
    assert fork.get_timer() == now + TIMER_C  # re-armed by the 180
    assert fork.handle_timer(START + TIMER_C) == []  # the old deadline is gone
    out = fork.handle_timer(now + TIMER_C)
    assert out == [CancelBranch(0, make_cancel(b0))]
    assert fork.state(0) is BranchState.CANCELLING
    assert fork.get_timer() is None
    assert not fork.cancelled  # Timer C cancels a branch, not the request
    out = fork.receive_response(0, resp(b0, 487), now + TIMER_C + 0.1)
    assert up(out) == [487]
    assert fork.done


def test_only_provisionals_above_100_rearm_timer_c() -> None:
    fork, (b0, b1) = make_fork(2)
    assert fork.receive_response(0, resp(b0, 100), START + 5) == []
    assert fork.state(0) is BranchState.PROCEEDING
    assert fork.get_timer() == START + TIMER_C
    fork.receive_response(0, resp(b0, 183), START + 20)
    assert fork.get_timer() == START + TIMER_C  # branch 1's deadline is still the earliest
    fork.receive_response(1, resp(b1, 180), START + 30)
    assert fork.get_timer() == START + 20 + TIMER_C
    fork.receive_response(0, resp(b0, 180), START + 50)
    assert fork.get_timer() == START + 30 + TIMER_C
    assert up(fork.handle_timer(START + 30 + TIMER_C)) == []
    assert fork.get_timer() == START + 50 + TIMER_C
    out = fork.handle_timer(START + 50 + TIMER_C)
    assert cancels(out) == [0]
    assert fork.get_timer() is None


def test_a_100_alone_is_enough_for_timer_c_to_cancel() -> None:
    # RFC 3261 §16.8 asks whether the branch had *a* provisional; a 100 counts.
    fork, (b0,) = make_fork(1)
    fork.receive_response(0, resp(b0, 100), START + 1)
    assert cancels(fork.handle_timer(START + TIMER_C)) == [0]


def test_a_final_response_stops_its_timer_c() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(1, resp(b1, 180), START + 10)
    fork.receive_response(0, resp(b0, 486), START + 20)
    assert fork.get_timer() == START + 10 + TIMER_C
    fork.receive_response(1, resp(b1, 486), START + 30)
    assert fork.get_timer() is None


def test_any_input_fires_the_timers_already_due() -> None:
    fork, (_, b1) = make_fork(2)
    fork.receive_response(1, resp(b1, 180), START + 1)
    late = START + TIMER_C + 5  # branch 0's Timer C is overdue
    out = fork.receive_response(1, resp(b1, 183), late)
    assert up(out) == [183]
    assert stale(out) == [(0, 408)]
    assert fork.state(0) is BranchState.COMPLETED
    assert fork.get_timer() == late + TIMER_C


def test_timer_c_of_several_branches_fire_in_one_call() -> None:
    fork, (b0, _, _) = make_fork(3)
    fork.receive_response(0, resp(b0, 180), START + 1)
    out = fork.handle_timer(START + 2 * TIMER_C)
    assert cancels(out) == [0]
    assert stale(out) == [(1, 408), (2, 408)]
    assert up(out) == []  # branch 0 still owes its final response
    assert up(fork.receive_response(0, resp(b0, 487), START + 2 * TIMER_C)) == [408]


# --- CANCEL from upstream (§16.10) -----------------------------------------------------------


def test_cancel_at_once_if_it_rang_else_on_the_first_provisional() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 180), START + 1)
    out = fork.cancel(START + 2)
    assert out == [CancelBranch(0, make_cancel(b0))]
    assert fork.cancelled
    assert fork.state(1) is BranchState.CANCEL_WAITING
    # §9.1: branch 1 has not answered at all; its CANCEL waits for a provisional.
    out = fork.receive_response(1, resp(b1, 100), START + 3)
    assert out == [CancelBranch(1, make_cancel(b1))]
    assert up(fork.receive_response(0, resp(b0, 487), START + 4)) == []
    assert up(fork.receive_response(1, resp(b1, 487), START + 5)) == [487]
    assert fork.done


def test_a_provisional_that_triggers_the_cancel_is_still_forwarded() -> None:
    fork, (_, b1) = make_fork(2)
    fork.cancel(START + 1)
    out = fork.receive_response(1, resp(b1, 180), START + 2)
    assert [type(o) for o in out] == [CancelBranch, SendUpstream]
    assert out[0] == CancelBranch(1, make_cancel(b1))
    assert up(out) == [180]


def test_cancelled_branch_that_never_answers_ends_in_487() -> None:
    fork, _ = make_fork(1)
    assert fork.cancel(START + 1) == []
    out = fork.branch_timeout(0, START + 32)  # Timer B
    assert stale(out) == [(0, 408)]
    assert up(out) == [487]


def test_a_408_from_downstream_becomes_487_once_cancelled() -> None:
    fork, (b0,) = make_fork(1)
    fork.receive_response(0, resp(b0, 180), START + 1)
    fork.cancel(START + 2)
    out = fork.receive_response(0, resp(b0, 408), START + 3)
    assert up(out) == [487]
    (sent,) = [o.response for o in out if isinstance(o, SendUpstream)]
    assert sent.call_id == fork.request.call_id


def test_cancel_twice_sends_one_cancel_per_branch() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 180), START + 1)
    fork.receive_response(1, resp(b1, 486), START + 1)
    assert cancels(fork.cancel(START + 2)) == [0]
    assert fork.cancel(START + 3) == []


def test_timer_c_after_cancel_sends_no_second_cancel() -> None:
    fork, (b0,) = make_fork(1)
    fork.receive_response(0, resp(b0, 180), START + 1)
    assert cancels(fork.cancel(START + 2)) == [0]
    assert fork.handle_timer(START + 1 + TIMER_C) == []
    assert fork.state(0) is BranchState.CANCELLING
    assert up(fork.receive_response(0, resp(b0, 487), START + 200)) == [487]


def test_cancel_after_timer_c_sends_no_second_cancel() -> None:
    fork, (b0,) = make_fork(1)
    fork.receive_response(0, resp(b0, 180), START + 1)
    assert cancels(fork.handle_timer(START + 1 + TIMER_C)) == [0]
    assert fork.cancel(START + 1 + TIMER_C) == []
    assert fork.cancelled


def test_cancel_after_the_final_response_changes_nothing_downstream() -> None:
    fork, (b0,) = make_fork(1)
    fork.receive_response(0, resp(b0, 200), START + 1)
    assert fork.cancel(START + 2) == []
    assert fork.done


# --- choosing the response (§16.7) ------------------------------------------------------------


def test_best_of_486_404_and_503() -> None:
    fork, (b0, b1, b2) = make_fork(3)
    assert up(fork.receive_response(0, resp(b0, 486), START + 1)) == []
    assert up(fork.receive_response(2, resp(b2, 503), START + 2)) == []
    assert up(fork.receive_response(1, resp(b1, 404), START + 3)) == [404]
    assert fork.done


def test_a_lone_503_goes_upstream_as_500() -> None:
    fork, (b0,) = make_fork(1)
    out = fork.receive_response(0, resp(b0, 503), START + 1)
    assert stale(out) == [(0, 503)]
    assert up(out) == [500]


def test_6xx_cancels_the_others_and_wins_when_they_end() -> None:
    fork, (b0, b1, b2) = make_fork(3)
    fork.receive_response(0, resp(b0, 180), START + 1)
    out = fork.receive_response(2, resp(b2, 603), START + 2)
    # Branch 0 rang: CANCEL it now; branch 1 has not: its CANCEL waits (§9.1).
    assert out == [CancelBranch(0, make_cancel(b0))]
    assert fork.cancelled
    assert cancels(fork.receive_response(1, resp(b1, 180), START + 3)) == [1]
    assert up(fork.receive_response(0, resp(b0, 487), START + 4)) == []
    assert up(fork.receive_response(1, resp(b1, 487), START + 5)) == [603]


def test_2xx_is_forwarded_at_once_and_the_others_cancelled() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 180, tag="t0"), START + 1)
    out = fork.receive_response(1, resp(b1, 200, tag="t1"), START + 2)
    assert out[0] == SendUpstream(make_response(fork.request, 200, to_tag="t1"))
    assert up(out) == [200]
    assert cancels(out) == [0]
    assert up(fork.receive_response(0, resp(b0, 487, tag="t0"), START + 3)) == []
    assert fork.done


def test_every_2xx_of_a_fork_is_forwarded() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 180, tag="t0"), START + 1)
    fork.receive_response(1, resp(b1, 200, tag="t1"), START + 2)
    # The 200 crossed our CANCEL: it goes upstream too (§16.7 step 5).
    assert up(fork.receive_response(0, resp(b0, 200, tag="t0"), START + 3)) == [200]


def test_no_provisional_upstream_after_a_final() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 200), START + 1)
    assert up(fork.receive_response(1, resp(b1, 180), START + 2)) == []


def test_responses_after_the_branch_is_done_are_ignored() -> None:
    fork, (b0, b1) = make_fork(2)
    fork.receive_response(0, resp(b0, 486), START + 1)
    assert fork.receive_response(0, resp(b0, 486), START + 2) == []  # retransmission
    assert fork.receive_response(0, resp(b0, 180), START + 2) == []
    fork.branch_timeout(1, START + 32)
    # A branch that timed out is over, even for a late 2xx.
    assert fork.receive_response(1, resp(b1, 200), START + 33) == []
    assert fork.branch_timeout(1, START + 34) == []
    assert fork.done


def test_timeouts_count_as_408() -> None:
    fork, _ = make_fork(2)
    out = fork.branch_timeout(0, START + 32)
    assert stale(out) == [(0, 408)]
    assert up(out) == []
    assert up(fork.branch_timeout(1, START + 32)) == [408]


# --- non-INVITE -------------------------------------------------------------------------------


def test_non_invite_has_no_timer_c_and_is_never_cancelled() -> None:
    fork, (b0, b1) = make_fork(2, "MESSAGE")
    assert fork.get_timer() is None
    assert fork.receive_response(0, resp(b0, 180), START + 1) == [
        SendUpstream(make_response(fork.request, 180, to_tag="callee"))
    ]
    assert fork.get_timer() is None
    assert fork.cancel(START + 2) == []
    assert fork.cancelled
    assert fork.receive_response(1, resp(b1, 100), START + 3) == []
    assert fork.handle_timer(START + 10 * TIMER_C) == []
    assert up(fork.receive_response(0, resp(b0, 487), START + 4)) == []
    assert up(fork.branch_timeout(1, START + 32)) == [487]


def test_non_invite_2xx_does_not_cancel_the_others() -> None:
    fork, (b0, b1) = make_fork(2, "MESSAGE")
    fork.receive_response(1, resp(b1, 100), START + 1)
    out = fork.receive_response(0, resp(b0, 202), START + 2)
    assert up(out) == [202]
    assert cancels(out) == []
    assert up(fork.branch_timeout(1, START + 32)) == []


def test_non_invite_timeout_is_408() -> None:
    fork, _ = make_fork(1, "OPTIONS")
    assert up(fork.branch_timeout(0, START + 32)) == [408]


# --- stale targets and retry_stale -------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(STALE_STATUSES))
def test_stale_statuses_are_reported(status: int) -> None:
    fork, (b0,) = make_fork(1)
    out = fork.receive_response(0, resp(b0, status), START + 1)
    assert out[0] == StaleTarget(0, status)


@pytest.mark.parametrize("status", [180, 200, 302, 486, 487, 500, 603])
def test_other_statuses_are_not_stale(status: int) -> None:
    fork, (b0,) = make_fork(1)
    assert stale(fork.receive_response(0, resp(b0, status), START + 1)) == []


def test_retry_stale_holds_the_final_until_released() -> None:
    fork, (b0, b1) = make_fork(2, retry_stale=True)
    fork.receive_response(0, resp(b0, 404), START + 1)
    out = fork.receive_response(1, resp(b1, 486), START + 2)
    assert up(out) == []
    (hold,) = [o for o in out if isinstance(o, HoldFinal)]
    assert hold.response.status == 404
    assert fork.held is hold.response
    assert not fork.done
    assert fork.release() == [SendUpstream(hold.response)]
    assert fork.held is None and fork.done
    assert fork.release() == []


def test_retry_stale_release_after_cancel_gives_487() -> None:
    fork, _ = make_fork(1, retry_stale=True)
    out = fork.handle_timer(START + TIMER_C)
    assert [type(o) for o in out] == [StaleTarget, HoldFinal]
    assert fork.cancel(START + TIMER_C + 1) == []  # nothing left downstream
    (sent,) = fork.release()
    assert isinstance(sent, SendUpstream) and sent.response.status == 487


def test_retry_stale_without_a_stale_branch_sends_at_once() -> None:
    fork, (b0, b1) = make_fork(2, retry_stale=True)
    fork.receive_response(0, resp(b0, 486), START + 1)
    assert up(fork.receive_response(1, resp(b1, 603), START + 2)) == [603]
    assert fork.held is None


def test_retry_stale_never_holds_a_2xx() -> None:
    fork, (b0, b1) = make_fork(2, retry_stale=True)
    fork.receive_response(0, resp(b0, 480), START + 1)
    assert up(fork.receive_response(1, resp(b1, 200), START + 2)) == [200]


def test_retry_stale_does_not_hold_once_cancelled() -> None:
    fork, _ = make_fork(1, retry_stale=True)
    fork.cancel(START + 1)
    assert up(fork.branch_timeout(0, START + 32)) == [487]
    assert fork.held is None


# --- the CANCEL request (§9.1) ----------------------------------------------------------------


def test_make_cancel() -> None:
    req = received()
    branch = forwarded(req, 3)
    cancel = make_cancel(branch)
    assert (cancel.method, cancel.uri) == ("CANCEL", branch.uri)
    assert cancel.headers.get_all("Via") == ["SIP/2.0/UDP proxy.example.com;branch=z9hG4bKfork3"]
    assert cancel.headers.get_all("Route") == ["<sip:edge3.example.com;lr>"]
    for name in ("From", "To", "Call-ID"):
        assert cancel.headers.get(name) == branch.headers.get(name)
    assert cancel.headers.get("CSeq") == "7 CANCEL"
    assert cancel.headers.get("Max-Forwards") == "70"
    again = parse_message(cancel.to_bytes())
    assert isinstance(again, Request)
    validate_request(again)
    assert again == cancel


# --- properties -------------------------------------------------------------------------------

# Half provisional, so that branches ring before they are cancelled or time out.
_statuses = st.one_of(
    st.sampled_from([100, 180, 183]),
    st.sampled_from([200, 202, 302, 404, 408, 480, 486, 487, 503, 603]),
)
# The clock moves a little before most inputs, and jumps ahead only to fire timers: Timer C
# would otherwise end most branches before anything else happened to them.
_small = st.sampled_from([0.0, 0.5, 31.0])
_large = st.sampled_from([0.0, 31.0, TIMER_C / 2, TIMER_C, TIMER_C + 1])
_inputs = st.one_of(
    st.tuples(st.just("response"), st.integers(0, 2), _statuses, _small),
    st.tuples(st.just("timeout"), st.integers(0, 2), st.just(0), _small),
    st.tuples(st.just("cancel"), st.just(0), st.just(0), _small),
    st.tuples(st.just("timer"), st.just(0), st.just(0), _large),
    st.tuples(st.just("release"), st.just(0), st.just(0), st.just(0.0)),
)


class _Checker:
    """Feeds a fork and checks every output against the invariants of §16.7 and §9.1."""

    def __init__(self, fork: Fork, branches: list[Request], retry_stale: bool) -> None:
        self.fork = fork
        self.branches = branches
        self.retry_stale = retry_stale
        self.invite = fork.request.method == "INVITE"
        self.rang: set[int] = set()  # had a provisional before it ended
        self.ended: set[int] = set()  # a final response, a timeout, or Timer C (§16.8)
        self.cancelled: set[int] = set()
        self.finals: list[int] = []

    def response(self, index: int, status: int) -> None:
        if index in self.ended:
            return
        if status < 200:
            self.rang.add(index)
        else:
            self.ended.add(index)

    def feed(self, out: list[ForkOutput], now: float) -> None:
        when = self.fork.get_timer()
        assert when is None or when > now
        for o in out:
            if isinstance(o, SendUpstream):
                status = o.response.status
                assert o.response.headers.get_all("Via") == [UPSTREAM_VIA]
                assert not (status < 200 and self.finals), "a 1xx after a final"
                if status >= 200:
                    # Only 2xx may follow a final, and only a 2xx (§16.7 step 5).
                    assert all(200 <= s < 300 for s in self.finals)
                    if not 200 <= status < 300:
                        assert not self.finals
                    self.finals.append(status)
            elif isinstance(o, CancelBranch):
                assert self.invite
                assert o.index not in self.cancelled, "a second CANCEL"
                assert o.index in self.rang, "a CANCEL before a provisional (§9.1)"
                assert o.request == make_cancel(self.branches[o.index])
                self.cancelled.add(o.index)
            elif isinstance(o, StaleTarget):
                assert o.status in STALE_STATUSES
                self.ended.add(o.index)
            elif isinstance(o, HoldFinal):
                assert self.retry_stale and o.response.status >= 300
                assert not self.finals
            else:
                raise AssertionError(f"unexpected {o!r}")
        if self.invite and self.fork.cancelled:
            # §16.10: once cancelled, every pending branch that rang has been CANCELled.
            assert self.rang - self.ended <= self.cancelled


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    method=st.sampled_from(["INVITE", "MESSAGE"]),
    n=st.integers(1, 3),
    retry_stale=st.booleans(),
    inputs=st.lists(_inputs, max_size=25),
)
def test_random_inputs_keep_the_invariants(
    method: str, n: int, retry_stale: bool, inputs: list[tuple[str, int, int, float]]
) -> None:
    fork, branches = make_fork(n, method, retry_stale=retry_stale)
    check = _Checker(fork, branches, retry_stale)
    now = START
    for kind, index, status, step in inputs:
        now += step
        index %= n
        if kind == "response":
            check.response(index, status)
            out = fork.receive_response(index, resp(branches[index], status, f"t{index}"), now)
        elif kind == "timeout":
            check.ended.add(index)
            out = fork.branch_timeout(index, now)
        elif kind == "cancel":
            out = fork.cancel(now)
        elif kind == "timer":
            out = fork.handle_timer(now)
        else:
            out = fork.release()
        check.feed(out, now)
    # Let every branch end, and release what is held: then exactly one final non-2xx
    # went upstream, or only 2xx responses did.
    for index in range(n):
        now += 1
        check.feed(fork.branch_timeout(index, now), now)
    check.feed(fork.release(), now)
    assert fork.done
    assert fork.get_timer() is None
    assert check.finals
    if not 200 <= check.finals[0] < 300:
        assert len(check.finals) == 1
