"""SIPp against a real ``p2psip run`` process: REGISTER floods, call flows, failure codes.

Issue 2 acceptance: SIPp shows no failures at 500 REGISTER/s, and calls from a SIPp UAC
through the proxy reach a SIPp UAS registered at it, with ACK and BYE following the
Record-Route and zero failed calls.

Counting SIPp's successes is not enough on its own: a flood also checks that every binding
is really stored (a REGISTER without Contact lists it, RFC 3261 §10.2.3) and reachable
(calls to some of the users arrive at the UAS behind their contact), and a call flow reads
SIPp's message traces to see that the ACK and BYE went through the proxy.
"""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.sipp import (
    DEFAULT_DOMAIN,
    LOOPBACK,
    Address,
    Sipp,
    SippResult,
    Transport,
    contact_params,
    free_port,
)
from tests.support.site import Site

pytestmark = pytest.mark.e2e

TRANSPORTS: list[Transport] = ["u1", "t1"]
DOMAIN = DEFAULT_DOMAIN  # what the SIPp scenarios put in Request-URI, From and To

FLOOD_RATE = 500  # REGISTER/s: the acceptance figure
FLOOD_USERS = 2500  # five seconds at FLOOD_RATE
AUTH_RATE = 250  # REGISTER/s with a digest challenge each: twice the transactions
AUTH_USERS = 1000
PASSWORD = "secret"
CALLS = 100
CALL_RATE = 25  # calls/s

SiteFactory = Callable[..., Site]


@pytest.fixture
def site(site_factory: SiteFactory) -> Site:
    """A site serving DOMAIN with open registration."""
    return site_factory("--domain", DOMAIN)


def address(site: Site) -> Address:
    return (site.host, site.port)


def call_rate(result: SippResult) -> float:
    """Calls per second over the whole run, SIPp's CallRate(C): the calls it created over
    the time until the last one ended. A registrar that falls behind stretches that time
    (queued requests, retransmissions after 500 ms), so this drops below the -r asked."""
    return float(result.stats.get("CallRate(C)") or 0)


# Slack for a shared CI machine: 0.8 lets a 5 s run end 1.25 s late.
KEPT_PACE = 0.8


def flood_users(count: int) -> list[str]:
    return [f"user{n:04d}" for n in range(count)]


# --- REGISTER fetches over a plain UDP socket ---------------------------------------------

_CONTACT_URI = re.compile(r"<([^>]*)>")


def fetch_contacts(site: Site, users: Iterable[str], timeout: float = 0.5) -> dict[str, list[str]]:
    """The contact URIs the registrar lists for each user (a REGISTER with no Contact).

    One request at a time from one socket; a lost datagram is retried with a new
    transaction. Raises AssertionError for a user that gets no 200.
    """
    found: dict[str, list[str]] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.settimeout(timeout)
        port = sock.getsockname()[1]
        for user in users:
            for _attempt in range(3):
                branch = "z9hG4bK" + uuid.uuid4().hex[:16]
                sock.sendto(_fetch_request(user, port, branch), address(site))
                reply = _receive_for(sock, branch)
                if reply is not None:
                    break
            else:
                raise AssertionError(f"no answer to a REGISTER fetch for {user}")
            status_line, _, _ = reply.partition("\r\n")
            assert status_line.startswith("SIP/2.0 200 "), f"fetch for {user}: {status_line}"
            found[user] = [
                match.group(1)
                for name, value in _header_lines(reply)
                if name in ("contact", "m")
                for match in _CONTACT_URI.finditer(value)
            ]
    return found


def _fetch_request(user: str, port: int, branch: str) -> bytes:
    return (
        f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {LOOPBACK}:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:{user}@{DOMAIN}>;tag={uuid.uuid4().hex[:8]}\r\n"
        f"To: <sip:{user}@{DOMAIN}>\r\n"
        f"Call-ID: {uuid.uuid4().hex}\r\n"
        "CSeq: 1 REGISTER\r\n"
        "Content-Length: 0\r\n\r\n"
    ).encode()


def _receive_for(sock: socket.socket, branch: str) -> str | None:
    """The final response for ``branch``; None on timeout. Older answers are skipped."""
    while True:
        try:
            text = sock.recv(65535).decode(errors="replace")
        except TimeoutError:
            return None
        if branch in text and not text.startswith("SIP/2.0 1"):
            return text


