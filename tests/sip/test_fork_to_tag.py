"""Responses a fork makes itself carry the proxy's To tag (RFC 3261 §8.2.6.2, §16.7 step 6).

A proxy that answers a request itself acts as a UAS: its 408 (Timer C, a branch timeout)
and 487 (after CANCEL) carry a To tag, which ``Fork(to_tag=...)`` gives (the server
transaction's). Responses from downstream keep the tag their UAS chose.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.sip.fork import Fork, ForkOutput, SendUpstream
from proxy.sip.message import Request, Response, make_response

from .test_fork import START, TIMER_C, forwarded, received

TAG = "proxytag1"


def started(
    n: int = 1, method: str = "INVITE", *, to_tag: str | None = TAG, retry_stale: bool = False
) -> tuple[Fork, list[Request]]:
    req = received(method)
    branches = [forwarded(req, i) for i in range(n)]
    fork = Fork(req, branches, timer_c=TIMER_C, retry_stale=retry_stale, to_tag=to_tag)
    fork.start(START)
    return fork, branches


def sent_up(outs: Sequence[ForkOutput]) -> Response:
    (resp,) = [o.response for o in outs if isinstance(o, SendUpstream)]
    return resp


def test_the_408_of_timer_c_has_our_tag() -> None:
    fork, _ = started()
    resp = sent_up(fork.handle_timer(START + TIMER_C))
    assert resp.status == 408
    assert resp.to.tag == TAG
    assert resp.headers.get("To") == f"Bob <sip:bob@example.com>;tag={TAG}"


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
def test_the_408_of_a_branch_timeout_has_our_tag(method: str) -> None:
    fork, _ = started(method=method)
    resp = sent_up(fork.branch_timeout(0, START + 32))
    assert (resp.status, resp.to.tag) == (408, TAG)


def test_the_487_after_cancel_has_our_tag() -> None:
    fork, _ = started()
    assert fork.cancel(START + 1) == []  # nothing rang: the CANCEL waits for a 1xx (§9.1)
    resp = sent_up(fork.branch_timeout(0, START + 32))
    assert (resp.status, resp.to.tag) == (487, TAG)


def test_a_downstream_408_replaced_by_our_487_has_our_tag() -> None:
    fork, (b0,) = started()
    fork.receive_response(0, make_response(b0, 180, to_tag="callee"), START + 1)
    fork.cancel(START + 2)
    resp = sent_up(fork.receive_response(0, make_response(b0, 408, to_tag="callee"), START + 3))
    assert (resp.status, resp.to.tag) == (487, TAG)


def test_a_held_final_released_after_cancel_is_our_487_with_our_tag() -> None:
    fork, (b0, b1) = started(2, retry_stale=True)
    fork.receive_response(0, make_response(b0, 404, to_tag="x0"), START + 1)
    fork.receive_response(1, make_response(b1, 486, to_tag="x1"), START + 2)
    assert fork.held is not None
    fork.cancel(START + 3)
    (out,) = fork.release()
    assert isinstance(out, SendUpstream)
    assert (out.response.status, out.response.to.tag) == (487, TAG)


def test_downstream_responses_keep_their_own_tag() -> None:
    fork, (b0,) = started()
    resp = sent_up(fork.receive_response(0, make_response(b0, 486, to_tag="callee"), START + 1))
    assert (resp.status, resp.to.tag) == (486, "callee")


def test_without_a_tag_the_fork_answers_as_before() -> None:
    fork, _ = started(to_tag=None)
    resp = sent_up(fork.handle_timer(START + TIMER_C))
    assert (resp.status, resp.to.tag) == (408, None)
