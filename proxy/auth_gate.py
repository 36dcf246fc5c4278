"""Digest authentication of requests at the server: challenge, refuse, or let through.

The gate is on when the site has a users file or any user, and switches on by itself when
the first user is added (through the admin API); it never switches off again while the
site runs, so deleting every user does not open registration.

What a guesser sees does not depend on whether a user exists: every challenge offers the
same algorithms (``digest_algorithms``, in that order), an unknown user and a wrong
password both get 403 after the same work, and repeated failures block their source for
a while (:mod:`proxy.lockout`), answered 403 at once.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from .lockout import AuthLockout
from .sip.auth import AuthStatus, DigestAuthenticator, UserRecord
from .sip.message import make_response
from .stats import SipCounters
from .transactions import ServerTx, Transactions

log = logging.getLogger(__name__)


class Users(Protocol):
    """The users the gate checks credentials against."""

    def get(self, username: str) -> UserRecord | None: ...

    def __len__(self) -> int: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


class TrustedPeers:
    """SIP servers trusted by their source address (``--trusted-peer ADDRESS[/PREFIX]``):
    a Kamailio or Asterisk edge, an ITSP. Their requests are not challenged and may be
    relayed, as an authenticated local user's (README "Security"), and the flood guard
    never blocks them. Over UDP a source address is only as good as the network's
    filtering of spoofed ones: prefer TCP (or TLS) from peers across the internet."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)
        self.requests = 0  # requests taken from trusted peers without digest

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, host: str) -> bool:
        if not self._networks:
            return False
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return any(address in net for net in self._networks)


class AuthGate:
    def __init__(
        self,
        users: Users,
        realm: str,
        secret: bytes,
        *,
        transactions: Transactions,
        counters: SipCounters,
        clock: Callable[[], float],
        algorithms: Sequence[str] = ("MD5",),
        lockout: AuthLockout | None = None,
        required: bool = False,
        peers: TrustedPeers | None = None,
    ) -> None:
        """``required``: on from the start even with no users (a users file was given);
        ``peers``: sources whose requests need no credentials."""
        self.users = users
        self.realm = realm
        self.digest = DigestAuthenticator(realm, secret, algorithms=algorithms)
        self.lockout = lockout or AuthLockout()
        self._transactions = transactions
        self._counters = counters
        self._clock = clock
        self._enabled = False
        self._required = required
        self.peers = peers or TrustedPeers(())
        users.subscribe(self._users_changed)
        self._users_changed()
        if not self._enabled:
            log.warning(
                "no users: registration is open to anyone (use --users FILE or the admin API)"
            )

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _users_changed(self) -> None:
        if not self._enabled and (len(self.users) or self._required):
            self._enabled = True
            log.info(
                "digest authentication on for %d user(s), realm %r", len(self.users), self.realm
            )

    def trusted_peer(self, stx: ServerTx) -> bool:
        """Does the request come from a trusted peer (counted when it does)?"""
        if stx.flow.host not in self.peers:
            return False
        self.peers.requests += 1
        return True

    def authenticate(self, stx: ServerTx, *, proxy: bool) -> str | None:
        """The authenticated username, or None after answering the request ourselves.

        ``proxy`` selects 407/Proxy-Authorization (requests we forward) over
        401/Authorization (REGISTER, RFC 3261 §22.1, §22.3).
        """
        req = stx.request
        now = self._clock()
        source = stx.flow.host
        respond = self._transactions.respond
        if self.lockout.blocked(source, "", now):
            self._refuse(stx, "blocked after failed authentications")
            return None
        result = self.digest.verify(req, now, self.users.get, proxy=proxy)
        status = result.status
        username = result.username or ""
        if username and self.lockout.blocked(source, username, now):
            self._refuse(stx, f"blocked for {username!r} after failed authentications")
            return None
        if status is AuthStatus.OK:
            self.lockout.succeeded(source, username)
            if proxy:
                # §22.3: credentials for our realm are consumed here, not forwarded.
                req.headers.remove("Proxy-Authorization")
            return result.username
        if status is AuthStatus.MALFORMED:
            log.info("%s %s: malformed credentials: %s", req.method, req.call_id, result.reason)
            respond(stx, make_response(req, 400, "Malformed Credentials", to_tag=stx.to_tag))
            return None
        if status is AuthStatus.FAILED:
            # One INFO line per failure (never the password); a block is a WARNING.
            log.info("%s %s from %s: authentication of %r failed (%s)",
                     req.method, req.call_id, stx.flow, username, result.reason)  # fmt: skip
            self._counters.auth_failures += 1
            block = self.lockout.failed(source, username, now)
            if block is not None:
                self._counters.auth_blocks += 1
                what = f"{block.address} for {block.aor!r}" if block.aor else block.address
                log.warning("blocking %s for %.0f s after %d failed authentications",
                            what, block.seconds, block.failures)  # fmt: skip
            respond(stx, make_response(req, 403, "Forbidden", to_tag=stx.to_tag))
            return None
        code = 407 if proxy else 401
        stale = status is AuthStatus.STALE
        challenge = self.digest.challenge(now, proxy=proxy, stale=stale)
        respond(stx, make_response(req, code, to_tag=stx.to_tag, extra=challenge))
        return None

    def _refuse(self, stx: ServerTx, why: str) -> None:
        """A blocked source: 403 at once, no digest computed (cheaper than the request)."""
        self._counters.auth_refused += 1
        req = stx.request
        log.debug("%s %s from %s refused: %s", req.method, req.call_id, stx.flow, why)
        self._transactions.respond(stx, make_response(req, 403, "Forbidden", to_tag=stx.to_tag))
