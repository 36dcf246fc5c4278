"""Choosing the response of a forked request (RFC 3261 §16.7)."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.message import Request, Response, make_response, parse_message
from proxy.sip.response_context import Decision, ResponseContext

_PARSED = parse_message(
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKcaller\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: <sip:bob@example.com>\r\n"
    b"From: <sip:alice@example.com>;tag=a1\r\n"
    b"Call-ID: fork-1@192.0.2.10\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Content-Length: 0\r\n\r\n"
)
assert isinstance(_PARSED, Request)
INVITE: Request = _PARSED


def resp(status: int, *, tag: str = "callee", extra: Sequence[tuple[str, str]] = ()) -> Response:
    """A branch's response, its top Via (ours) already removed."""
    return make_response(INVITE, status, to_tag=tag, extra=list(extra))


def statuses(decision: Decision) -> list[int]:
    return [r.status for r in decision.forward]


# --- provisional responses (§16.7 step 5) ----------------------------------------------------


def test_provisionals_are_forwarded_at_once_but_not_100() -> None:
    ctx = ResponseContext(2)
    assert statuses(ctx.on_response(0, resp(100))) == []
    ringing = resp(180, tag="b0")
    d = ctx.on_response(0, ringing)
    assert d.forward == [ringing]
    assert not d.cancel_pending
    assert statuses(ctx.on_response(1, resp(183, tag="b1"))) == [183]
    assert ctx.pending == {0, 1}  # provisionals settle nothing


def test_no_provisional_after_the_final_response() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(200))
    assert statuses(ctx.on_response(1, resp(180))) == []


# --- 2xx (§16.7 step 5) -----------------------------------------------------------------------


def test_2xx_is_forwarded_at_once_and_the_others_cancelled() -> None:
    ctx = ResponseContext(3)
    ok = resp(200, tag="b1")
    d = ctx.on_response(1, ok)
    assert d.forward == [ok]
    assert d.cancel_pending
    assert ctx.final_sent


def test_every_2xx_of_a_fork_is_forwarded() -> None:
    ctx = ResponseContext(2)
    assert statuses(ctx.on_response(0, resp(200, tag="b0"))) == [200]
    d = ctx.on_response(1, resp(200, tag="b1"))
    assert statuses(d) == [200]
    assert not d.cancel_pending  # nothing left to cancel
    assert ctx.done


def test_2xx_wins_over_earlier_failures() -> None:
    ctx = ResponseContext(3)
    assert statuses(ctx.on_response(0, resp(486))) == []
    assert statuses(ctx.on_response(1, resp(404))) == []
    assert statuses(ctx.on_response(2, resp(200))) == [200]


def test_failures_after_a_2xx_are_not_forwarded() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(200))
    assert statuses(ctx.on_response(1, resp(487))) == []
    assert ctx.done


def test_single_branch_200() -> None:
    ctx = ResponseContext(1)
    d = ctx.on_response(0, resp(200))
    assert statuses(d) == [200]
    assert not d.cancel_pending


# --- the best final response (§16.7 step 6) ----------------------------------------------------


def test_nothing_is_forwarded_until_every_branch_has_answered() -> None:
    ctx = ResponseContext(3)
    assert statuses(ctx.on_response(0, resp(486))) == []
    assert statuses(ctx.on_response(2, resp(480))) == []
    assert not ctx.done
    assert statuses(ctx.on_response(1, resp(404))) != []
    assert ctx.done


@pytest.mark.parametrize(
    ("finals", "best"),
    [
        ([486], 486),
        ([486, 302], 302),  # the lowest class
        ([500, 404], 404),
        ([502, 504, 480], 480),
        ([408, 408], 408),
        ([603, 200], 200),  # a 2xx still goes through, as the only final
    ],
)
def test_best_final_of_the_branches(finals: list[int], best: int) -> None:
    ctx = ResponseContext(len(finals))
    sent: list[int] = []
    for i, status in enumerate(finals):
        sent += statuses(ctx.on_response(i, resp(status, tag=f"b{i}")))
    assert sent == [best]


def test_best_final_is_forwarded_exactly_once_whatever_the_order() -> None:
    finals = [486, 404, 302, 500]
    for order in itertools.permutations(range(len(finals))):
        ctx = ResponseContext(len(finals))
        sent: list[int] = []
        for i in order:
            sent += statuses(ctx.on_response(i, resp(finals[i])))
        assert sent == [302], order


def test_6xx_cancels_the_others_and_wins_when_they_end() -> None:
    ctx = ResponseContext(3)
    ctx.on_response(0, resp(486))
    decline = resp(603, tag="b1")
    d = ctx.on_response(1, decline)
    # §16.7 step 5: a 6xx is not forwarded at once; the pending branches are cancelled.
    assert d.forward == []
    assert d.cancel_pending
    d = ctx.on_response(2, resp(487))
    assert d.forward == [decline]


def test_6xx_beats_a_lower_class() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(600))
    assert statuses(ctx.on_response(1, resp(302))) == [600]


def test_6xx_from_the_last_branch_is_sent_at_once() -> None:
    ctx = ResponseContext(1)
    d = ctx.on_response(0, resp(603))
    assert statuses(d) == [603]
    assert not d.cancel_pending


