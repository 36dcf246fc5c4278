"""Time the sans-IO hot path: parsing, validation and the registrar's decision.

Run by hand from the repository root, never under pytest::

    .venv/bin/python bench/parse.py [--seconds 0.5] [--repeat 5]

Each case is timed with :mod:`timeit` on this process's CPU clock
(``time.process_time``), so time spent waiting for a core while other processes run is
not counted: on a shared machine the wall clock mostly measures the neighbours. The loop
count is calibrated to about ``--seconds``; the best and the median of ``--repeat`` runs
are reported as messages per second and microseconds per message. Every case starts from
the raw bytes, because parsed messages cache what they have been asked for.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the checkout, not whatever p2psip is installed

from proxy.sip.forwarding import (  # noqa: E402
    ProxyIdentity,
    forward_copy,
    loop_hash,
    received_params,
)
from proxy.sip.matching import server_key  # noqa: E402
from proxy.sip.message import Request, parse_message, validate_request  # noqa: E402
from proxy.sip.registrar import RegistrarConfig, process_register, register_aor  # noqa: E402

NOW = 1_800_000_000.0  # a fixed wall-clock time: the registrar takes time as an input

INVITE = (
    b"INVITE sip:bob@p2psip.test SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---6f3a;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060;transport=udp>\r\n"
    b'To: "Bob" <sip:bob@p2psip.test>\r\n'
    b'From: "Alice" <sip:alice@p2psip.test>;tag=8d6b3a1f\r\n'
    b"Call-ID: 3c26700857c4-ie5vbd0r8wq@alice-phone\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Supported: replaces, norefersub, timer\r\n"
    b"User-Agent: Bench Phone 1.0\r\n"
    b"Content-Length: 135\r\n"
    b"\r\n"
    b"v=0\r\n"
    b"o=alice 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
    b"s=-\r\n"
    b"c=IN IP4 192.0.2.10\r\n"
    b"t=0 0\r\n"
    b"m=audio 49170 RTP/AVP 0 8\r\n"
    b"a=rtpmap:0 PCMU/8000\r\n"
    b"a=rtpmap:8 PCMA/8000\r\n"
)

REGISTER = (
    b"REGISTER sip:p2psip.test SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-524287-1---a81c;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"Contact: <sip:alice@192.0.2.10:5060;transport=udp>;expires=3600\r\n"
    b"To: <sip:alice@p2psip.test>\r\n"
    b"From: <sip:alice@p2psip.test>;tag=41d2c7e9\r\n"
    b"Call-ID: 9a7f4c8e1b2d-register@alice-phone\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Expires: 3600\r\n"
    b"Allow: INVITE, ACK, CANCEL, BYE, NOTIFY, REFER, MESSAGE, OPTIONS, INFO, SUBSCRIBE\r\n"
    b"Supported: replaces, outbound, path\r\n"
    b"User-Agent: Bench Phone 1.0\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)

REGISTRAR = RegistrarConfig(domains=("p2psip.test",))
ME = ProxyIdentity("198.51.100.1", 5060, ("p2psip.test",))
SOURCE = "udp:192.0.2.10:5060"


def _request(data: bytes) -> Request:
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def parse_invite() -> None:
    parse_message(INVITE)


def parse_register() -> None:
    parse_message(REGISTER)


def validate_invite() -> None:
    validate_request(_request(INVITE))


def validate_register() -> None:
    validate_request(_request(REGISTER))


def register_ingress() -> None:
    """What the server does to every request before its handler: parse, note the
    source in the top Via (received, rport), validate, find the transaction key."""
    req = _request(REGISTER)
    received_params(req, "192.0.2.99", 5070)
    validate_request(req)
    server_key(req)


def register_decision() -> None:
    """What the registrar does for a new binding, short of the store: parse, validate,
    find the AOR, decide, and serialize the 200 OK."""
    req = _request(REGISTER)
    validate_request(req)
    register_aor(req, REGISTRAR)
    outcome = process_register(req, [], NOW, REGISTRAR, source=SOURCE, to_tag="5a3c0e")
    outcome.response.to_bytes()


def invite_forward() -> None:
    """What the proxy does to an INVITE for one registered target, short of the lookup
    and the transaction: parse, validate, loop hash, copy with Via and Record-Route."""
    req = _request(INVITE)
    validate_request(req)
    fwd = forward_copy(
        req,
        "sip:bob@203.0.113.7:5062",
        ME,
        branch="z9hG4bK-" + loop_hash(req) + "-1",
        out_transport="udp",
        in_transport="udp",
        record_route=True,
    )
    fwd.to_bytes()


CASES: dict[str, Callable[[], None]] = {
    "parse INVITE": parse_invite,
    "parse REGISTER": parse_register,
    "parse + validate INVITE": validate_invite,
    "parse + validate REGISTER": validate_register,
    "REGISTER ingress (+ received, transaction key)": register_ingress,
    "REGISTER decision (parse .. 200 OK bytes)": register_decision,
    "INVITE forward (parse .. forwarded bytes)": invite_forward,
}


def time_case(case: Callable[[], None], seconds: float, repeat: int) -> tuple[float, float]:
    """CPU seconds per call, best and median over ``repeat`` loops of about ``seconds``."""
    timer = timeit.Timer(case, timer=time.process_time)
    loops, took = timer.autorange()
    loops = max(1, int(loops * seconds / max(took, 1e-9)))
    runs = [t / loops for t in timer.repeat(repeat=repeat, number=loops)]
    return min(runs), statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="length of one timed loop")
    parser.add_argument("--repeat", type=int, default=5, help="timed loops per case (best wins)")
    args = parser.parse_args(argv)

    for case in CASES.values():
        case()  # fail loudly before timing anything
    print(f"python {platform.python_version()} ({platform.python_implementation()}), ", end="")
    print(f"{platform.machine()}, CPU time, {args.repeat} x ~{args.seconds}s")
    print(f"{'case':<48} {'msg/s':>10} {'us/msg':>8} {'median':>8}")
    for name, case in CASES.items():
        best, median = time_case(case, args.seconds, args.repeat)
        print(f"{name:<48} {1 / best:>10,.0f} {best * 1e6:>8.1f} {median * 1e6:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
