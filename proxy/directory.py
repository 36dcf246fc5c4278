"""This site's bindings as the proxy routes by them.

The location store holds the bindings; the directory adds what the registrar learnt on
the way, which the router needs: the flow each contact registered over (requests for it
go back there, so phones behind NAT stay reachable) and which AORs have registered here
(a call to one of them with no live binding gets 480, not 404).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .location import LocationStore
from .sip.auth import UserRecord
from .sip.binding import Binding


class KnownUsers(Protocol):
    def get(self, username: str) -> UserRecord | None: ...


class LocalDirectory:
    def __init__(
        self, store: LocationStore, users: KnownUsers | None, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self._users = users
        self._clock = clock
        # AORs seen registering: an INVITE to one of these with no binding gets 480, not 404.
        self.known_aors: set[str] = set()
        # contact URI -> flow of the REGISTER that bound it (for in-dialog requests via NAT).
        self.contact_flows: dict[str, str] = {}

    async def lookup(self, aor: str) -> list[Binding]:
        """Live bindings of ``aor``; raises the store's LocationError."""
        bindings = await self.store.load(aor, self._clock())
        for b in bindings:
            if b.source:
                self.contact_flows[b.contact] = b.source
        return bindings

    def note(self, aor: str, old: Sequence[Binding], new: Sequence[Binding]) -> None:
        """The bindings of ``aor`` changed from ``old`` to ``new``."""
        self.known_aors.add(aor)
        for b in old:
            self.contact_flows.pop(b.contact, None)
        for b in new:
            if b.source:
                self.contact_flows[b.contact] = b.source

    def flow_of(self, contact: str) -> str | None:
        return self.contact_flows.get(contact)

    def is_known(self, aor: str) -> bool:
        if aor in self.known_aors:
            return True
        if self._users is not None:
            user = aor.removeprefix("sip:").split("@")[0]
            return self._users.get(user) is not None
        return False
