"""GET/DELETE /registrations against a live in-process site: REGISTERs arrive over UDP,
the API lists them, shows what the DHT holds, and removes them here and in the DHT."""

from __future__ import annotations

import pytest

from .conftest import LiveSite
from .sip_ua import BUSY

ALICE = "sip:alice@example.com"


async def test_list_is_empty_at_first(site: LiveSite) -> None:
    r = await site.client.get("/registrations")
    assert r.status_code == 200
    assert r.json() == {"items": [], "next_after": None}


async def test_registered_phones_are_listed_paged_and_filtered(site: LiveSite) -> None:
    for user in ("alice", "alice", "bob", "carol"):
        assert await (await site.ua()).register(user) == 200
    body = (await site.client.get("/registrations")).json()
    assert [item["aor"] for item in body["items"]] == [
        ALICE,
        "sip:bob@example.com",
        "sip:carol@example.com",
    ]
    assert len(body["items"][0]["bindings"]) == 2
    assert body["next_after"] is None

    # A page of one, then the next from its cursor, to the end.
    seen = []
    after = None
    while True:
        params = {"limit": 1, **({"after": after} if after else {})}
        page = (await site.client.get("/registrations", params=params)).json()
        seen += [item["aor"] for item in page["items"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == [ALICE, "sip:bob@example.com", "sip:carol@example.com"]

    for prefix in ("sip:b", "b", "bob@"):
        page = (await site.client.get("/registrations", params={"prefix": prefix})).json()
        assert [item["aor"] for item in page["items"]] == ["sip:bob@example.com"]


async def test_one_aor_with_its_bindings_and_the_dht_view(site: LiveSite) -> None:
    desk, mobile = await site.ua(), await site.ua()
    assert await desk.register("alice", expires=300) == 200
    assert await mobile.register("alice", expires=600) == 200
    r = await site.client.get("/registrations/Alice@EXAMPLE.com")  # normalized: host case
    assert r.status_code == 404  # the user part is case-sensitive (RFC 3261 §19.1.4)
    r = await site.client.get("/registrations/alice@example.com")
    assert r.status_code == 200
    body = r.json()
    assert body["aor"] == ALICE and body["dht"] is None
    contacts = {b["contact"]: b for b in body["bindings"]}
    assert set(contacts) == {desk.contact, mobile.contact}
    assert 590 <= contacts[mobile.contact]["expires_in"] <= 600
    assert contacts[desk.contact]["source"] == f"udp:127.0.0.1:{desk.port}"

    assert await site.adaptor.flush()
    body = (await site.client.get(f"/registrations/{ALICE}", params={"dht": "true"})).json()
    assert body["dht"]["error"] is None
    held = {b["contact"]: b for b in body["dht"]["bindings"]}
    assert set(held) == {desk.contact, mobile.contact}
    for b in held.values():
        assert b["site"] == "paris"  # which site registered it
        assert b["home"] == site.adaptor.home
        assert b["key_id"] == site.adaptor.key.key_id


async def test_delete_one_contact_then_the_aor_here_and_in_the_dht(site: LiveSite) -> None:
    desk, mobile, caller = await site.ua(), await site.ua(), await site.ua()
    assert await desk.register("alice") == 200
    assert await mobile.register("alice") == 200
    assert await caller.invite("alice") == BUSY  # reached a phone

    r = await site.client.delete(f"/registrations/{ALICE}/{desk.contact}")
    assert r.status_code == 200 and r.json() == {"aor": ALICE, "removed": 1}
    left = (await site.client.get(f"/registrations/{ALICE}")).json()["bindings"]
    assert [b["contact"] for b in left] == [mobile.contact]
    assert await site.adaptor.flush()
    # The peer node holds the record too: the removed contact is tombstoned there.
    assert [b.contact for b in await site.peer.get(ALICE)] == [mobile.contact]  # type: ignore[union-attr]

    r = await site.client.delete(f"/registrations/{ALICE}")
    assert r.status_code == 200 and r.json()["removed"] == 1
    assert (await site.client.get(f"/registrations/{ALICE}")).status_code == 404
    assert await site.adaptor.flush()
    lookup = (await site.client.get(f"/dht/lookup/{ALICE}")).json()
    assert lookup["bindings"] == []
    # The phone is no longer reachable: a known user with no binding.
    assert await caller.invite("alice") == 480

    again = await site.client.delete(f"/registrations/{ALICE}")
    assert again.status_code == 404 and "alice" in again.json()["message"]


async def test_delete_of_an_unknown_contact_is_404(site: LiveSite) -> None:
    ua = await site.ua()
    assert await ua.register("alice") == 200
    r = await site.client.delete(f"/registrations/{ALICE}/sip:nobody@10.0.0.1:5060")
    assert r.status_code == 404
    assert "message" in r.json()
    assert len((await site.client.get(f"/registrations/{ALICE}")).json()["bindings"]) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/registrations/not-an-aor",
        "/registrations/@example.com",
        "/registrations/alice@",
        "/registrations/tel:+123@x y",
        "/registrations/alice@exa_mple.com",
        "/dht/lookup/alice",
    ],
)
async def test_bad_aor_syntax_is_422_json(site: LiveSite, path: str) -> None:
    r = await site.client.get(path)
    assert r.status_code == 422, r.text
    assert "address of record" in r.json()["message"]


@pytest.mark.parametrize("limit", ["0", "501", "-1", "ten", "1.5"])
async def test_bad_page_size_is_422_json(site: LiveSite, limit: str) -> None:
    r = await site.client.get("/registrations", params={"limit": limit})
    assert r.status_code == 422
    body = r.json()
    assert body["message"].startswith("invalid request: query.limit")
    assert body["errors"][0]["location"] == "query.limit"


async def test_bad_dht_flag_is_422(site: LiveSite) -> None:
    r = await site.client.get(f"/registrations/{ALICE}", params={"dht": "maybe"})
    assert r.status_code == 422


async def test_unknown_query_parameters_are_422(site: LiveSite) -> None:
    r = await site.client.get("/registrations", params={"limt": "10"})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"location": "query.limt", "message": "unknown parameter"}]
