"""Tokens the proxy writes into what it sends, to recognise its own work when it comes
back: keyed MACs (HMAC-SHA256 with a per-site secret), free of I/O.

* A **dialog token** in the proxy's Record-Route (``;p2d=``): an in-dialog request is
  routed on only when the Route naming this proxy carries the token of its Call-ID and
  one of its tags. Without it, anyone could make up a To tag and a Route and have the
  proxy relay "in-dialog" requests anywhere (an open relay).
* A **branch MAC** in the Via branch of every request it forwards: a response that
  matches no transaction (a retransmitted or forked 2xx, RFC 3261 §16.7 step 5) is
  forwarded statelessly to its second Via only when our branch vouches for that Via;
  otherwise a made-up response could make the proxy send packets anywhere (reflection).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .headers import Via

DIALOG_PARAM = "p2d"
_DIALOG_HEX = 16
_BRANCH_MAC_HEX = 8


class ProxyTokens:
    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("the token secret must not be empty")
        # Separate keys per use, so that no token can stand in for another.
        self._dialog_key = hmac.new(secret, b"p2psip dialog", hashlib.sha256).digest()
        self._branch_key = hmac.new(secret, b"p2psip branch", hashlib.sha256).digest()

    def _mac(self, key: bytes, text: str, length: int) -> str:
        data = text.encode("utf-8", "surrogateescape")
        return hmac.new(key, data, hashlib.sha256).hexdigest()[:length]

    # -- dialogs ------------------------------------------------------------------------

    def dialog(self, call_id: str, tag: str) -> str:
        """The token for a dialog that ``tag`` (the initial request's From tag) opened."""
        return self._mac(self._dialog_key, f"{call_id}\x00{tag}", _DIALOG_HEX)

    def dialog_ok(self, token: str | None, call_id: str, tags: Iterable[str | None]) -> bool:
        """Does ``token`` belong to this Call-ID and one of ``tags`` (From and To tag:
        the dialog's initiator may be on either side of a later request)?"""
        if not token or len(token) != _DIALOG_HEX:
            return False
        return any(
            tag is not None and hmac.compare_digest(token, self.dialog(call_id, tag))
            for tag in tags
        )

    # -- branches -----------------------------------------------------------------------

    def _via_text(self, via: Via) -> str:
        return f"{via.host.lower()}\x00{via.port}\x00{via.branch}"

    def branch_unique(self, unique: str, upstream: Via) -> str:
        """``unique`` with a MAC of the Via the responses go back to."""
        return unique + self._mac(self._branch_key, f"{unique}\x00{self._via_text(upstream)}",
                                  _BRANCH_MAC_HEX)  # fmt: skip

    def branch_ok(self, branch: str | None, upstream: Via) -> bool:
        """Did we make ``branch`` (see ``forwarding.make_branch``) for this upstream Via?"""
        if not branch:
            return False
        signed = branch.rpartition("-")[2]
        unique, mac = signed[:-_BRANCH_MAC_HEX], signed[-_BRANCH_MAC_HEX:]
        if not unique:
            return False
        return hmac.compare_digest(self.branch_unique(unique, upstream)[-_BRANCH_MAC_HEX:], mac)
