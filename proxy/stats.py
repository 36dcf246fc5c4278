"""The SIP side's counters: typed fields, one object per site, passed to what counts.

``snapshot()`` flattens them under the names the admin API and the stats log line use
(``requests_received.INVITE``, ``responses_sent.2xx``, ``registers_ok``…).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class SipCounters:
    requests_received: Counter[str] = field(default_factory=Counter)  # by method
    responses_received: Counter[str] = field(default_factory=Counter)  # by class, "2xx"
    responses_sent: Counter[str] = field(default_factory=Counter)
    parse_errors: int = 0
    registers_ok: int = 0
    auth_failures: int = 0
    auth_blocks: int = 0  # sources (or source and AOR) blocked for failed authentications
    auth_refused: int = 0  # requests refused while their source was blocked
    relay_denied: int = 0  # requests to elsewhere refused (not an authenticated local user)
    identity_mismatch: int = 0  # authenticated users naming someone else in From
    relay_forged: int = 0  # site relay markers without a member site's valid proof
    calls_routed_local: int = 0
    calls_routed_dht: int = 0
    dht_lookups: int = 0
    dht_retries: int = 0
    # Edge protection (proxy.flood, proxy.overload, proxy.transport). The flood counters
    # and the gauges are copied from their owners once a second.
    flood_blocks: int = 0  # times a source was blocked for sending too fast
    flood_dropped: int = 0  # messages dropped unanswered from blocked sources
    flood_blocked: Counter[str] = field(default_factory=Counter)  # blocked now -> dropped
    overload_rejected: int = 0  # new requests answered 503 under overload
    overloaded: int = 0  # gauge: 1 during an overload episode
    queue_delay_ms: int = 0  # gauge: UDP receive queue delay (EWMA)
    tcp_connections: int = 0  # gauge: open SIP TCP connections
    tcp_refused: int = 0  # connections reset at once: over a cap, or a blocked source
    tcp_partial_timeouts: int = 0  # connections closed before completing a message
    resources_exhausted: int = 0  # out of file descriptors or memory (accept, connect)
    # Phones behind NAT (RFC 5626 outbound, proxy.nat_keepalive).
    flow_failed: int = 0  # requests answered 430: every outbound flow of the AOR failed
    nat_keepalives_sent: int = 0  # OPTIONS pings to UDP bindings without outbound
    nat_bindings_removed: int = 0  # bindings whose phone missed three pings in a row

    def request(self, method: str) -> None:
        self.requests_received[method] += 1

    def response(self, status: int, *, sent: bool = False) -> None:
        (self.responses_sent if sent else self.responses_received)[f"{status // 100}xx"] += 1

    def snapshot(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Counter):
                out.update({f"{f.name}.{k}": n for k, n in value.items()})
            else:
                out[f.name] = value
        return out
