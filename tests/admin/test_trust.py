"""The trust API: list, add (a key with a scope, or a rotated key's endorsement) and remove
site keys; written into the trust folder, in force at once; the errors; the token."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from admin_api.app import create_app
from dht_adaptor.keys import SiteKey, endorse, sign_binding
from dht_adaptor.record import DhtBinding, new_binding
from dht_adaptor.trust_folder import Endorsement, public_pem
from proxy.config import Config, HostPort
from proxy.site import Site, build_site

from .conftest import AUTH, TOKEN, LiveSite
from .sip_ua import HOST

MakeSite = Callable[..., AbstractAsyncContextManager[LiveSite]]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class TrustSite:
    site: Site
    client: httpx.AsyncClient
    folder: Path

    @property
    def key(self) -> SiteKey:
        return self.site.key

    def believes(self, b: DhtBinding) -> bool:
        return self.site.node.trust.verify(b)


def _config(tmp_path: Path) -> Config:
    folder = tmp_path / "trust"
    folder.mkdir(exist_ok=True)
    return Config(
        domains=("example.com",), sip_listen=HostPort(HOST, 0), dht_listen=HostPort(HOST, 0),
        data_dir=tmp_path / "data", trust_dir=folder, site_id="paris", admin_token=TOKEN,
    )  # fmt: skip


@pytest.fixture
async def trusting(tmp_path: Path) -> AsyncIterator[TrustSite]:
    """A site started with ``--trust FOLDER`` (an empty folder) and its admin API."""
    config = _config(tmp_path)
    site = await build_site(config)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(site.services)),
        base_url="http://admin",
        headers=AUTH,
    )
    try:
        yield TrustSite(site, client, config.trust_dir)  # type: ignore[arg-type]
    finally:
        await client.aclose()
        await site.close()


def pem(key: SiteKey) -> str:
    return public_pem(key.public_bytes).decode("ascii")


def raw(key: SiteKey) -> str:
    return base64.b64encode(key.public_bytes).decode("ascii")


def binding(key: SiteKey, aor: str = "sip:alice@a.example.com") -> DhtBinding:
    unsigned = new_binding(aor=aor, contact="sip:alice@192.0.2.1", home="sip:192.0.2.9",
                           site="s", version=1, now=time.time(), expires=600)  # fmt: skip
    return sign_binding(unsigned, key)


def endorsement_body(e: Endorsement) -> dict[str, object]:
    obj: dict[str, object] = json.loads(e.encode())
    return {"endorsement": obj}


async def test_list_shows_the_own_key(trusting: TrustSite) -> None:
    r = await trusting.client.get("/trust/keys")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["folder"] == str(trusting.folder) and body["error"] is None
    (own,) = body["keys"]
    assert own == {
        "key_id": trusting.key.key_id, "public_key": raw(trusting.key), "own": True,
        "file": None, "endorsed_by": None, "scope": None,
    }  # fmt: skip


async def test_add_a_key_with_a_scope_then_change_it_then_remove_it(
    trusting: TrustSite,
) -> None:
    oslo = SiteKey.generate()
    in_a, in_b = binding(oslo), binding(oslo, "sip:bob@b.example.com")
    assert not trusting.believes(in_a)

    r = await trusting.client.post(
        "/trust/keys", json={"public_key": pem(oslo), "scope": ["A.example.com"], "name": "oslo"}
    )
    assert r.status_code == 201, r.text
    assert r.json() == {
        "key_id": oslo.key_id, "public_key": raw(oslo), "own": False, "file": "oslo.pub",
        "endorsed_by": None, "scope": ["a.example.com"],
    }  # fmt: skip
    assert (trusting.folder / "oslo.scope").read_text() == "a.example.com\n"
    assert (trusting.folder / "oslo.pub").read_text() == pem(oslo)
    assert trusting.believes(in_a) and not trusting.believes(in_b)  # in force at once

    # The same key again (raw this time, no name: its file is found): a new scope, 200.
    r = await trusting.client.post(
        "/trust/keys", json={"public_key": raw(oslo), "scope": ["sip:*@b.example.com"]}
    )
    assert r.status_code == 200, r.text
    assert r.json()["scope"] == ["sip:*@b.example.com"] and r.json()["file"] == "oslo.pub"
    assert not trusting.believes(in_a) and trusting.believes(in_b)

    r = await trusting.client.post("/trust/keys", json={"public_key": raw(oslo)})  # any AOR
    assert r.status_code == 200 and r.json()["scope"] is None
    assert not (trusting.folder / "oslo.scope").exists()
    assert trusting.believes(in_a) and trusting.believes(in_b)

    listed = (await trusting.client.get("/trust/keys")).json()["keys"]
    assert sorted(k["key_id"] for k in listed) == sorted([oslo.key_id, trusting.key.key_id])

    r = await trusting.client.delete(f"/trust/keys/{oslo.key_id}")
    assert r.status_code == 204, r.text
    assert not (trusting.folder / "oslo.pub").exists()
    assert not trusting.believes(in_a) and not trusting.believes(in_b)
    r = await trusting.client.delete(f"/trust/keys/{oslo.key_id}")
    assert r.status_code == 404 and oslo.key_id in r.json()["message"]


async def test_default_name_is_the_key_id(trusting: TrustSite) -> None:
    oslo = SiteKey.generate()
    r = await trusting.client.post("/trust/keys", json={"public_key": raw(oslo)})
    assert r.status_code == 201 and r.json()["file"] == f"{oslo.key_id}.pub"


async def test_names_that_hold_other_keys(trusting: TrustSite) -> None:
    oslo, rome = SiteKey.generate(), SiteKey.generate()
    first = {"public_key": raw(oslo), "name": "oslo"}
    assert (await trusting.client.post("/trust/keys", json=first)).status_code == 201
    r = await trusting.client.post("/trust/keys", json={"public_key": raw(rome), "name": "oslo"})
    assert r.status_code == 409 and "oslo.pub holds another key" in r.json()["message"]
    r = await trusting.client.post("/trust/keys", json={"public_key": raw(oslo), "name": "x"})
    assert r.status_code == 409 and "oslo.pub already" in r.json()["message"]
    assert rome.key_id not in trusting.site.node.trust


async def test_a_rotated_key_by_its_endorsement(trusting: TrustSite) -> None:
    oslo = SiteKey.generate()
    await trusting.client.post(
        "/trust/keys", json={"public_key": raw(oslo), "scope": ["a.example.com"], "name": "oslo"}
    )
    new = SiteKey.generate()
    e = endorse(oslo, new.public_bytes)
    r = await trusting.client.post("/trust/keys", json=endorsement_body(e))
    assert r.status_code == 201, r.text
    assert r.json() == {
        "key_id": new.key_id, "public_key": raw(new), "own": False, "file": e.file_name,
        "endorsed_by": oslo.key_id, "scope": ["a.example.com"],
    }  # fmt: skip
    assert (trusting.folder / e.file_name).read_bytes() == e.encode()
    assert trusting.believes(binding(new)) and trusting.believes(binding(oslo))
    assert (await trusting.client.post("/trust/keys", json=endorsement_body(e))).status_code == 200

    # Removing the old key takes the endorsed one with it.
    assert (await trusting.client.delete(f"/trust/keys/{oslo.key_id}")).status_code == 204
    assert new.key_id not in trusting.site.node.trust


async def test_endorsements_that_do_not_count(trusting: TrustSite) -> None:
    oslo, stranger, new = SiteKey.generate(), SiteKey.generate(), SiteKey.generate()
    await trusting.client.post("/trust/keys", json={"public_key": raw(oslo)})
    by_stranger = endorsement_body(endorse(stranger, new.public_bytes))
    r = await trusting.client.post("/trust/keys", json=by_stranger)
    assert r.status_code == 409 and "does not trust" in r.json()["message"]
    forged = Endorsement(oslo.key_id, new.key_id, new.public_bytes,
                         endorse(stranger, new.public_bytes).signature)  # fmt: skip
    r = await trusting.client.post("/trust/keys", json=endorsement_body(forged))
    assert r.status_code == 403 and "not signed by" in r.json()["message"]
    mismatched = endorsement_body(endorse(oslo, new.public_bytes))
    mismatched["endorsement"]["new_key_id"] = oslo.key_id  # type: ignore[index]
    r = await trusting.client.post("/trust/keys", json=mismatched)
    assert r.status_code == 403 and "new_key_id" in r.json()["message"]
    assert new.key_id not in trusting.site.node.trust
    assert sorted(p.name for p in trusting.folder.iterdir()) == [f"{oslo.key_id}.pub"]


async def test_the_own_key_cannot_be_removed(trusting: TrustSite) -> None:
    r = await trusting.client.delete(f"/trust/keys/{trusting.key.key_id}")
    assert r.status_code == 409 and "own key" in r.json()["message"]
    assert trusting.key.key_id in trusting.site.node.trust


async def test_a_bad_file_in_the_folder_blocks_writes(trusting: TrustSite) -> None:
    (trusting.folder / "broken.pub").write_text("not a key")
    assert trusting.site.node.trust.reload() is None
    body = (await trusting.client.get("/trust/keys")).json()
    assert "broken.pub" in body["error"] and len(body["keys"]) == 1
    r = await trusting.client.post("/trust/keys", json={"public_key": raw(SiteKey.generate())})
    assert r.status_code == 409 and "broken.pub" in r.json()["message"]
    assert sorted(p.name for p in trusting.folder.iterdir()) == ["broken.pub"]


@pytest.mark.parametrize(
    "body",
    [
        {"public_key": "not a key"},
        {"public_key": "A" * 44},  # 33 bytes of base64
        {"public_key": "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----"},
        {"public_key": "A" * 43 + "=", "scope": ["not a domain!"]},
        {"public_key": "A" * 43 + "=", "scope": "example.com"},
        {"public_key": "A" * 43 + "=", "name": "../escape"},
        {"public_key": "A" * 43 + "=", "extra": 1},
        {"endorsement": {"v": 1}},
        {},
    ],
)
async def test_bad_requests_are_422(trusting: TrustSite, body: dict[str, object]) -> None:
    r = await trusting.client.post("/trust/keys", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("invalid request")
    r = await trusting.client.delete("/trust/keys/NOT-A-KEY-ID")
    assert r.status_code == 422


async def test_without_a_trust_folder_writes_are_409(make_site: MakeSite) -> None:
    async with make_site(with_peer=False, require_peers=False) as site:
        await _without_a_trust_folder(site)


async def _without_a_trust_folder(site: LiveSite) -> None:
    body = (await site.client.get("/trust/keys")).json()
    assert body["folder"] is None and [k["own"] for k in body["keys"]] == [True]
    r = await site.client.post("/trust/keys", json={"public_key": raw(SiteKey.generate())})
    assert r.status_code == 409 and "--trust" in r.json()["message"]
    r = await site.client.delete(f"/trust/keys/{'0' * 16}")
    assert r.status_code == 409 and "--trust" in r.json()["message"]
    own = site.site.key.key_id
    r = await site.client.delete(f"/trust/keys/{own}")
    assert r.status_code == 409 and "own key" in r.json()["message"]


async def test_the_token_is_required(trusting: TrustSite) -> None:
    anonymous = httpx.AsyncClient(transport=trusting.client._transport, base_url="http://admin")
    async with anonymous:
        key = raw(SiteKey.generate())
        for r in (
            await anonymous.get("/trust/keys"),
            await anonymous.post("/trust/keys", json={"public_key": key}),
            await anonymous.delete(f"/trust/keys/{'0' * 16}"),
        ):
            assert r.status_code == 401 and "token" in r.json()["message"]
    assert len(trusting.site.node.trust) == 1


# -- schemathesis on a site with a trust folder (test_schemathesis.py has none) -----------


class TrustSiteApp:
    """An ASGI app running a site with a trust folder for the lifespan it is given."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.app: FastAPI | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            assert self.app is not None, "the lifespan has not started"
            await self.app(scope, receive, send)
            return
        site = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                site = await build_site(_config(self.tmp_path))
                self.app = create_app(site.services)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                break
        if site is not None:
            await site.close()
        await send({"type": "lifespan.shutdown.complete"})


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_trust_routes_against_their_schema(tmp_path: Path, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", TrustSiteApp(tmp_path), headers=AUTH)
    try:
        operations = [
            op.ok()  # type: ignore[union-attr]
            for op in schema.get_all_operations()
            if op.ok().path.startswith("/trust")  # type: ignore[union-attr]
        ]
        assert len(operations) == 3
        for operation in operations:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None, derandomize=True)  # fmt: skip
            def check(case: Case[Any]) -> None:
                case.call_and_validate(headers=AUTH)

            check()
    finally:
        shutdown_lifespans()
