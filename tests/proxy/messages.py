"""SIP messages as a phone or another site's proxy would send them to the proxy under test."""

from __future__ import annotations

from collections.abc import Sequence

from proxy.sip.message import Request, Response, parse_message, validate_request

PHONE_VIA = "SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKphone1;rport"


def phone_via(branch: str) -> str:
    """The phone's Via for another transaction (each needs its own branch)."""
    return f"SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK{branch};rport"


def request_bytes(
    method: str = "INVITE",
    ruri: str = "sip:bob@example.com",
    *,
    from_: str = "sip:alice@example.com",
    to: str = "sip:bob@example.com",
    to_tag: str | None = None,
    call_id: str = "call-1@192.0.2.10",
    cseq: int = 1,
    vias: Sequence[str] = (PHONE_VIA,),
    contact: str | None = "<sip:alice@192.0.2.10:5060>",
    extra: Sequence[str] = (),
    body: bytes = b"",
) -> bytes:
    lines = [
        f"{method} {ruri} SIP/2.0",
        *(f"Via: {v}" for v in vias),
        "Max-Forwards: 70",
        f"To: <{to}>" + (f";tag={to_tag}" if to_tag else ""),
        f"From: <{from_}>;tag=f00d",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}",
        *([f"Contact: {contact}"] if contact is not None else []),
        *extra,
        f"Content-Length: {len(body)}",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def request(method: str = "INVITE", ruri: str = "sip:bob@example.com", **kw: object) -> Request:
    """A parsed, validated request (what the server hands its handlers)."""
    msg = parse_message(request_bytes(method, ruri, **kw))  # type: ignore[arg-type]
    assert isinstance(msg, Request)
    validate_request(msg)
    return msg


def register(
    *contacts: str,
    aor: str = "sip:alice@example.com",
    expires: int | None = None,
    call_id: str = "reg-1@192.0.2.10",
    cseq: int = 1,
    extra: Sequence[str] = (),
) -> Request:
    """A REGISTER of ``aor`` binding ``contacts`` (none: a query)."""
    lines = [*(f"Contact: {c}" for c in contacts[1:]), *extra]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    return request(
        "REGISTER", "sip:example.com", from_=aor, to=aor, call_id=call_id, cseq=cseq,
        contact=contacts[0] if contacts else None, extra=lines,
    )  # fmt: skip


def parse_response(data: bytes) -> Response:
    msg = parse_message(data)
    assert isinstance(msg, Response), data
    return msg


def contacts_of(resp: Response) -> list[str]:
    """The Contact values of a response (a 200 to REGISTER lists the bindings)."""
    return resp.headers.values("Contact")
