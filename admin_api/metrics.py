"""Prometheus metrics of one site, on a registry of the app's own (never the global one).

Counters and gauges are read from a :class:`~admin_api.services.SiteStats` snapshot at
each scrape; the DHT latency histograms are fed as puts and gets finish.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.registry import Collector

from .services import AdminServices, MemberSite, SiteStats

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Methods get a label value of their own; anything else a peer sends is "other", so that a
# stream of made-up methods cannot grow the scrape without bound.
SIP_METHODS = frozenset(
    {"ACK", "BYE", "CANCEL", "INFO", "INVITE", "MESSAGE", "NOTIFY", "OPTIONS", "PRACK"}
    | {"PUBLISH", "REFER", "REGISTER", "SUBSCRIBE", "UPDATE"}
)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    values: Mapping[str, float] | float,
    label: str | None = None,
) -> Metric:
    if isinstance(values, Mapping):
        family = kind(f"p2psip_{name}", doc, labels=[label or "kind"])
        for key, value in sorted(values.items()):
            family.add_metric([key], value)
        return family
    return kind(f"p2psip_{name}", doc, value=values)


def _counter(
    name: str, doc: str, values: Mapping[str, float] | float, label: str | None = None
) -> Metric:
    return _family(CounterMetricFamily, name, doc, values, label)


def _gauge(
    name: str, doc: str, values: Mapping[str, float] | float, label: str | None = None
) -> Metric:
    return _family(GaugeMetricFamily, name, doc, values, label)


def families(s: SiteStats) -> list[Metric]:
    """Every counter and gauge of the snapshot, as metric families."""
    by_method: dict[str, float] = {}
    for method, count in s.requests.items():
        key = method if method in SIP_METHODS else "other"
        by_method[key] = by_method.get(key, 0) + count
    out = [
        _counter("sip_requests_received", "SIP requests received", by_method, "method"),
        _counter("sip_responses_received", "SIP responses received", s.responses_received, "class"),
        _counter("sip_responses_sent", "SIP responses sent", s.responses_sent, "class"),
        _gauge(
            "sip_transactions_active",
            "SIP transactions in progress",
            {"server": s.server_transactions, "client": s.client_transactions},
            "kind",
        ),
        _counter("sip_parse_errors", "unparsable SIP messages received", s.parse_errors),
        _counter("registers_ok", "REGISTERs answered 200", s.registers_ok),
        _counter("auth_failures", "requests refused for wrong credentials", s.auth_failures),
        _gauge("users", "users that can authenticate", s.users),
        _counter(
            "calls_routed",
            "calls routed to local bindings or through the DHT",
            {"local": s.calls_routed_local, "dht": s.calls_routed_dht},
            "via",
        ),
        _counter("dht_retries", "calls retried after a fresh DHT lookup", s.dht_retries),
        _counter(
            "dht_puts",
            "DHT record writes",
            {"ok": s.dht_puts_ok, "failed": s.dht_puts_failed, "skipped": s.dht_puts_skipped},
            "outcome",
        ),
        _counter(
            "dht_gets",
            "DHT lookups",
            {"ok": s.dht_gets_ok, "failed": s.dht_gets_failed},
            "outcome",
        ),
        _gauge("dht_backlog", "records waiting to be written to the DHT", s.dht_backlog),
        _counter("dht_routing_lookups", "DHT lookups made to route a call", s.dht_lookups),
        _counter(
            "dht_lookup_cache",
            "call routing lookups answered by the cache or not",
            {"hit": s.dht_cache_hits, "miss": s.dht_cache_misses},
            "result",
        ),
        _gauge("dht_peers", "nodes in the routing table", s.dht_peers),
        _counter("dht_records_accepted", "records this node's store took", s.dht_records_accepted),
        _counter(
            "dht_records_rejected",
            "records or bindings refused (bad signature, size, AOR)",
            {"store": s.dht_records_rejected, "lookup": s.dht_bindings_rejected_on_get},
            "where",
        ),
        _counter("dht_rpc_timeouts", "DHT RPCs that timed out", s.dht_rpc_timeouts),
    ]
    out += _edge(s.counters)
    out += _sites(s.sites)
    if s.registered_aors is not None and s.registered_bindings is not None:
        out.append(_gauge("registered_aors", "AORs with live bindings", s.registered_aors))
        out.append(_gauge("registered_bindings", "live bindings", s.registered_bindings))
    return out


# The edge's defences (README, "Security"): name in the raw counters -> (metric, help).
EDGE_COUNTERS = {
    "auth_blocks": ("auth_blocks", "sources (or source and AOR) blocked after failed logins"),
    "auth_refused": ("auth_refused", "requests refused while their source was blocked"),
    "relay_denied": ("relay_denied", "requests to elsewhere from callers who may not relay"),
    "identity_mismatch": ("identity_mismatch", "authenticated users sending as someone else"),
    "relay_forged": ("relay_forged", "site relay markers without a member site's proof"),
    "flood_blocks": ("flood_blocks", "sources blocked for sending too fast"),
    "flood_dropped": ("flood_dropped", "messages dropped from blocked sources"),
    "overload_rejected": ("overload_rejected", "new requests answered 503 under overload"),
    "tcp_refused": ("tcp_refused", "TCP connections refused (over a cap, blocked source)"),
    "tcp_partial_timeouts": ("tcp_partial_timeouts", "TCP connections closed half-way"),
    "resources_exhausted": ("resources_exhausted", "times out of file descriptors or memory"),
    "nat_keepalives_sent": ("nat_keepalives_sent", "OPTIONS keeping UDP phones' NAT open"),
    "nat_bindings_removed": ("nat_bindings_removed", "bindings of phones that stopped answering"),
    "flow_failed": ("flow_failed", "requests answered 430: the phone's outbound flow died"),
    "trusted_peer_requests": ("trusted_peer_requests", "requests from trusted peers"),
    "dns_queries": ("dns_queries", "DNS queries made (RFC 3263)"),
    "dns_query_failures": ("dns_query_failures", "DNS queries that failed"),
    "failovers": ("failovers", "requests moved on to the next DNS target"),
}
EDGE_GAUGES = {
    "overloaded": ("overloaded", "1 while new requests are shed with 503"),
    "tcp_connections": ("tcp_connections", "open SIP TCP connections"),
}


def _edge(counters: Mapping[str, float]) -> list[Metric]:
    out = [
        _counter(metric, doc, counters.get(name, 0))
        for name, (metric, doc) in EDGE_COUNTERS.items()
    ]
    out += [
        _gauge(metric, doc, counters.get(name, 0)) for name, (metric, doc) in EDGE_GAUGES.items()
    ]
    out.append(_gauge("dht_node_backlog", "DHT node requests, jobs and puts not done yet",
                      counters.get("dht_node_backlog", 0)))  # fmt: skip
    out.append(_gauge("dht_loop_lag_seconds", "how late the event loop runs (DHT heartbeat)",
                      counters.get("dht_node_loop_lag", 0)))  # fmt: skip
    delay = counters.get("queue_delay_ms", 0) / 1000
    out.append(_gauge("queue_delay_seconds", "UDP receive queue delay (moving average)", delay))
    refused = {
        reason: counters.get(f"dht_node_refused_{reason}", 0)
        for reason in ("no_proof", "stale", "untrusted_key", "bad_signature", "wrong_node_id")
    }
    doc = "DHT datagrams refused: not from a member site"
    out.append(_counter("dht_datagrams_refused", doc, refused, "reason"))
    blocked = sum(1 for name in counters if name.startswith("flood_blocked."))
    out.append(_gauge("flood_blocked_sources", "sources blocked now (up to 20 listed)", blocked))
    return out


def _sites(sites: Sequence[MemberSite]) -> list[Metric]:
    up = GaugeMetricFamily(
        "p2psip_site_reachable", "1 if the member site answers, 0 if not", labels=["site"]
    )
    rtt = GaugeMetricFamily(
        "p2psip_site_rtt_seconds", "round-trip time of the site's last answer", labels=["site"]
    )
    for m in sites:
        if m.reachable is not None:
            up.add_metric([m.site_id], 1.0 if m.reachable else 0.0)
        if m.rtt is not None:
            rtt.add_metric([m.site_id], m.rtt)
    return [up, rtt]


class _SnapshotCollector(Collector):
    """Serves the snapshot set just before each scrape."""

    def __init__(self) -> None:
        self.snapshot: SiteStats | None = None

    def collect(self) -> Iterable[Metric]:
        return families(self.snapshot) if self.snapshot is not None else []

    def describe(self) -> Iterable[Metric]:
        return []  # nothing to check at registration; names come with the snapshot


class SiteMetrics:
    """One app's registry: snapshot collector plus the DHT latency histograms."""

    def __init__(self, services: AdminServices) -> None:
        self.services = services
        self.registry = CollectorRegistry(auto_describe=False)
        self._collector = _SnapshotCollector()
        self.registry.register(self._collector)
        self.dht_latency = Histogram(
            "p2psip_dht_operation_seconds",
            "DHT put and get latency, seen from the site",
            ["op", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        services.watch_dht_latency(self._observe)

    def _observe(self, op: str, seconds: float, ok: bool) -> None:
        self.dht_latency.labels(op, "ok" if ok else "failed").observe(seconds)

    async def render(self) -> bytes:
        # No await between setting the snapshot and rendering it: concurrent scrapes on
        # the event loop cannot see each other's.
        snapshot = await self.services.stats()
        self._collector.snapshot = snapshot
        return generate_latest(self.registry)