def _header_lines(message: str) -> list[tuple[str, str]]:
    head = message.partition("\r\n\r\n")[0]
    pairs = []
    for line in head.split("\r\n")[1:]:
        name, colon, value = line.partition(":")
        if colon:
            pairs.append((name.strip().lower(), value.strip()))
    return pairs


# --- SIPp message traces (-trace_msg) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Traced:
    """One message in a SIPp -trace_msg file."""

    sent: bool
    start_line: str
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order

    @property
    def method(self) -> str | None:
        first = self.start_line.split(" ", 1)[0]
        return None if first == "SIP/2.0" else first

    def values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    @property
    def call_id(self) -> str:
        return (self.values("call-id") or [""])[0]

    @property
    def top_via(self) -> str:
        # SIPp's own responses may fold several Vias into one line; requests never do.
        return (self.values("via") or [""])[0].split(",")[0].strip()


_TRACE_SEPARATOR = re.compile(r"^-{20,} .*$", re.MULTILINE)
_TRACE_DIRECTION = re.compile(r"^(UDP|TCP) message (sent|received)")


def read_trace(path: Path) -> list[Traced]:
    messages = []
    for chunk in _TRACE_SEPARATOR.split(path.read_text(errors="replace")):
        lines = chunk.replace("\r", "").strip("\n").split("\n")
        direction = _TRACE_DIRECTION.match(lines[0]) if lines else None
        if direction is None:
            continue
        body = "\n".join(lines[1:]).strip("\n")
        head = body.split("\n\n", 1)[0].split("\n")
        headers = []
        for line in head[1:]:
            name, colon, value = line.partition(":")
            if colon:
                headers.append((name.strip().lower(), value.strip()))
        messages.append(Traced(direction.group(2) == "sent", head[0], tuple(headers)))
    return messages


def calls_with(messages: Sequence[Traced], method: str, *, sent: bool) -> dict[str, Traced]:
    """The first ``method`` request of each Call-ID that was sent (or received)."""
    found: dict[str, Traced] = {}
    for m in messages:
        if m.method == method and m.sent == sent:
            found.setdefault(m.call_id, m)
    return found


