"""This site's DHT node, and live lookups through it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from .schemas import (
    AOR_PATTERN,
    DhtInfoOut,
    ErrorOut,
    LookupOut,
    PeerOut,
    Responses,
    SiteOut,
    SitesOut,
)
from .services import AdminServices
from .views import dht_binding_out

_503: Responses = {503: {"model": ErrorOut, "description": "the DHT did not answer"}}


def sites_router(services: AdminServices) -> APIRouter:
    r = APIRouter(tags=["sites"])

    @r.get("/sites", summary="Member sites: whether they answer, when, how fast")
    async def sites() -> SitesOut:
        return SitesOut(
            sites=[
                SiteOut(
                    site_id=m.site_id, home=m.home, key_id=m.key_id, reachable=m.reachable,
                    last_heard=m.last_heard,
                    rtt_ms=None if m.rtt is None else round(m.rtt * 1000, 3),
                    bindings_seen=m.bindings_seen,
                )
                for m in services.sites()
            ]
        )  # fmt: skip

    return r


def router(services: AdminServices) -> APIRouter:
    r = APIRouter(prefix="/dht", tags=["dht"])

    @r.get("", summary="The node: id, address, routing table, stored records", responses=_503)
    async def dht_info() -> DhtInfoOut:
        info = await services.dht_info()
        return DhtInfoOut(
            node_id=info.node_id,
            host=info.host,
            port=info.port,
            site_id=info.site_id,
            home=info.home,
            key_id=info.key_id,
            peer_count=len(info.peers),
            peers=[PeerOut(node_id=p.node_id, host=p.host, port=p.port) for p in info.peers],
            stored_records=info.stored_records,
        )

    @r.get(
        "/lookup/{aor}",
        summary="Look an AOR up in the DHT now: latency and the verified bindings found",
        responses=_503,
    )
    async def dht_lookup(
        aor: Annotated[
            str, Path(pattern=AOR_PATTERN, max_length=512, examples=["sip:alice@example.com"])
        ],
    ) -> LookupOut:
        found = await services.dht_lookup(services.normalize_aor(aor))
        now = services.now()
        return LookupOut(
            aor=found.aor,
            latency_ms=round(found.seconds * 1000, 3),
            bindings=[dht_binding_out(b, now) for b in found.bindings],
            rejected=found.rejected,
        )

    return r
