"""Fuzz the SIP parser: parse it, or raise ParseError; anything else is a bug.

Every input is tried as a datagram and as a stream frame, under the default limits and
under tight ones (so that each limit's error path runs), and what parses is validated.
Beyond the plain contract, what the proxy does next with the result must work too:

- a StartLineError for a request carries a partial message whose answer can be built
  and serialized (the server sends it);
- a message that validates serializes to bytes that parse and validate again, to an
  equal message (the proxy forwards what it serialized);
- a request that validates can be answered (``make_response``), and the answer parses;
- a REGISTER that validates gets a response from the registrar, never an exception
  (``process_register``: "peer errors come back as responses").
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["proxy"]):
    from proxy.sip.errors import ParseError
    from proxy.sip.message import (
        DEFAULT_LIMITS,
        ParseLimits,
        Request,
        Response,
        StartLineError,
        error_response,
        make_response,
        parse_message,
        validate_request,
        validate_response,
    )
    from proxy.sip.registrar import RegistrarConfig, process_register

from harness import run

REGISTRAR = RegistrarConfig(domains=("example.com",))
TIGHT = ParseLimits(
    max_message_bytes=1024, max_headers=12, max_header_line=160, max_via=3, max_route=2
)


def _validate(msg: Request | Response) -> bool:
    try:
        if isinstance(msg, Request):
            validate_request(msg)
        else:
            validate_response(msg)
    except ParseError:
        return False
    return True


def check(data: bytes) -> None:
    for stream in (False, True):
        for limits in (DEFAULT_LIMITS, TIGHT):
            try:
                msg = parse_message(data, stream=stream, limits=limits)
            except StartLineError as exc:
                if exc.partial.is_request:
                    error_response(exc.partial, exc).to_bytes()
                continue
            except ParseError:
                continue
            if not _validate(msg):
                continue
            wire = msg.to_bytes()
            again = parse_message(wire, stream=stream)
            assert again == msg, (msg, again)
            assert _validate(again), wire
            if isinstance(msg, Request):
                answer = parse_message(make_response(msg, 487, to_tag="fz").to_bytes())
                assert isinstance(answer, Response) and answer.status == 487
                if msg.method == "REGISTER":
                    out = process_register(msg, (), 1000.0, REGISTRAR, source="udp:x", to_tag="t")
                    parse_message(out.response.to_bytes())


def test_one_input(data: bytes) -> None:
    check(data)


if __name__ == "__main__":
    run(test_one_input)
