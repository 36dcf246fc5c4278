"""Registrations: list (paged, by AOR prefix), inspect (with the DHT's view), remove."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from .schemas import (
    AOR_PATTERN,
    DhtViewOut,
    ErrorOut,
    RegistrationDetailOut,
    RegistrationPageOut,
    RemovedOut,
    Responses,
)
from .services import AdminServices, DhtView, NotFound
from .views import binding_out, dht_binding_out, registration_out

MAX_PAGE = 500

Aor = Annotated[
    str,
    Path(
        pattern=AOR_PATTERN,
        max_length=512,
        description="address of record, sip:user@host (the sip: may be left out)",
        examples=["sip:alice@example.com"],
    ),
]
_404: Responses = {404: {"model": ErrorOut, "description": "no such registration"}}
_503: Responses = {503: {"model": ErrorOut, "description": "the location store did not answer"}}


def router(services: AdminServices) -> APIRouter:
    r = APIRouter(prefix="/registrations", tags=["registrations"])

    @r.get("", summary="Registrations, by AOR, a page at a time", responses={**_503})
    async def list_registrations(
        prefix: Annotated[
            str, Query(max_length=512, description="only AORs starting with this")
        ] = "",
        after: Annotated[
            str | None, Query(max_length=512, description="the next_after of the last page")
        ] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="page size")] = 100,
    ) -> RegistrationPageOut:
        page = await services.registrations(prefix, after, limit)
        now = services.now()
        return RegistrationPageOut(
            items=[registration_out(item, now) for item in page.items],
            next_after=page.next_after,
        )

    @r.get(
        "/{aor}",
        summary="One AOR's bindings here and, with ?dht=true, in the DHT",
        responses={**_404, **_503},
    )
    async def get_registration(
        aor: Aor,
        dht: Annotated[bool, Query(description="also look the AOR up in the DHT")] = False,
    ) -> RegistrationDetailOut:
        key = services.normalize_aor(aor)
        reg = await services.registration(key)
        now = services.now()
        out = RegistrationDetailOut(aor=key, bindings=[binding_out(b, now) for b in reg.bindings])
        if dht:
            view = await services.dht_view(key)
            out.dht = _dht_view(view, now)
            if not reg.bindings and not view.bindings and view.error is None:
                raise NotFound(f"no bindings of {key}, here or in the DHT")
        elif not reg.bindings:
            raise NotFound(f"no bindings of {key}")
        return out

    @r.delete(
        "/{aor}",
        summary="Remove every binding of an AOR, here and in the DHT",
        responses={**_404, **_503},
    )
    async def delete_registration(aor: Aor) -> RemovedOut:
        key = services.normalize_aor(aor)
        return RemovedOut(aor=key, removed=await services.remove_registration(key))

    @r.delete(
        "/{aor}/{contact:path}",
        summary="Remove one binding (its contact URI, as listed), here and in the DHT",
        responses={**_404, **_503},
    )
    async def delete_binding(
        aor: Aor,
        contact: Annotated[
            str, Path(min_length=1, max_length=2048, description="the binding's contact URI")
        ],
    ) -> RemovedOut:
        key = services.normalize_aor(aor)
        contact = contact.removeprefix("<").removesuffix(">")
        return RemovedOut(aor=key, removed=await services.remove_registration(key, contact))

    return r


def _dht_view(view: DhtView, now: float) -> DhtViewOut:
    return DhtViewOut(bindings=[dht_binding_out(b, now) for b in view.bindings], error=view.error)
