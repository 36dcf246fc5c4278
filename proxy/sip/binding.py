"""A registration binding (RFC 3261 §10): one AOR bound to one contact until a time.

Times are absolute wall-clock seconds passed in by the caller, never read here, so that
bindings survive a restart and tests can use a manual clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Binding:
    aor: str  # normalized "sip:user@host" (see proxy.sip.uri.aor_of)
    contact: str  # the contact URI, as the phone sent it, without the name-addr brackets
    expires_at: float  # absolute wall-clock time
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    # Where the REGISTER really came from, "transport:host:port" (RFC 3581/5626 flow):
    # requests for this contact go there, so phones behind NAT stay reachable.
    source: str = ""
    instance: str | None = None  # +sip.instance (RFC 5626)
    reg_id: int | None = None
    path: tuple[str, ...] = field(default=())  # Path header values (RFC 3327)
    registered_at: float = 0.0

    def remaining(self, now: float) -> int:
        """Whole seconds left, never negative (what the 200 OK's expires param says)."""
        return max(0, int(self.expires_at - now + 0.5))

    def is_live(self, now: float) -> bool:
        return self.expires_at > now
