"""Nothing but /health and /ready without the bearer token; every error is JSON."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest

from .conftest import TOKEN, LiveSite

OPEN = {"/health", "/ready"}


@pytest.fixture
async def anonymous(site: LiveSite) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=site.app), base_url="http://admin"
    ) as client:
        yield client


def operations(site: LiveSite) -> list[tuple[str, str]]:
    """(method, concrete path) of every documented operation, plus the schema itself."""
    out = [("GET", "/openapi.json")]
    for path, item in site.app.openapi()["paths"].items():
        concrete = re.sub(
            r"\{(\w+)\}",
            lambda m: {
                "aor": "sip:alice@example.com",
                "contact": "sip:a@h",
                "username": "alice",
                "key_id": "0123456789abcdef",
            }[m.group(1)],
            path,
        )
        out += [(method.upper(), concrete) for method in item]
    return out


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ],
)
async def test_everything_but_health_and_ready_needs_the_token(
    site: LiveSite, anonymous: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    ops = operations(site)
    assert len(ops) >= 14
    for method, path in ops:
        # A valid body where one is needed, so only the token can be what is missing.
        body = {"username": "alice", "password": "x"} if method == "POST" else None
        if method == "PUT":
            body = {"password": "x"}
        r = await anonymous.request(method, path, headers=headers, json=body)
        if path in OPEN:
            assert r.status_code == 200, (method, path)
            continue
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.json() == {"message": "missing or wrong bearer token"}
        assert r.headers["www-authenticate"] == "Bearer"
    # And nothing was changed by any of those requests.
    assert site.users.usernames() == []


async def test_no_token_wins_over_bad_input(anonymous: httpx.AsyncClient) -> None:
    r = await anonymous.get("/registrations", params={"limit": "0"})
    assert r.status_code == 401
    r = await anonymous.post("/users", content=b"junk")
    assert r.status_code == 401


async def test_unknown_paths_and_methods_are_json(site: LiveSite) -> None:
    r = await site.client.get("/nope")
    assert r.status_code == 404 and r.json() == {"message": "Not Found"}
    r = await site.client.patch("/users")
    assert r.status_code == 405 and r.json() == {"message": "Method Not Allowed"}


async def test_unexpected_failures_are_500_json_without_details(site: LiveSite) -> None:
    async def broken() -> None:
        raise RuntimeError("secret internals")

    site.services.readiness = broken  # type: ignore[method-assign, assignment]
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=site.app, raise_app_exceptions=False),
        base_url="http://admin",
    ) as client:
        r = await client.get("/ready")
    assert r.status_code == 500
    assert r.json() == {"message": "internal error (logged by the site)"}


async def test_openapi_schema_is_typed_and_never_shows_secrets(site: LiveSite) -> None:
    r = await site.client.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, item in schema["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                content = response.get("content", {})
                assert content or status == "204", (method, path, status)
                for media in content.values():
                    assert media["schema"], (method, path, status)
            if path not in OPEN:
                assert op["security"] == [{"HTTPBearer": []}], (method, path)
                assert "401" in op["responses"]
    out_models = [name for name in schema["components"]["schemas"] if name.endswith("Out")]
    for name in out_models:
        props = schema["components"]["schemas"][name].get("properties", {})
        assert not {"password", "ha1_md5", "ha1_sha256"} & set(props), name
