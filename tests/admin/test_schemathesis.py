"""schemathesis against the app's own OpenAPI schema: valid and invalid requests to every
operation, with the token, and none may get a 5xx or break the schema.

The app is reached over ASGI in schemathesis's own event loop, so the site behind it is
built in that loop too: the wrapper below runs a live site for the ASGI lifespan, which
schemathesis starts before loading the schema and ends with the test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.schemas import BaseSchema

from proxy.sip.auth import UserRecord

from .conftest import AUTH, LiveSite, live_site

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

EXAMPLES = 20  # per operation and phase; the whole run stays well under a minute


class SiteApp:
    """An ASGI app running a live site (and its admin app) for the lifespan it is given."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.site: LiveSite | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            assert self.site is not None, "the lifespan has not started"
            await self.site.app(scope, receive, send)
            return
        async with contextlib.AsyncExitStack() as stack:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.site = await stack.enter_async_context(live_site(self.tmp_path))
                    await self._seed(self.site)
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    break
        self.site = None
        await send({"type": "lifespan.shutdown.complete"})

    @staticmethod
    async def _seed(site: LiveSite) -> None:
        """Something to find: alice registered twice (so the schema's examples hit)."""
        for _ in range(2):
            assert await (await site.ua()).register("alice") == 200
        await site.users.put(UserRecord.from_password("alice", site.users.realm, "wonderland"))


@pytest.fixture
def admin_schema(tmp_path: Path) -> Iterator[BaseSchema]:
    # Loading the schema starts the lifespan: the site runs until the test ends.
    yield schemathesis.openapi.from_asgi("/openapi.json", SiteApp(tmp_path), headers=AUTH)
    shutdown_lifespans()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_5xx_and_no_schema_violations(admin_schema: BaseSchema, mode: GenerationMode) -> None:
    # schemathesis.pytest.from_fixture would do this loop, but it does not run on pytest 9
    # (it sets a private attribute of pytest's nodes that is gone); as_strategy is its
    # documented way to generate cases in a plain test.
    operations = [result.ok() for result in admin_schema.get_all_operations()]  # type: ignore[union-attr]
    assert len(operations) >= 14
    tested = 0
    for operation in operations:
        if mode is GenerationMode.NEGATIVE and not _has_input(operation.definition.raw):
            continue  # nothing in the request to make invalid

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )
        def check(case: Case[Any]) -> None:
            case.call_and_validate(headers=AUTH)

        check()
        tested += 1
    assert tested >= (14 if mode is GenerationMode.POSITIVE else 9)


def _has_input(definition: dict[str, Any]) -> bool:
    return bool(definition.get("parameters") or definition.get("requestBody"))