# --- REGISTER floods -----------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_flood_at_500_per_second(sipp: Sipp, site: Site, transport: Transport) -> None:
    users = flood_users(FLOOD_USERS)
    callee_port = free_port()  # every user's contact; a UAS listens there afterwards

    result = sipp.register(
        address(site),
        [(user,) for user in users],
        transport=transport,
        rate=FLOOD_RATE,
        keys={"contact_port": str(callee_port)},
        timeout_s=60,
    )

    assert result.ok, result.report()
    assert (result.successful, result.failed) == (FLOOD_USERS, 0), result.report()
    assert call_rate(result) >= KEPT_PACE * FLOOD_RATE, result.report()

    # Every user is bound to exactly the contact it registered.
    params = contact_params(transport)
    contacts = fetch_contacts(site, users)
    wrong = {
        user: found
        for user, found in contacts.items()
        if found != [f"sip:{user}@{LOOPBACK}:{callee_port}{params}"]
    }
    assert not wrong, f"{len(wrong)} users with wrong bindings, e.g. {list(wrong.items())[:3]}"

    # And the proxy routes calls to them there.
    called = [users[0], users[len(users) // 2], users[-1]]
    uas = sipp.start_uas(port=callee_port, transport=transport, trace_messages=True)
    callers = [sipp.call(address(site), user, transport=transport) for user in called]
    callee = uas.stop()

    for caller in callers:
        assert caller.ok and caller.successful == 1, caller.report()
    assert callee.ok and callee.successful == len(called), callee.report()
    invited = sorted(
        m.start_line
        for m in calls_with(read_trace(callee.logs.messages), "INVITE", sent=False).values()
    )
    assert invited == sorted(
        f"INVITE sip:{user}@{LOOPBACK}:{callee_port}{params} SIP/2.0" for user in called
    )


def write_users_file(path: Path, users: Iterable[str], realm: str = DOMAIN) -> Path:
    """A users file with MD5 HA1s only, so that the proxy challenges with MD5 alone: SIPp
    3.6 reads only the first challenge and cannot answer SHA-256."""
    lines = []
    for user in users:
        ha1 = hashlib.md5(f"{user}:{realm}:{PASSWORD}".encode()).hexdigest()
        lines += [f'[users."{user}"]', f'ha1_md5 = "{ha1}"', ""]
    path.write_text("\n".join(lines))
    return path


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_register_flood_with_digest_auth(
    sipp: Sipp, site_factory: SiteFactory, tmp_path: Path, transport: Transport
) -> None:
    users = flood_users(AUTH_USERS)
    users_file = write_users_file(tmp_path / "users.toml", users)
    site = site_factory("--domain", DOMAIN, "--users", str(users_file))

    # register_auth.xml insists on a 401 before the 200: an open registrar fails it.
    result = sipp.register(
        address(site),
        [(user, PASSWORD) for user in users],
        transport=transport,
        rate=AUTH_RATE,
        timeout_s=60,
    )

    assert result.ok, result.report()
    assert (result.successful, result.failed) == (AUTH_USERS, 0), result.report()
    assert call_rate(result) >= KEPT_PACE * AUTH_RATE, result.report()


def test_register_with_wrong_password_is_refused(
    sipp: Sipp, site_factory: SiteFactory, tmp_path: Path
) -> None:
    users_file = write_users_file(tmp_path / "users.toml", ["alice"])
    site = site_factory("--domain", DOMAIN, "--users", str(users_file))

    result = sipp.register_contact(address(site), "alice", free_port(), password="guess")

    assert (result.successful, result.failed) == (0, 1), result.report()
    assert "403" in result.report(), result.report()


# --- call flows ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_calls_through_the_proxy_follow_record_route(
    sipp: Sipp, site: Site, transport: Transport
) -> None:
    callee_port = free_port()
    registered = sipp.register_contact(address(site), "bob", callee_port, transport=transport)
    assert registered.ok, registered.report()
    uas = sipp.start_uas(port=callee_port, transport=transport, trace_messages=True)

    caller = sipp.call(
        address(site),
        "bob",
        transport=transport,
        calls=CALLS,
        rate=CALL_RATE,
        trace_messages=True,
        timeout_s=30,
    )
    callee = uas.stop()

    assert caller.ok, caller.report()
    assert (caller.successful, caller.failed) == (CALLS, 0), caller.report()
    assert callee.ok, callee.report()
    assert (callee.successful, callee.failed) == (CALLS, 0), callee.report()

    proto = "TCP" if transport == "t1" else "UDP"
    proxy_via = f"SIP/2.0/{proto} {site.host}:{site.port};"
    proxy_uri = f"sip:{site.host}:{site.port}"
    at_callee = read_trace(callee.logs.messages)
    at_caller = read_trace(caller.logs.messages)

    # The proxy record-routes the INVITE (RFC 3261 §16.6 step 4) ...
    invites = calls_with(at_callee, "INVITE", sent=False)
    assert len(invites) == CALLS
    for invite in invites.values():
        assert invite.top_via.startswith(proxy_via), invite
        assert any(proxy_uri in rr and ";lr" in rr for rr in invite.values("record-route")), invite

    # ... so the caller sends ACK and BYE with a Route to the proxy (§12.2.1.1) ...
    for method in ("ACK", "BYE"):
        sent = calls_with(at_caller, method, sent=True)
        assert len(sent) == CALLS, method
        for request in sent.values():
            assert any(proxy_uri in route for route in request.values("route")), request

    # ... and the proxy forwards them: the callee gets them with the proxy's Via on top
    # and one hop spent, and without the Route that named the proxy (§16.4).
    for method in ("ACK", "BYE"):
        received = calls_with(at_callee, method, sent=False)
        assert set(received) == set(invites), method
        for request in received.values():
            assert request.top_via.startswith(proxy_via), request
            assert request.values("max-forwards") == ["69"], request
            assert not any(proxy_uri in route for route in request.values("route")), request


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_to_unknown_user_gets_404(sipp: Sipp, site: Site, transport: Transport) -> None:
    result = sipp.call_expecting_failure(address(site), "nobody", 404, transport=transport, calls=5)

    assert result.ok, result.report()
    assert (result.successful, result.failed) == (5, 0), result.report()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_call_to_unregistered_user_gets_480(sipp: Sipp, site: Site, transport: Transport) -> None:
    port = free_port()
    registered = sipp.register_contact(address(site), "carol", port, transport=transport)
    assert registered.ok, registered.report()
    assert fetch_contacts(site, ["carol"])["carol"] != []

    removed = sipp.register_contact(address(site), "carol", port, transport=transport, expires=0)
    assert removed.ok, removed.report()
    assert fetch_contacts(site, ["carol"]) == {"carol": []}

    result = sipp.call_expecting_failure(address(site), "carol", 480, transport=transport, calls=5)

    assert result.ok, result.report()
    assert (result.successful, result.failed) == (5, 0), result.report()
