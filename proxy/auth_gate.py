"""Digest authentication of requests at the server: challenge, refuse, or let through.

The gate is on when the site has a users file or any user, and switches on by itself when
the first user is added (through the admin API); it never switches off again while the
site runs, so deleting every user does not open registration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .sip.auth import AuthStatus, DigestAuthenticator, UserRecord
from .sip.message import Request, make_response
from .sip.uri import SipUri
from .stats import SipCounters
from .transactions import ServerTx, Transactions

log = logging.getLogger(__name__)


class Users(Protocol):
    """The users the gate checks credentials against."""

    def get(self, username: str) -> UserRecord | None: ...

    def __len__(self) -> int: ...

    def subscribe(self, listener: Callable[[], None]) -> None: ...


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
        required: bool = False,
    ) -> None:
        """``required``: on from the start even with no users (a users file was given)."""
        self.users = users
        self.realm = realm
        self.digest = DigestAuthenticator(realm, secret)
        self._transactions = transactions
        self._counters = counters
        self._clock = clock
        self._enabled = False
        self._required = required
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

    def authenticate(self, stx: ServerTx, *, proxy: bool) -> str | None:
        """The authenticated username, or None after answering the request ourselves.

        ``proxy`` selects 407/Proxy-Authorization (requests we forward) over
        401/Authorization (REGISTER, RFC 3261 §22.1, §22.3).
        """
        req = stx.request
        now = self._clock()
        result = self.digest.verify(req, now, self.users.get, proxy=proxy)
        status = result.status
        respond = self._transactions.respond
        if status is AuthStatus.OK:
            if proxy:
                # §22.3: credentials for our realm are consumed here, not forwarded.
                req.headers.remove("Proxy-Authorization")
            return result.username
        if status is AuthStatus.MALFORMED:
            log.info("%s %s: malformed credentials: %s", req.method, req.call_id, result.reason)
            respond(stx, make_response(req, 400, "Malformed Credentials", to_tag=stx.to_tag))
            return None
        if status is AuthStatus.FAILED:
            log.warning(
                "%s %s from %s: authentication failed (%s)",
                req.method, req.call_id, stx.flow, result.reason,
            )  # fmt: skip
            self._counters.auth_failures += 1
            respond(stx, make_response(req, 403, "Forbidden", to_tag=stx.to_tag))
            return None
        code = 407 if proxy else 401
        stale = status is AuthStatus.STALE
        algorithms = self._algorithms(req, proxy)
        challenge = self.digest.challenge(now, proxy=proxy, stale=stale, algorithms=algorithms)
        respond(stx, make_response(req, code, to_tag=stx.to_tag, extra=challenge))
        return None

    def _algorithms(self, req: Request, proxy: bool) -> list[str] | None:
        """Only the algorithms the user has an HA1 for, or None for all of them.

        A user with only ``ha1_md5`` must not be offered SHA-256 first: an RFC 8760 UA
        would answer it and be refused, and MD5-only UAs (SIPp) read just the first one.
        """
        uri = req.from_.uri if proxy else req.to.uri
        record = self.users.get(uri.user or "") if isinstance(uri, SipUri) else None
        if record is None:
            return None
        offered = [a for a in self.digest.algorithms if record.ha1_for(a) is not None]
        return offered or None
