"""Registrar decisions (RFC 3261 §10.3), free of I/O.

``process_register`` takes a validated REGISTER, the AOR's current bindings and the time,
and returns the response to send plus the new set of bindings to store (or None when
nothing changes). Storage, authentication and locking around one AOR are the caller's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .binding import Binding
from .errors import (
    Forbidden,
    IntervalTooBrief,
    NotFound,
    ParseError,
    SipError,
    TemporarilyUnavailable,
)
from .headers import NameAddr, parse_delta_seconds, parse_name_addr
from .message import Request, Response, error_response, make_response
from .uri import SipUri, Uri, aor_of


@dataclass(frozen=True, slots=True)
class RegistrarConfig:
    domains: tuple[str, ...] = ()  # lower case; empty means "any domain"
    min_expires: int = 60
    max_expires: int = 7200
    default_expires: int = 3600
    max_contacts: int = 10
    # RFC 5626 §4.4.1 Flow-Timer: seconds within which a phone registered with outbound
    # sends a keep-alive on its flow (UDP: STUN; streams: CRLF, before the idle timeout).
    flow_timer_udp: int = 60
    flow_timer_stream: int = 540


class FlowFailed(TemporarilyUnavailable):
    """RFC 5626 §5.3: the flow a binding registered with outbound must be reached over
    is gone; the phone registers again over a new one. (A 480 to callers who may not
    learn that the user exists, like every other "not reachable now".)"""

    status_code = 430
    reason = "Flow Failed"


class FirstHopLacksOutbound(SipError):
    """RFC 5626 §6: outbound asked for through a proxy that did not say it can keep the
    flow (no ``ob`` in the first Path URI)."""

    status_code = 439
    reason = "First Hop Lacks Outbound Support"


@dataclass(frozen=True, slots=True)
class RegisterOutcome:
    response: Response
    aor: str | None = None
    bindings: tuple[Binding, ...] | None = None  # the AOR's new set; None: unchanged
    # RFC 5626: the contact registered with outbound, reached only over ``source``.
    outbound: str | None = None

    @property
    def changed(self) -> bool:
        return self.bindings is not None


def serves(config: RegistrarConfig, host: str) -> bool:
    return not config.domains or host.lower() in config.domains


def register_aor(req: Request, config: RegistrarConfig, *, addressed_to_me: bool = False) -> str:
    """The AOR a REGISTER is about (its To URI), checked against the served domains.

    RFC 3261 §10.3 steps 1 and 5: a Request-URI domain we do not serve gets 403, a To
    that is not a valid AOR of that domain gets 404. Phones that name the proxy's own
    address as registrar (``addressed_to_me``) are judged by their To domain alone.
    """
    ruri = req.ruri
    if not isinstance(ruri, SipUri) or not (addressed_to_me or serves(config, ruri.host)):
        raise Forbidden(reason="Domain Not Served")
    to_uri = req.to.uri
    if not isinstance(to_uri, SipUri) or to_uri.user is None:
        raise NotFound("the To header names no user")
    if not serves(config, to_uri.host):
        raise NotFound("the To domain is not served here")
    return aor_of(to_uri)


def contact_key(uri_text: str) -> str:
    """Comparable form of a contact URI (RFC 3261 §19.1.4, simplified: case of scheme/host)."""
    try:
        uri = parse_name_addr(f"<{uri_text}>").uri
    except ParseError:
        return uri_text
    return uri_key(uri)


def uri_key(uri: Uri) -> str:
    """:func:`contact_key` of a URI already parsed (``contact_key(str(uri))``)."""
    if isinstance(uri, SipUri):
        scheme, host = uri.scheme.lower(), uri.host.lower()
        if scheme != uri.scheme or host != uri.host:
            uri = replace(uri, scheme=scheme, host=host)
    return str(uri)


def _delta_seconds(raw: str, what: str) -> int:
    """An expiry the phone asked for: delta-seconds (RFC 3261 §25.1), or a 400.

    §10.2.1.1 says malformed values "SHOULD be treated as equivalent to 3600", for RFC
    2543's absolute dates. We answer 400 instead: a phone that sends ``expires=-1`` or a
    date learns at once that it was not understood, rather than hold a binding for a time
    it never asked for. Values past 2**32-1 are delta-seconds, and are capped (§10.2.1.1
    allows it; so does RFC 4475 §3.1.2.4), then capped again at ``max_expires``.
    """
    try:
        return parse_delta_seconds(raw)
    except ParseError:
        raise ParseError(f"malformed {what}") from None


def _expires_of(contact: NameAddr, header_expires: int | None, config: RegistrarConfig) -> int:
    # §10.3 step 7: the contact's "expires" parameter, else the Expires header, else ours.
    raw = contact.param("expires")  # "" when present without a value: malformed too
    if raw is not None:
        return min(_delta_seconds(raw, "Contact expires parameter"), config.max_expires)
    if header_expires is not None:
        return min(header_expires, config.max_expires)
    return config.default_expires


# RFC 3261 §25.1: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )
_QVALUE = re.compile(r"0(\.[0-9]{0,3})?|1(\.0{0,3})?")


def _q_of(contact: NameAddr) -> float:
    raw = contact.param("q")
    if raw is None:
        return 1.0
    if not _QVALUE.fullmatch(raw):
        raise ParseError("malformed q-value")
    return float(raw)


def _out_of_order() -> SipError:
    # §10.3 steps 6 and 7: an update with a CSeq not higher than the binding's, in the
    # same Call-ID, "MUST be aborted and the request fails". The RFC names no code; like
    # an out-of-order request in a dialog (§12.2.2) it gets 500. A 400 would tell the
    # phone its well-formed request was malformed.
    return SipError(status_code=500, reason="CSeq Out Of Order")


def _reg_id(contact: NameAddr) -> int | None:
    raw = contact.param("reg-id")
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 10:
        raise ParseError("malformed reg-id")
    return int(raw)


def ok_response(
    req: Request,
    bindings: Sequence[Binding],
    now: float,
    to_tag: str,
    *,
    flow_timer: int | None = None,
) -> Response:
    """200 OK listing every current binding with its remaining time (§10.3 step 8), and
    the instance and reg-id it was registered with (RFC 5626 §6). ``flow_timer``: the
    REGISTER was processed with outbound, which the 200 says (``Require: outbound``)
    with the Flow-Timer the phone keeps its flow alive by (RFC 5626 §4.4.1)."""
    extra = [("Contact", _listed(b, now)) for b in sorted(bindings, key=lambda b: -b.q)]
    if flow_timer is not None:
        extra += [("Require", "outbound"), ("Flow-Timer", str(flow_timer))]
    return make_response(req, 200, to_tag=to_tag, extra=extra)


def _listed(b: Binding, now: float) -> str:
    text = f"<{b.contact}>;expires={b.remaining(now)}" + (f";q={b.q:g}" if b.q != 1.0 else "")
    if b.instance is not None:
        text += f";+sip.instance={b.instance}"
        if b.reg_id is not None:
            text += f";reg-id={b.reg_id}"
    return text


def flow_timer(config: RegistrarConfig, source: str) -> int:
    """The Flow-Timer for a flow ("udp:1.2.3.4:5060"): UDP, or a stream transport."""
    udp = source.partition(":")[0].lower() == "udp"
    return config.flow_timer_udp if udp else config.flow_timer_stream


def _supports(req: Request, option: str) -> bool:
    return any(tag.strip().lower() == option for tag in req.headers.values("Supported"))


def _outbound_contact(req: Request, contacts: Sequence[NameAddr]) -> NameAddr | None:
    """The contact to register with RFC 5626 outbound, or None (RFC 5626 §6).

    Outbound is what the phone asks for with ``Supported: outbound`` and a contact with
    ``+sip.instance`` and ``reg-id``; otherwise the reg-id only names the binding. One
    REGISTER sets up one flow, so two such contacts are a 400. A REGISTER that passed
    another proxy first (more than one Via, or a Path) is only outbound when that proxy
    said it keeps the flow (``ob`` in the first Path URI); otherwise 439.
    """
    if not _supports(req, "outbound"):
        return None
    flows = [c for c in contacts if c.param("reg-id") is not None and c.param("+sip.instance")]
    if not flows:
        return None
    if len(flows) > 1:
        raise ParseError("more than one Contact with reg-id")
    paths = req.headers.values("Path")
    if len(req.vias) > 1 or paths:
        first = parse_name_addr(paths[0]).uri if paths else None
        if not (isinstance(first, SipUri) and first.param("ob") is not None):
            raise FirstHopLacksOutbound()
    return flows[0]


def process_register(
    req: Request,
    current: Sequence[Binding],
    now: float,
    config: RegistrarConfig,
    *,
    source: str,
    to_tag: str,
    addressed_to_me: bool = False,
) -> RegisterOutcome:
    """Apply a REGISTER to the AOR's current bindings (RFC 3261 §10.3 steps 6-8).

    ``current`` must hold the AOR's live bindings; ``source`` is the flow the request came
    in on ("udp:1.2.3.4:5060"). Peer errors come back as responses, never as exceptions.
    """
    try:
        aor = register_aor(req, config, addressed_to_me=addressed_to_me)
        bindings, outbound = _apply(req, aor, list(current), now, config, source)
    except ParseError as exc:
        return RegisterOutcome(
            make_response(req, 400, str(exc)[:60] or "Bad Request", to_tag=to_tag)
        )
    except SipError as exc:
        return RegisterOutcome(error_response(req, exc, to_tag=to_tag))
    timer = flow_timer(config, source) if outbound is not None else None
    if bindings is None:
        return RegisterOutcome(ok_response(req, current, now, to_tag), aor, None)
    resp = ok_response(req, bindings, now, to_tag, flow_timer=timer)
    return RegisterOutcome(resp, aor, tuple(bindings), outbound)


def _apply(
    req: Request,
    aor: str,
    bindings: list[Binding],
    now: float,
    config: RegistrarConfig,
    source: str,
) -> tuple[list[Binding] | None, str | None]:
    """The AOR's new bindings (None: unchanged), and the contact bound with outbound."""
    header = req.headers.get("Expires")
    header_expires = None if header is None else _delta_seconds(header, "Expires header")
    contacts = req.contacts
    if not contacts:
        return None, None  # a query: just list the bindings
    call_id = req.call_id
    cseq = req.cseq.number

    if "*" in contacts:
        # §10.3 step 6: "*" must be alone, with Expires: 0.
        if len(contacts) != 1 or header_expires != 0:
            raise ParseError("Contact: * requires Expires: 0 and no other contact")
        for b in bindings:
            if b.call_id == call_id and cseq <= b.cseq:
                raise _out_of_order()
        return [], None

    parsed = req.contact_addrs  # parsed once, by validate_request
    outbound = _outbound_contact(req, parsed)
    updates: list[tuple[NameAddr, int]] = []
    for contact in parsed:
        expires = _expires_of(contact, header_expires, config)
        if 0 < expires < config.min_expires:
            # §10.3 step 7: too brief; tell the phone the minimum.
            raise IntervalTooBrief(config.min_expires)
        updates.append((contact, expires))

    # Keys of the contacts asked for, by their text: a binding registered with the same
    # text (a refresh, as phones send) has the same key, without parsing it again.
    keys = {str(contact.uri): uri_key(contact.uri) for contact, _ in updates}
    by_key = {keys.get(b.contact) or contact_key(b.contact): b for b in bindings}
    changed = False
    bound_outbound = None
    for contact, expires in updates:
        uri_text = str(contact.uri)
        key = keys[uri_text]
        instance = contact.param("+sip.instance")
        reg_id = _reg_id(contact)
        old = by_key.get(key)
        if old is None and instance is not None:
            # RFC 5626 §6: the same instance and reg-id replace the old flow's binding.
            for k, b in by_key.items():
                if b.instance == instance and b.reg_id == reg_id:
                    old = by_key.pop(k)
                    break
        if old is not None and old.call_id == call_id and cseq <= old.cseq:
            raise _out_of_order()
        if expires == 0:
            if by_key.pop(key, None) is not None or old is not None:
                changed = True
            continue
        new = Binding(
            aor=aor,
            contact=uri_text,
            expires_at=now + expires,
            q=_q_of(contact),
            call_id=call_id,
            cseq=cseq,
            source=source,
            instance=instance,
            reg_id=reg_id,
            path=tuple(req.headers.values("Path")),
            registered_at=old.registered_at if old is not None else now,
        )
        by_key[key] = new
        changed = True
        if contact is outbound:
            bound_outbound = uri_text
    if len(by_key) > config.max_contacts:
        raise Forbidden(reason="Too Many Contacts")
    return (list(by_key.values()) if changed else None), bound_outbound


__all__ = [
    "FirstHopLacksOutbound",
    "FlowFailed",
    "RegisterOutcome",
    "RegistrarConfig",
    "contact_key",
    "flow_timer",
    "ok_response",
    "process_register",
    "register_aor",
    "serves",
    "uri_key",
]
