"""GET /stats (JSON) and GET /metrics (Prometheus text format)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from .metrics import CONTENT_TYPE, SiteMetrics
from .schemas import CallStatsOut, DhtStatsOut, RegistrarStatsOut, SipStatsOut, StatsOut
from .services import AdminServices, SiteStats


def stats_out(s: SiteStats) -> StatsOut:
    return StatsOut(
        sip=SipStatsOut(
            requests=dict(s.requests),
            responses_received=dict(s.responses_received),
            responses_sent=dict(s.responses_sent),
            server_transactions=s.server_transactions,
            client_transactions=s.client_transactions,
            parse_errors=s.parse_errors,
        ),
        registrar=RegistrarStatsOut(
            aors=s.registered_aors,
            bindings=s.registered_bindings,
            registers_ok=s.registers_ok,
            auth_failures=s.auth_failures,
            users=s.users,
        ),
        calls=CallStatsOut(
            routed_local=s.calls_routed_local,
            routed_dht=s.calls_routed_dht,
            dht_retries=s.dht_retries,
        ),
        dht=DhtStatsOut(
            puts_ok=s.dht_puts_ok,
            puts_failed=s.dht_puts_failed,
            puts_skipped=s.dht_puts_skipped,
            gets_ok=s.dht_gets_ok,
            gets_failed=s.dht_gets_failed,
            backlog=s.dht_backlog,
            lookups=s.dht_lookups,
            cache_hits=s.dht_cache_hits,
            cache_misses=s.dht_cache_misses,
            peers=s.dht_peers,
            records_accepted=s.dht_records_accepted,
            records_rejected=s.dht_records_rejected,
            bindings_rejected_on_get=s.dht_bindings_rejected_on_get,
            rpc_timeouts=s.dht_rpc_timeouts,
        ),
        counters=dict(s.counters),
    )


def router(services: AdminServices, metrics: SiteMetrics) -> APIRouter:
    r = APIRouter(tags=["statistics"])

    @r.get("/stats", summary="The site's counters, as JSON")
    async def stats() -> StatsOut:
        return stats_out(await services.stats())

    @r.get(
        "/metrics",
        summary="The same counters plus DHT latency histograms, for Prometheus",
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE: {"schema": {"type": "string"}}},
                "description": "Prometheus text exposition format 0.0.4",
            }
        },
    )
    async def prometheus_metrics() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE)

    return r
