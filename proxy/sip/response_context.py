"""Choosing and forwarding responses of a forked request (RFC 3261 §16.7), free of I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from .message import Response, make_response


@dataclass(slots=True)
class Decision:
    forward: list[Response] = field(default_factory=list)  # to send upstream, in order
    cancel_pending: bool = False  # CANCEL the branches still pending (§16.7 step 10)


def _rank(status: int) -> tuple[int, int]:
    """Lower is better among final non-2xx responses (§16.7 step 6)."""
    cls = status // 100
    if cls == 6:
        return (0, status)
    # 503 is a poor choice: it says *this* server is overloaded (§16.7 step 6).
    if status == 503:
        return (9, status)
    # Prefer 3xx, then 4xx (auth challenges before others so they can be collected), 5xx.
    order = {3: 1, 4: 2, 5: 3}.get(cls, 8)
    auth_bonus = 0 if status in (401, 407) else 1
    return (order, auth_bonus * 1000 + status)


class ResponseContext:
    """Collects the responses of every branch of one proxied request."""

    def __init__(self, branches: int) -> None:
        self.pending: set[int] = set(range(branches))
        self.best: Response | None = None
        self.final_sent = False
        self._challenges: list[tuple[str, str]] = []

    @property
    def done(self) -> bool:
        return not self.pending

    def on_response(self, branch: int, resp: Response) -> Decision:
        """A response whose top Via (ours) was already removed."""
        decision = Decision()
        status = resp.status
        if status < 200:
            if status > 100 and not self.final_sent:
                decision.forward.append(resp)  # §16.7 step 5: forward provisionals at once
            return decision
        self.pending.discard(branch)
        if status < 300:
            # 2xx responses are always forwarded, every one of them (§16.7 step 5).
            self.final_sent = True
            decision.forward.append(resp)
            decision.cancel_pending = bool(self.pending)
            return decision
        if status in (401, 407):
            name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            self._challenges += [(name, v) for v in resp.headers.get_all(name)]
        if self.best is None or _rank(status) < _rank(self.best.status):
            self.best = resp
        if status >= 600:
            decision.cancel_pending = bool(self.pending)
        decision.forward += self._final_if_done()
        return decision

    def on_timeout(self, branch: int, request_for_408: Response) -> Decision:
        """A branch's client transaction timed out: it counts as a 408 (§16.7 step 2)."""
        return self.on_response(branch, request_for_408)

    def _final_if_done(self) -> list[Response]:
        if self.pending or self.final_sent or self.best is None:
            return []
        self.final_sent = True
        best = self.best
        if best.status == 503:
            # §16.7 step 6: don't pass on our downstream's overload as our own.
            best = best.copy()
            best.status, best.reason = 500, "Server Internal Error"
            best.headers.remove("Retry-After")
        if best.status in (401, 407) and self._challenges:
            # §16.7 step 7: the client needs every branch's challenge.
            best = best.copy()
            best.headers.remove("WWW-Authenticate")
            best.headers.remove("Proxy-Authenticate")
            for name, value in self._challenges:
                best.headers.add(name, value)
        return [best]


__all__ = ["Decision", "ResponseContext", "make_response"]
