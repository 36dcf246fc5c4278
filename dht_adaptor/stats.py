"""The counters of one DHT node: what :meth:`DhtNode.stats` reports.

``Site.stats()`` copies every key as ``dht_node_<key>`` into /stats and the Prometheus
exporter. This module imports nothing of the DHT engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dht_adaptor.membership import Refusal

__all__ = ["DhtStats", "Latency", "Load"]


@dataclass(slots=True)
class Latency:
    """Durations of one kind of operation, in seconds."""

    count: int = 0
    last: float = 0.0
    total: float = 0.0
    max: float = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.last = seconds
        self.total += seconds
        self.max = max(self.max, seconds)


@dataclass(frozen=True, slots=True)
class Load:
    """What a node's own queues hold right now (see ``DhtNode.stats``)."""

    requests: int = 0  # RPC requests being handled (async handlers: stores, finds)
    outstanding: int = 0  # our RPCs waiting for an answer
    background: int = 0  # replication, repair and republish jobs queued or running
    puts_waiting: int = 0  # puts queued behind the concurrency limit
    welcomes_pending: int = 0  # new contacts waiting for their replication check
    loop_lag: float = 0.0  # seconds the event loop was late lately (moving maximum)


@dataclass(slots=True)
class DhtStats:
    """Counters of one node; :meth:`DhtNode.stats` adds the store's and the queues'."""

    puts_ok: int = 0
    puts_failed: int = 0
    puts_partial: int = 0  # acknowledged (write quorum) but held by fewer than all copies
    gets_ok: int = 0
    gets_failed: int = 0
    gets_unknown: int = 0  # found nothing from fewer answers than the read quorum
    rpc_timeouts: int = 0
    rpc_timeouts_lagged: int = 0  # ... of which our own loop was late: peer kept
    rejected_on_get: int = 0  # bindings in find_value answers that failed verification
    repairs: int = 0  # records sent by read repair, replication and republishing
    replication_examined: int = 0  # keys looked at to decide what a new contact gets
    offers: int = 0  # replica-sync offers sent (each names up to MAX_OFFER keys)
    offers_unanswered: int = 0  # ... that got no answer (then records are sent anyway)
    offered_keys: int = 0  # keys named in the offers sent
    offers_taken: int = 0  # ... of which the contact asked for the record
    refused: dict[Refusal, int] = field(default_factory=lambda: dict.fromkeys(Refusal, 0))
    other_node_answers: int = 0  # answers from a node id we did not ask (a restart, say)
    get_retries: int = 0  # lookups repeated with known-dead contacts re-admitted
    shed: int = 0  # requests or background jobs dropped because a queue was full
    busy_answers: int = 0  # "busy" answers received: the peer is alive but loaded
    rejoins: int = 0  # times the node re-joined after its routing table emptied
    sessions: int = 0  # peer sessions (MAC-authenticated datagrams) set up
    put_latency: Latency = field(default_factory=Latency)
    get_latency: Latency = field(default_factory=Latency)

    def snapshot(self, *, accepted: int, rejected: int, peers: int, load: Load) -> dict[str, float]:
        """The counters as ``DhtNode.stats`` returns them, with the store's, the peers and
        the queues (``backlog`` sums them: what the node has not done yet)."""
        return {
            "puts_ok": self.puts_ok,
            "puts_failed": self.puts_failed,
            "puts_partial": self.puts_partial,
            "gets_ok": self.gets_ok,
            "gets_failed": self.gets_failed,
            "gets_unknown": self.gets_unknown,
            "rejected": rejected,
            "accepted": accepted,
            "rejected_on_get": self.rejected_on_get,
            "rpc_timeouts": self.rpc_timeouts,
            "rpc_timeouts_lagged": self.rpc_timeouts_lagged,
            "repairs": self.repairs,
            "replication_examined": self.replication_examined,
            "offers": self.offers,
            "offers_unanswered": self.offers_unanswered,
            "offered_keys": self.offered_keys,
            "offers_taken": self.offers_taken,
            "refused_datagrams": sum(self.refused.values()),
            **{f"refused_{reason.value}": n for reason, n in self.refused.items()},
            "other_node_answers": self.other_node_answers,
            "get_retries": self.get_retries,
            "shed": self.shed,
            "busy_answers": self.busy_answers,
            "rejoins": self.rejoins,
            "sessions": self.sessions,
            "put_latency_last": self.put_latency.last,
            "put_latency_total": self.put_latency.total,
            "put_latency_max": self.put_latency.max,
            "get_latency_last": self.get_latency.last,
            "get_latency_total": self.get_latency.total,
            "get_latency_max": self.get_latency.max,
            "peers": peers,
            "backlog": load.requests + load.background + load.puts_waiting,
            "requests_in_progress": load.requests,
            "rpcs_outstanding": load.outstanding,
            "background_jobs": load.background,
            "puts_waiting": load.puts_waiting,
            "welcomes_pending": load.welcomes_pending,
            "loop_lag": round(load.loop_lag, 4),
        }
