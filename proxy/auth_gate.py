"""Digest authentication of requests at the server: challenge, refuse, or let through."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .sip.auth import AuthStatus, DigestAuthenticator
from .sip.message import Request, make_response
from .sip.uri import SipUri
from .users import UserDirectory

if TYPE_CHECKING:
    from .server import ServerTx, SipServer

log = logging.getLogger(__name__)


class AuthGate:
    def __init__(self, server: SipServer, users: UserDirectory, realm: str, secret: bytes) -> None:
        self.server = server
        self.users = users
        self.realm = realm
        self.digest = DigestAuthenticator(realm, secret)

    def authenticate(self, stx: ServerTx, *, proxy: bool) -> str | None:
        """The authenticated username, or None after answering the request ourselves.

        ``proxy`` selects 407/Proxy-Authorization (requests we forward) over
        401/Authorization (REGISTER, RFC 3261 §22.1, §22.3).
        """
        req = stx.request
        now = self.server.clock()
        result = self.digest.verify(req, now, self.users.get, proxy=proxy)
        status = result.status
        if status is AuthStatus.OK:
            if proxy:
                # §22.3: credentials for our realm are consumed here, not forwarded.
                req.headers.remove("Proxy-Authorization")
            return result.username
        if status is AuthStatus.MALFORMED:
            log.info("%s %s: malformed credentials: %s", req.method, req.call_id, result.reason)
            self.server.respond(stx, make_response(req, 400, "Malformed Credentials", to_tag=stx.to_tag))
            return None
        if status is AuthStatus.FAILED:
            log.warning(
                "%s %s from %s: authentication failed (%s)", req.method, req.call_id, stx.flow, result.reason
            )
            self.server.stats.inc("auth_failures")
            self.server.respond(stx, make_response(req, 403, "Forbidden", to_tag=stx.to_tag))
            return None
        code = 407 if proxy else 401
        stale = status is AuthStatus.STALE
        algorithms = self._algorithms(req, proxy)
        challenge = self.digest.challenge(now, proxy=proxy, stale=stale, algorithms=algorithms)
        self.server.respond(stx, make_response(req, code, to_tag=stx.to_tag, extra=challenge))
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