def test_authentication_challenges_are_preferred_among_4xx() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(404))
    chal = [("WWW-Authenticate", 'Digest realm="example.com", nonce="n1"')]
    assert statuses(ctx.on_response(1, resp(401, extra=chal))) == [401]


def test_lone_503_becomes_500_without_retry_after() -> None:
    # §16.7 step 6: our downstream's overload is not ours to report.
    ctx = ResponseContext(1)
    (out,) = ctx.on_response(0, resp(503, extra=[("Retry-After", "30")])).forward
    assert out.status == 500
    assert "Retry-After" not in out.headers
    assert out.call_id == INVITE.call_id


def test_503_loses_to_any_other_failure() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(503))
    assert statuses(ctx.on_response(1, resp(500))) == [500]
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(480))
    assert statuses(ctx.on_response(1, resp(503))) == [480]


def test_timeout_counts_as_408() -> None:
    ctx = ResponseContext(2)
    d = ctx.on_timeout(0, resp(408))
    assert d.forward == []
    assert statuses(ctx.on_timeout(1, resp(408))) == [408]


def test_a_timed_out_branch_and_a_real_answer_give_one_final() -> None:
    ctx = ResponseContext(2)
    ctx.on_timeout(0, resp(408))
    sent = statuses(ctx.on_response(1, resp(486)))
    # Both are 4xx: the proxy may choose either (§16.7 step 6), but sends exactly one.
    assert len(sent) == 1 and sent[0] in (408, 486)
    assert ctx.done and ctx.final_sent


# --- collecting challenges (§16.7 step 7) -------------------------------------------------------


def test_challenges_of_every_branch_are_sent_together() -> None:
    ctx = ResponseContext(3)
    www1 = 'Digest realm="site-a", nonce="n1"'
    www2 = 'Digest realm="site-b", nonce="n2"'
    proxy = 'Digest realm="edge", nonce="n3"'
    ctx.on_response(0, resp(401, extra=[("WWW-Authenticate", www1)]))
    ctx.on_response(1, resp(407, extra=[("Proxy-Authenticate", proxy)]))
    (out,) = ctx.on_response(2, resp(401, extra=[("WWW-Authenticate", www2)])).forward
    assert out.status in (401, 407)
    assert sorted(out.headers.get_all("WWW-Authenticate")) == sorted([www1, www2])
    assert out.headers.get_all("Proxy-Authenticate") == [proxy]


def test_challenges_collected_even_when_the_winner_has_none_of_its_own_kind() -> None:
    ctx = ResponseContext(2)
    proxy = 'Digest realm="edge", nonce="n3"'
    www = 'Digest realm="site-a", nonce="n1"'
    ctx.on_response(0, resp(407, extra=[("Proxy-Authenticate", proxy)]))
    (out,) = ctx.on_response(1, resp(401, extra=[("WWW-Authenticate", www)])).forward
    assert out.headers.get_all("WWW-Authenticate") == [www]
    assert out.headers.get_all("Proxy-Authenticate") == [proxy]


def test_collecting_does_not_touch_the_branch_responses() -> None:
    ctx = ResponseContext(2)
    first = resp(401, extra=[("WWW-Authenticate", 'Digest realm="a", nonce="1"')])
    second = resp(401, extra=[("WWW-Authenticate", 'Digest realm="b", nonce="2"')])
    ctx.on_response(0, first)
    (out,) = ctx.on_response(1, second).forward
    assert len(out.headers.get_all("WWW-Authenticate")) == 2
    assert len(first.headers.get_all("WWW-Authenticate")) == 1
    assert len(second.headers.get_all("WWW-Authenticate")) == 1


def test_challenges_are_not_added_to_a_non_auth_winner() -> None:
    ctx = ResponseContext(2)
    ctx.on_response(0, resp(401, extra=[("WWW-Authenticate", 'Digest realm="a", nonce="1"')]))
    (out,) = ctx.on_response(1, resp(302, extra=[("Contact", "<sip:bob@192.0.2.99>")])).forward
    assert out.status == 302
    assert "WWW-Authenticate" not in out.headers


# --- properties ------------------------------------------------------------------------------

_finals = st.sampled_from([200, 202, 302, 401, 404, 407, 408, 480, 486, 487, 500, 503, 600, 603])


@settings(max_examples=300, deadline=None)
@given(st.lists(_finals, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_exactly_one_non_2xx_final_or_every_2xx(finals: list[int], rnd: random.Random) -> None:
    order = list(range(len(finals)))
    rnd.shuffle(order)
    ctx = ResponseContext(len(finals))
    sent: list[int] = []
    for i in order:
        sent += statuses(ctx.on_response(i, resp(finals[i], tag=f"b{i}")))
    assert ctx.done
    twos = [s for s in sent if 200 <= s < 300]
    others = [s for s in sent if not 200 <= s < 300]
    if twos:
        # Every 2xx is forwarded, in arrival order, and no failure at all.
        assert twos == [finals[i] for i in order if 200 <= finals[i] < 300]
        assert others == []
    else:
        assert len(others) == 1
        (best,) = others
        six = [s for s in finals if s >= 600]
        if six:
            assert best in six
        else:
            low = min(s // 100 for s in finals if s != 503) if set(finals) != {503} else 5
            assert best // 100 == low
            assert best != 503
