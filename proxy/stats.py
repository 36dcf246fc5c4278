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
    calls_routed_local: int = 0
    calls_routed_dht: int = 0
    dht_lookups: int = 0
    dht_retries: int = 0

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
