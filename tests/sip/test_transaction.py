"""RFC 3261 §17 transactions, driven by a manual clock."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.sip.matching import client_key, invite_key_for_cancel, server_key
from proxy.sip.message import Request, Response, make_response, parse_message, validate_request
from proxy.sip.timers import Timer, TimerConfig
from proxy.sip.transaction import (
    ClientState,
    ClientTransaction,
    Deliver,
    Output,
    Send,
    ServerState,
    ServerTransaction,
    Terminated,
    Timeout,
    TransactionError,
    TransportFailure,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "rfc4475"
CFG = TimerConfig()
T1, T2, T4 = CFG.t1, CFG.t2, CFG.t4
START = 100.0  # not 0, so that absolute and relative times cannot be confused


def request(
    method: str = "INVITE",
    *,
    branch: str = "z9hG4bKclient1",
    sent_by: str = "client.example.com:5060",
    transport: str = "UDP",
    cseq: int = 7,
    cseq_method: str | None = None,
    to_tag: str | None = None,
    from_tag: str = "a1",
    call_id: str = "c1@example.org",
    uri: str = "sip:bob@example.com",
    via_params: str = "",
) -> Request:
    to = "Bob <sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    text = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {sent_by};branch={branch}{via_params}\r\n"
        "Via: SIP/2.0/UDP upstream.example.org;branch=z9hG4bKup\r\n"
        "Max-Forwards: 69\r\n"
        "Route: <sip:p1.example.com;lr>\r\n"
        "Route: <sip:p2.example.com;lr>\r\n"
        f"From: Alice <sip:alice@example.org>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        "Contact: <sip:alice@client.example.com>\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    msg = parse_message(text.encode())
    assert isinstance(msg, Request)
    return msg


def response(req: Request, status: int, tag: str = "b1") -> Response:
    return make_response(req, status, to_tag=tag)


def state(txn: ServerTransaction | ClientTransaction) -> ServerState | ClientState:
    """The state, unnarrowed: mypy would otherwise remember the last ``is`` check."""
    return txn.state


def sends(outputs: list[Output]) -> list[Send]:
    return [o for o in outputs if isinstance(o, Send)]


def started_client(
    req: Request, reliable: bool = False, cfg: TimerConfig = CFG
) -> ClientTransaction:
    txn = ClientTransaction(req, reliable, START, cfg)
    assert txn.start() == [Send(req)]
    return txn


def fire_all(txn: ServerTransaction | ClientTransaction) -> list[tuple[float, list[Output]]]:
    """Call handle_timer at every time get_timer() names, until no timer is left."""
    fired = []
    while (when := txn.get_timer()) is not None:
        assert txn.handle_timer(when - 1e-9) == []  # early: nothing happens
        fired.append((when - START, txn.handle_timer(when)))
    return fired


# --- TimerConfig ---------------------------------------------------------------------------


def test_timer_values_follow_the_rfc_table() -> None:
    c = TimerConfig()
    assert (c.t1, c.t2, c.t4, c.timer_c) == (0.5, 4.0, 5.0, 180.0)
    assert (c.timer_a, c.timer_b, c.timer_e, c.timer_f, c.timer_g, c.timer_h) == (
        0.5, 32.0, 0.5, 32.0, 0.5, 32.0,
    )  # fmt: skip
    assert (c.timer_d(False), c.timer_d(True)) == (32.0, 0.0)
    assert (c.timer_i(False), c.timer_i(True)) == (5.0, 0.0)
    assert (c.timer_j(False), c.timer_j(True)) == (32.0, 0.0)
    assert (c.timer_k(False), c.timer_k(True)) == (5.0, 0.0)
    assert [c.backoff(x) for x in (0.5, 1.0, 2.0, 4.0)] == [1.0, 2.0, 4.0, 4.0]
    fast = TimerConfig(t1=0.01, t2=0.08, t4=0.1)
    assert (fast.timer_b, fast.timer_f, fast.timer_h, fast.timer_j(False)) == (0.64,) * 4


@pytest.mark.parametrize(
    "kwargs", [{"t1": 0}, {"t2": -1}, {"t4": 0}, {"t1": 5, "t2": 4}, {"timer_c": 0}]
)
def test_timer_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TimerConfig(**kwargs)


# --- INVITE client (§17.1.1) ---------------------------------------------------------------


def test_invite_client_timer_a_doubles_without_cap_then_timer_b() -> None:
    req = request()
    txn = started_client(req)
    assert state(txn) is ClientState.CALLING
    fired = fire_all(txn)
    # Timer A: T1, 2T1, 4T1, ... measured from each firing; no T2 cap for INVITE.
    assert [t for t, _ in fired] == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5, 32.0]
    for _, out in fired[:-1]:
        assert out == [Send(req, retransmission=True)]
    assert fired[-1][1] == [Timeout(), Terminated()]  # Timer B = 64*T1
    assert state(txn) is ClientState.TERMINATED
    assert txn.get_timer() is None


def test_invite_client_reliable_never_retransmits() -> None:
    txn = started_client(request(transport="TCP"), reliable=True)
    assert fire_all(txn) == [(32.0, [Timeout(), Terminated()])]


def test_invite_client_timer_b_scales_with_t1() -> None:
    cfg = TimerConfig(t1=0.1, t2=0.8, t4=1.0)
    txn = started_client(request(), reliable=True, cfg=cfg)
    assert txn.get_timer() == pytest.approx(START + 6.4)


def test_invite_client_provisional_stops_timers_a_and_b() -> None:
    req = request()
    txn = started_client(req)
    ringing = response(req, 180)
    assert txn.receive_response(ringing, START + 0.2) == [Deliver(ringing)]
    assert state(txn) is ClientState.PROCEEDING
    # §17.1.1.2: Timer B only runs in Calling; the proxy's Timer C takes over.
    assert txn.get_timer() is None
    assert txn.handle_timer(START + 1000) == []
    again = response(req, 183)
    assert txn.receive_response(again, START + 1000) == [Deliver(again)]


@pytest.mark.parametrize("provisional_first", [False, True])
def test_invite_client_2xx_is_delivered_and_terminates(provisional_first: bool) -> None:
    req = request()
    txn = started_client(req)
    if provisional_first:
        txn.receive_response(response(req, 100, tag=""), START + 0.1)
    ok = response(req, 200)
    assert txn.receive_response(ok, START + 0.3) == [Deliver(ok), Terminated()]
    assert state(txn) is ClientState.TERMINATED
    assert txn.get_timer() is None
    assert txn.receive_response(ok, START + 0.4) == []  # a 2xx retransmission: not ours


def test_invite_client_acks_non_2xx_final_response() -> None:
    req = request()
    txn = started_client(req)
    busy = response(req, 486, tag="b9")
    out = txn.receive_response(busy, START + 1.0)
    assert state(txn) is ClientState.COMPLETED
    assert out[0] == Deliver(busy)
    [send] = sends(out)
    ack = send.message
    assert isinstance(ack, Request) and ack is txn.ack and not send.retransmission
    # §17.1.1.3
    assert (ack.method, ack.uri) == ("ACK", req.uri)
    assert ack.headers.get_all("Via") == [
        "SIP/2.0/UDP client.example.com:5060;branch=z9hG4bKclient1"
    ]
    assert ack.headers.get_all("Route") == req.headers.get_all("Route")
    assert ack.headers.get("From") == req.headers.get("From")
    assert ack.to.tag == "b9" and ack.headers.get("To") == busy.headers.get("To")
    assert ack.call_id == req.call_id
    assert (ack.cseq.number, ack.cseq.method) == (7, "ACK")
    assert ack.headers.get("Max-Forwards") == "69"
    assert "Contact" not in ack.headers and ack.body == b""
    validate_request(ack)
    reparsed = parse_message(ack.to_bytes())
    assert reparsed == ack
    # The ACK goes to the same transaction as the INVITE at the next hop.
    assert server_key(ack) == server_key(req)


def test_invite_client_completed_resends_ack_for_retransmissions_then_timer_d() -> None:
    req = request()
    txn = started_client(req)
    busy = response(req, 486)
    txn.receive_response(busy, START + 1.0)
    ack = txn.ack
    assert ack is not None
    assert txn.get_timer() == START + 1.0 + 32.0  # Timer D, unreliable
    # Retransmitted final: the same ACK again, nothing for the TU.
    assert txn.receive_response(busy, START + 2.0) == [Send(ack, retransmission=True)]
    # Provisional or 2xx in Completed: absorbed.
    assert txn.receive_response(response(req, 180), START + 3.0) == []
    assert txn.receive_response(response(req, 200), START + 3.0) == []
    assert txn.handle_timer(START + 32.9) == []
    assert txn.handle_timer(START + 33.0) == [Terminated()]
    assert state(txn) is ClientState.TERMINATED


def test_invite_client_reliable_timer_d_is_zero() -> None:
    req = request(transport="TCP")
    txn = started_client(req, reliable=True)
    busy = response(req, 503)
    out = txn.receive_response(busy, START + 1.0)
    assert out == [Deliver(busy), Send(txn.ack), Terminated()]  # type: ignore[arg-type]
    assert state(txn) is ClientState.TERMINATED and txn.get_timer() is None


# --- non-INVITE client (§17.1.2) -----------------------------------------------------------


def test_non_invite_client_timer_e_capped_at_t2_then_timer_f() -> None:
    req = request("OPTIONS")
    txn = started_client(req)
    assert state(txn) is ClientState.TRYING
    fired = fire_all(txn)
    times = [t for t, _ in fired]
    # T1, 2T1, 4T1, then T2 (4 s) apart; Timer F at 64*T1.
    assert times == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5, 32.0]
    assert all(out == [Send(req, retransmission=True)] for _, out in fired[:-1])
    assert fired[-1][1] == [Timeout(), Terminated()]


def test_non_invite_client_proceeding_retransmits_every_t2() -> None:
    req = request("REGISTER")
    txn = started_client(req)
    txn.handle_timer(START + 0.5)  # first retransmission; next one at +1.5
    trying = response(req, 100, tag="")
    assert txn.receive_response(trying, START + 0.7) == [Deliver(trying)]
    assert state(txn) is ClientState.PROCEEDING
    assert txn.get_timer() == START + 1.5  # entering Proceeding does not reset Timer E
    fired = fire_all(txn)
    assert [t for t, _ in fired] == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5, 25.5, 29.5, 32.0]
    assert fired[-1][1] == [Timeout(), Terminated()]  # Timer F also runs in Proceeding


def test_non_invite_client_final_response_then_timer_k() -> None:
    req = request("OPTIONS")
    txn = started_client(req)
    ok = response(req, 200)
    assert txn.receive_response(ok, START + 0.2) == [Deliver(ok)]
    assert state(txn) is ClientState.COMPLETED
    assert txn.get_timer() == START + 0.2 + T4  # Timer K
    assert txn.receive_response(ok, START + 1) == []  # absorbed
    assert txn.receive_response(response(req, 404), START + 1) == []
    assert txn.handle_timer(START + 0.2 + T4) == [Terminated()]


def test_non_invite_client_reliable() -> None:
    req = request("OPTIONS", transport="TCP")
    txn = started_client(req, reliable=True)
    assert txn.get_timer() == START + 32.0  # Timer F only
    nope = response(req, 404)
    assert txn.receive_response(nope, START + 1) == [Deliver(nope), Terminated()]  # K = 0


def test_client_misuse_raises_transaction_error() -> None:
    txn = ClientTransaction(request(), False, START, CFG)
    with pytest.raises(TransactionError):
        txn.handle_timer(START + 1)
    with pytest.raises(TransactionError):
        txn.receive_response(response(request(), 180), START)
    txn.start()
    with pytest.raises(TransactionError):
        txn.start()
    with pytest.raises(TransactionError):
        ClientTransaction(request("ACK"), False, START, CFG)
    with pytest.raises(TransactionError):
        ClientTransaction(request(branch="1234"), False, START, CFG)
    with pytest.raises(TransactionError):
        ClientTransaction(request(branch="z9hG4bK"), False, START, CFG)


def test_transport_error_terminates() -> None:
    txn = started_client(request())
    assert txn.transport_error(START) == [TransportFailure(), Terminated()]
    assert state(txn) is ClientState.TERMINATED and txn.get_timer() is None
    assert txn.transport_error(START) == []
    stx = ServerTransaction(request(), False, START, CFG)
    stx.send_response(response(request(), 486), START)
    assert stx.transport_error(START) == [TransportFailure(), Terminated()]


# --- INVITE server (§17.2.1) ---------------------------------------------------------------


def test_invite_server_answers_retransmissions_with_last_provisional() -> None:
    req = request()
    txn = ServerTransaction(req, False, START, CFG)
    assert state(txn) is ServerState.PROCEEDING and txn.get_timer() is None
    assert txn.receive_request(req, START + 0.1) == []  # nothing sent yet
    trying = response(req, 100, tag="")
    assert txn.send_response(trying, START + 0.1) == [Send(trying)]
    assert txn.receive_request(req, START + 0.5) == [Send(trying, retransmission=True)]
    ringing = response(req, 180)
    assert txn.send_response(ringing, START + 1) == [Send(ringing)]
    assert txn.receive_request(req, START + 2) == [Send(ringing, retransmission=True)]
    assert txn.last_response is ringing
    assert txn.get_timer() is None


def test_invite_server_2xx_terminates_at_once() -> None:
    req = request()
    txn = ServerTransaction(req, False, START, CFG)
    ok = response(req, 200)
    assert txn.send_response(ok, START + 1) == [Send(ok), Terminated()]
    assert state(txn) is ServerState.TERMINATED and txn.get_timer() is None
    assert txn.receive_request(req, START + 2) == []
    with pytest.raises(TransactionError):
        txn.send_response(response(req, 200, tag="other"), START + 2)


def test_invite_server_timer_g_capped_at_t2_and_timer_h() -> None:
    req = request()
    txn = ServerTransaction(req, False, START, CFG)
    busy = response(req, 486)
    assert txn.send_response(busy, START) == [Send(busy)]
    assert state(txn) is ServerState.COMPLETED
    fired = fire_all(txn)
    assert [t for t, _ in fired] == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5, 32.0]
    assert all(out == [Send(busy, retransmission=True)] for _, out in fired[:-1])
    assert fired[-1][1] == [Timeout(), Terminated()]  # Timer H: the ACK never came


def test_invite_server_reliable_has_no_timer_g() -> None:
    req = request(transport="TCP")
    txn = ServerTransaction(req, True, START, CFG)
    txn.send_response(response(req, 404), START)
    assert fire_all(txn) == [(32.0, [Timeout(), Terminated()])]


def test_invite_server_completed_resends_final_and_absorbs_ack() -> None:
    req = request()
    txn = ServerTransaction(req, False, START, CFG)
    busy = response(req, 486)
    txn.send_response(busy, START)
    assert txn.receive_request(req, START + 0.2) == [Send(busy, retransmission=True)]
    with pytest.raises(TransactionError):
        txn.send_response(response(req, 500), START + 0.3)
    ack = request("ACK", cseq_method="ACK", to_tag="b1")
    assert server_key(ack) == txn.key
    assert txn.receive_request(ack, START + 1) == []  # absorbed
    assert state(txn) is ServerState.CONFIRMED
    assert txn.get_timer() == START + 1 + T4  # Timer I; G and H are gone
    assert txn.receive_request(ack, START + 2) == []
    assert txn.receive_request(req, START + 2) == []
    assert txn.handle_timer(START + 1 + T4) == [Terminated()]
    assert state(txn) is ServerState.TERMINATED


def test_invite_server_reliable_ack_terminates_at_once() -> None:
    req = request(transport="TCP")
    txn = ServerTransaction(req, True, START, CFG)
    txn.send_response(response(req, 486), START)
    ack = request("ACK", transport="TCP", cseq_method="ACK", to_tag="b1")
    assert txn.receive_request(ack, START + 1) == [Terminated()]  # Timer I = 0


def test_ack_in_proceeding_is_ignored() -> None:
    txn = ServerTransaction(request(), False, START, CFG)
    assert txn.receive_request(request("ACK", to_tag="x"), START) == []
    assert state(txn) is ServerState.PROCEEDING


# --- non-INVITE server (§17.2.2) -----------------------------------------------------------


def test_non_invite_server_lifecycle_and_timer_j() -> None:
    req = request("OPTIONS")
    txn = ServerTransaction(req, False, START, CFG)
    assert state(txn) is ServerState.TRYING and txn.get_timer() is None
    assert txn.receive_request(req, START + 0.5) == []  # absorbed in Trying
    trying = response(req, 100, tag="")
    assert txn.send_response(trying, START + 0.6) == [Send(trying)]
    assert state(txn) is ServerState.PROCEEDING
    assert txn.receive_request(req, START + 1) == [Send(trying, retransmission=True)]
    ok = response(req, 200)
    assert txn.send_response(ok, START + 2) == [Send(ok)]
    assert state(txn) is ServerState.COMPLETED
    assert txn.receive_request(req, START + 3) == [Send(ok, retransmission=True)]
    assert txn.get_timer() == START + 2 + 64 * T1  # Timer J
    with pytest.raises(TransactionError):
        txn.send_response(response(req, 500), START + 3)
    assert fire_all(txn) == [(2 + 64 * T1, [Terminated()])]


def test_non_invite_server_final_from_trying_reliable() -> None:
    req = request("REGISTER", transport="TCP")
    txn = ServerTransaction(req, True, START, CFG)
    nope = response(req, 403)
    assert txn.send_response(nope, START) == [Send(nope), Terminated()]  # Timer J = 0


def test_server_misuse() -> None:
    with pytest.raises(TransactionError):
        ServerTransaction(request("ACK"), False, START, CFG)
    txn = ServerTransaction(request("OPTIONS"), False, START, CFG)
    bogus = response(request("OPTIONS"), 200)
    bogus.status = 700
    with pytest.raises(TransactionError):
        txn.send_response(bogus, START)


# --- matching (§17.1.3, §17.2.3) -----------------------------------------------------------


def test_server_key_rfc3261() -> None:
    inv = request()
    assert server_key(inv) == server_key(request())  # a retransmission
    assert server_key(inv)[0] == "z9hG4bK"
    ack = request("ACK", cseq_method="ACK", to_tag="b1")
    assert server_key(ack) == server_key(inv)
    assert server_key(request(branch="z9hG4bKclient2")) != server_key(inv)
    assert server_key(request(sent_by="other.example.com:5060")) != server_key(inv)
    assert server_key(request(sent_by="CLIENT.example.com:5060")) == server_key(inv)
    # Only the branch, sent-by and method count.
    assert server_key(request(call_id="zzz", from_tag="q")) == server_key(inv)
    # A CANCEL has a transaction of its own, and finds its INVITE's.
    cancel = request("CANCEL")
    assert server_key(cancel) != server_key(inv)
    assert invite_key_for_cancel(cancel) == server_key(inv)
    assert server_key(request("OPTIONS")) != server_key(request("BYE"))


def test_server_key_rfc2543_fallback_badbranch() -> None:
    # RFC 4475 §3.2.1: a branch of just "z9hG4bK" is no transaction identifier.
    msg = parse_message((DATA / "badbranch.dat").read_bytes())
    assert isinstance(msg, Request)
    key = server_key(msg)
    assert key[0] == "2543"
    assert server_key(parse_message((DATA / "badbranch.dat").read_bytes())) == key  # type: ignore[arg-type]
    txn = ServerTransaction(msg, False, START, CFG)
    assert txn.key == key
    ok = response(msg, 200)
    txn.send_response(ok, START)
    assert state(txn) is ServerState.COMPLETED


@pytest.mark.parametrize("branch", ["z9hG4bK", "1234abcd", "Z9HG4BKnotcookie"])
def test_server_key_rfc2543_fields(branch: str) -> None:
    def inv(**kw: object) -> Request:
        return request(branch=branch, **kw)  # type: ignore[arg-type]

    base = server_key(inv())
    assert base[0] == "2543"
    assert server_key(inv()) == base
    for changed in (
        inv(uri="sip:carol@example.com"),
        inv(from_tag="zz"),
        inv(call_id="other"),
        inv(cseq=8),
        inv(sent_by="other.example.com"),
        inv(transport="TCP"),
    ):
        assert server_key(changed) != base
    # Our own received/rport do not change the request's identity.
    assert server_key(inv(via_params=";received=192.0.2.9;rport=5070")) == base
    # The ACK carries the To tag of our response, which the INVITE lacked; it still matches.
    ack = request("ACK", branch=branch, cseq_method="ACK", to_tag="b1")
    assert server_key(ack) == base
    assert server_key(request("ACK", branch=branch, cseq=8, to_tag="b1")) != base
    cancel = request("CANCEL", branch=branch)
    assert server_key(cancel) != base and invite_key_for_cancel(cancel) == base
    # Non-INVITE: the To tag is part of the match.
    bye = request("BYE", branch=branch, to_tag="t1")
    assert server_key(bye) != server_key(request("BYE", branch=branch, to_tag="t2"))


def test_rfc2543_ack_must_carry_our_to_tag() -> None:
    req = request(branch="old2543")
    txn = ServerTransaction(req, False, START, CFG)
    txn.send_response(response(req, 486, tag="mine"), START)
    stray = request("ACK", branch="old2543", cseq_method="ACK", to_tag="theirs")
    assert server_key(stray) == txn.key
    assert txn.receive_request(stray, START + 0.2) == []
    assert state(txn) is ServerState.COMPLETED
    ack = request("ACK", branch="old2543", cseq_method="ACK", to_tag="mine")
    txn.receive_request(ack, START + 1)
    assert state(txn) is ServerState.CONFIRMED


def test_client_key() -> None:
    inv = request()
    assert client_key(inv) == ("z9hG4bKclient1", "INVITE")
    assert client_key(response(inv, 180)) == client_key(inv)
    assert client_key(response(request(branch="z9hG4bKother"), 180)) != client_key(inv)
    cancel = request("CANCEL")
    assert client_key(response(cancel, 200)) == client_key(cancel) != client_key(inv)
    assert ClientTransaction(inv, False, START, CFG).key == client_key(inv)


def test_keys_match_retransmissions_acks_and_cancels() -> None:
    # What the server's transaction table (proxy.transactions) relies on: a
    # retransmission and the ACK find the INVITE's transaction, a CANCEL finds its own
    # and names the INVITE's, a response finds its client transaction.
    inv = request()
    stx = ServerTransaction(inv, False, START, CFG)
    assert server_key(request()) == stx.key
    assert server_key(request("ACK", cseq_method="ACK", to_tag="x")) == stx.key
    assert server_key(request("CANCEL")) != stx.key
    assert invite_key_for_cancel(request("CANCEL")) == stx.key
    out = request("OPTIONS", branch="z9hG4bKproxy1")
    ctx = started_client(out)
    assert client_key(response(out, 200)) == ctx.key
    assert ctx.get_timer() == START + T1  # Timer E of the client


# --- every (state, input) pair -------------------------------------------------------------

SS, CS = ServerState, ClientState
# Edges of RFC 3261 Figures 5-8, written out independently of the implementation's tables.
RFC_EDGES: dict[tuple[str, bool], set[tuple[object, object]]] = {
    ("server", True): {
        (SS.PROCEEDING, SS.COMPLETED), (SS.PROCEEDING, SS.TERMINATED),
        (SS.COMPLETED, SS.CONFIRMED), (SS.COMPLETED, SS.TERMINATED),
        (SS.CONFIRMED, SS.TERMINATED),
    },
    ("server", False): {
        (SS.TRYING, SS.PROCEEDING), (SS.TRYING, SS.COMPLETED),
        (SS.PROCEEDING, SS.COMPLETED), (SS.COMPLETED, SS.TERMINATED),
    },
    ("client", True): {
        (CS.CALLING, CS.PROCEEDING), (CS.CALLING, CS.COMPLETED), (CS.CALLING, CS.TERMINATED),
        (CS.PROCEEDING, CS.COMPLETED), (CS.PROCEEDING, CS.TERMINATED),
        (CS.COMPLETED, CS.TERMINATED),
    },
    ("client", False): {
        (CS.TRYING, CS.PROCEEDING), (CS.TRYING, CS.COMPLETED), (CS.TRYING, CS.TERMINATED),
        (CS.PROCEEDING, CS.COMPLETED), (CS.PROCEEDING, CS.TERMINATED),
        (CS.COMPLETED, CS.TERMINATED),
    },
}  # fmt: skip
# States in which no timer runs (besides Terminated).
NO_TIMER: dict[tuple[str, bool], set[object]] = {
    ("server", True): {SS.PROCEEDING},
    ("server", False): {SS.TRYING, SS.PROCEEDING},
    ("client", True): {CS.PROCEEDING},
    ("client", False): set(),
}
# States in which the TU may send a response.
MAY_RESPOND = {True: {SS.PROCEEDING}, False: {SS.TRYING, SS.PROCEEDING}}

SERVER_INPUTS = ["request", "ack", "send 100", "send 180", "send 200", "send 486",
                 "timer", "tick", "transport error"]  # fmt: skip
CLIENT_INPUTS = ["recv 100", "recv 180", "recv 200", "recv 486", "timer", "tick",
                 "transport error"]  # fmt: skip


@functools.cache
def messages(invite: bool, reliable: bool) -> tuple[Request, Request, dict[int, Response]]:
    """The request, its ACK and its responses (parsed once: transactions do not mutate them)."""
    transport = "TCP" if reliable else "UDP"
    req = request("INVITE" if invite else "OPTIONS", transport=transport)
    ack = request("ACK", transport=transport, cseq_method="ACK", to_tag="b1")
    return req, ack, {status: response(req, status) for status in (100, 180, 200, 486)}


class Harness:
    """Feeds one input at a time and checks the invariants after each."""

    def __init__(self, side: str, invite: bool, reliable: bool) -> None:
        self.side, self.invite, self.reliable = side, invite, reliable
        self.req, self.ack, self.responses = messages(invite, reliable)
        self.now = START
        self.terminated_seen = False
        self.edges = RFC_EDGES[(side, invite)]
        self.txn: ServerTransaction | ClientTransaction
        if side == "server":
            self.txn = ServerTransaction(self.req, reliable, self.now, CFG)
        else:
            self.txn = ClientTransaction(self.req, reliable, self.now, CFG)
            assert self.txn.start() == [Send(self.req)]
        self.check_timer()

    def check_timer(self) -> None:
        when = self.txn.get_timer()
        state = self.txn.state
        if state in (SS.TERMINATED, CS.TERMINATED):
            assert when is None
        elif when is None:
            assert state in NO_TIMER[(self.side, self.invite)]
        else:
            assert when > self.now  # never in the past after a call

    def reachable(self, before: object, steps: int) -> set[object]:
        states = {before}
        for _ in range(steps):
            states |= {b for a, b in self.edges if a in states}
        return states

    def feed(self, name: str, dt: float = 0.3) -> None:
        txn, before, timer_before = self.txn, self.txn.state, self.txn.get_timer()
        call: Callable[[], list[Output]]
        sent: Response | None = None
        if name in ("timer", "tick"):
            when = txn.get_timer()
            self.now = when if name == "timer" and when is not None else self.now + dt
            call = lambda: txn.handle_timer(self.now)  # noqa: E731
        elif name == "transport error":
            call = lambda: txn.transport_error(self.now)  # noqa: E731
        elif name == "request":
            assert isinstance(txn, ServerTransaction)
            call = lambda: txn.receive_request(self.req, self.now)  # noqa: E731
        elif name == "ack":
            assert isinstance(txn, ServerTransaction)
            call = lambda: txn.receive_request(self.ack, self.now)  # noqa: E731
        elif name.startswith("send"):
            assert isinstance(txn, ServerTransaction)
            sent = resp = self.responses[int(name[5:])]
            call = lambda: txn.send_response(resp, self.now)  # noqa: E731
        else:
            assert isinstance(txn, ClientTransaction)
            got = self.responses[int(name[5:])]
            call = lambda: txn.receive_response(got, self.now)  # noqa: E731
        try:
            out = call()
        except TransactionError:
            # Documented: only a TU response in a state that allows none.
            assert sent is not None and before not in MAY_RESPOND[self.invite]
            assert state(txn) is before and txn.get_timer() == timer_before
            return
        if sent is not None:
            assert before in MAY_RESPOND[self.invite]
            assert out[0] == Send(sent)
        after = txn.state
        if name == "transport error":
            assert after in (SS.TERMINATED, CS.TERMINATED)
        else:
            # A zero-length timer (reliable transports) may take a second edge at once.
            assert after in self.reachable(before, 2 if self.reliable else 1), (before, after)
        self.check_outputs(name, before, after, out)
        self.check_timer()

    def check_outputs(self, name: str, before: object, after: object, out: list[Output]) -> None:
        ended = after in (SS.TERMINATED, CS.TERMINATED)
        if self.terminated_seen:
            assert out == []
        if any(isinstance(o, Terminated) for o in out):
            assert ended and not self.terminated_seen and out[-1] == Terminated()
            assert sum(isinstance(o, Terminated) for o in out) == 1
            self.terminated_seen = True
        else:
            assert before is after or not ended
        if any(isinstance(o, Timeout) for o in out):
            assert name in ("timer", "tick") and ended
        if any(isinstance(o, TransportFailure) for o in out):
            assert name == "transport error"
        for o in sends(out):
            if self.side == "server":
                assert isinstance(o.message, Response)
            else:
                assert o.message is self.req or o.message.method == "ACK"  # type: ignore[union-attr]
            if name in ("timer", "tick"):
                assert not self.reliable  # no retransmissions on reliable transports
        if self.side == "server":
            assert not any(isinstance(o, Deliver) for o in out)


KINDS = [(side, invite, reliable) for side in ("server", "client")
         for invite in (True, False) for reliable in (True, False)]  # fmt: skip


@pytest.mark.parametrize(("side", "invite", "reliable"), KINDS)
def test_every_state_input_pair(side: str, invite: bool, reliable: bool) -> None:
    """Every input sequence of length 4: covers each (state, input) pair of each machine."""
    inputs = SERVER_INPUTS if side == "server" else CLIENT_INPUTS
    seen: set[tuple[object, str]] = set()
    for seq in itertools.product(inputs, repeat=4):
        h = Harness(side, invite, reliable)
        for name in seq:
            seen.add((h.txn.state, name))
            h.feed(name)
    states = {a for a, _ in RFC_EDGES[(side, invite)]} | {b for _, b in RFC_EDGES[(side, invite)]}
    if reliable and side == "server" and invite:
        states.discard(SS.CONFIRMED)  # Timer I = 0: Confirmed is left at once
    if reliable and (side, invite) in (("server", False), ("client", True), ("client", False)):
        states.discard(SS.COMPLETED if side == "server" else CS.COMPLETED)  # J, D, K = 0
    assert seen == {(s, name) for s in states for name in inputs}


inputs_strategy = st.one_of(
    st.sampled_from(SERVER_INPUTS + CLIENT_INPUTS).map(lambda n: (n, 0.3)),
    st.tuples(st.just("tick"), st.floats(min_value=0, max_value=70, allow_nan=False)),
)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    steps=st.lists(inputs_strategy, max_size=25),
)
def test_random_input_sequences_keep_invariants(
    kind: tuple[str, bool, bool], steps: list[tuple[str, float]]
) -> None:
    side, invite, reliable = kind
    h = Harness(side, invite, reliable)
    allowed = SERVER_INPUTS if side == "server" else CLIENT_INPUTS
    for name, dt in steps:
        if name in allowed:
            h.feed(name, dt)


def test_timer_inputs_are_named_after_the_rfc() -> None:
    assert [t.name for t in Timer] == list("ABDEFGHIJK")
