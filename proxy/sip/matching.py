"""Transaction matching (RFC 3261 §17.1.3, §17.2.3): which transaction a message is for.

Keys are plain tuples, compared and hashed as a whole. A server key starts with
``MAGIC_COOKIE`` for RFC 3261 branches and with ``"2543"`` for the fallback, so the two
never collide.
"""

from __future__ import annotations

from collections.abc import Hashable

from .message import Request, Response

MAGIC_COOKIE = "z9hG4bK"  # RFC 3261 §8.1.1.7

TransactionKey = tuple[Hashable, ...]


def has_rfc3261_branch(branch: str | None) -> bool:
    # A branch that is just the cookie carries no transaction identifier: RFC 4475 §3.2.1
    # ("badbranch") says to treat it as an RFC 2543 request.
    return branch is not None and branch.startswith(MAGIC_COOKIE) and branch != MAGIC_COOKIE


def _server_key(request: Request, method: str) -> TransactionKey:
    via = request.top_via
    if has_rfc3261_branch(via.branch):
        # §17.2.3: branch, sent-by and method (ACK counting as INVITE).
        return (MAGIC_COOKIE, via.branch, via.sent_by(), method)
    # §17.2.3 RFC 2543 fallback: Request-URI, To tag, From tag, Call-ID, CSeq and top Via.
    # The To tag is left out for INVITE: its ACK carries the tag of our response, which
    # the INVITE lacked, and an INVITE retransmission repeats the INVITE's To anyway.
    # received/rport are ours (§18.2.1), not the client's, so they do not count.
    to_tag = None if method == "INVITE" else request.to.tag
    params = tuple(p for p in via.params if p[0].lower() not in ("received", "rport"))
    top_via = (via.transport, via.sent_by(), params)
    cseq = request.cseq.number
    return ("2543", request.uri, to_tag, request.from_.tag, request.call_id, cseq, top_via, method)


def server_key(request: Request) -> TransactionKey:
    """The server transaction ``request`` belongs to (§17.2.3).

    An ACK gets the key of the INVITE it acknowledges; a CANCEL its own key (see
    :func:`invite_key_for_cancel`). Raises ParseError if a header it reads is malformed.
    """
    return _server_key(request, "INVITE" if request.method == "ACK" else request.method)


def invite_key_for_cancel(cancel: Request) -> TransactionKey:
    """The key of the INVITE server transaction a CANCEL cancels (§9.2)."""
    return _server_key(cancel, "INVITE")


def client_key(message: Request | Response) -> TransactionKey:
    """The client transaction a response belongs to (§17.1.3): branch + CSeq method.

    For a request it is the key of the transaction the request creates.
    """
    return (message.top_via.branch, message.cseq.method)
