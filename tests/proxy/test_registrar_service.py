"""RegistrarService: REGISTER around the sans-IO registrar, with an in-memory store, a fake
publisher, fake transactions and a manual clock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from dht_adaptor.adaptor import TooManyBindings
from proxy.auth_gate import AuthGate
from proxy.directory import LocalDirectory
from proxy.location import LocationError
from proxy.registrar_service import RegistrarService
from proxy.sip.errors import Forbidden, SipError
from proxy.sip.message import Request, Response, error_response
from proxy.sip.registrar import RegistrarConfig
from proxy.stats import SipCounters

from .fakes import (
    ME,
    PHONE,
    FakePublisher,
    FakeTransactions,
    FakeUsers,
    FlakyStore,
    ManualClock,
    Prepared,
    digest_answer,
    md5_challenge,
    server_tx,
)
from .messages import contacts_of, register

ALICE = "sip:alice@example.com"
BOB = "sip:bob@example.com"
PHONE_A = "sip:alice@192.0.2.10:5060"
PHONE_B = "sip:alice@192.0.2.11:5062"


@dataclass
class Registrar:
    service: RegistrarService
    store: FlakyStore
    transactions: FakeTransactions
    publisher: FakePublisher
    users: FakeUsers
    counters: SipCounters
    clock: ManualClock

    async def register(self, req: Request) -> Response:
        """Handle ``req`` and return the one response it got."""
        stx = server_tx(req)
        await self.service.handle(stx)
        sent = self.transactions.sent_to(stx)
        assert len(sent) == 1, sent
        return sent[0]

    async def contacts(self, aor: str = ALICE) -> list[str]:
        """What the store holds for ``aor`` now."""
        return sorted(b.contact for b in await self.store.load(aor, self.clock()))


def registrar(*users: tuple[str, str]) -> Registrar:
    store = FlakyStore()
    transactions = FakeTransactions()
    publisher = FakePublisher()
    fake_users = FakeUsers()
    for name, password in users:
        fake_users.add(name, password)
    counters = SipCounters()
    clock = ManualClock()
    auth = AuthGate(
        fake_users, "example.com", b"s" * 32,
        transactions=transactions, counters=counters, clock=clock,
    )  # fmt: skip
    service = RegistrarService(
        RegistrarConfig(domains=("example.com",)),
        identity=ME, directory=LocalDirectory(store, fake_users, clock),
        transactions=transactions, auth=auth, publisher=publisher,
        counters=counters, clock=clock,
    )  # fmt: skip
    return Registrar(service, store, transactions, publisher, fake_users, counters, clock)


# --- REGISTER ------------------------------------------------------------------------------


async def test_register_stores_publishes_and_lists_the_contacts() -> None:
    r = registrar()
    resp = await r.register(register(f"<{PHONE_A}>", expires=600))
    assert resp.status == 200
    assert contacts_of(resp) == [f"<{PHONE_A}>;expires=600"]
    [binding] = await r.store.load(ALICE, r.clock())
    assert (binding.contact, binding.source) == (PHONE_A, str(PHONE))
    assert binding.expires_at == r.clock() + 600
    assert r.publisher.published == [Prepared(ALICE, (binding,), force=False)]
    assert r.counters.registers_ok == 1


async def test_the_200_lists_every_binding_best_q_first() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>;q=0.5", expires=600))
    resp = await r.register(register(f"<{PHONE_B}>;q=0.9", expires=300, cseq=2))
    assert contacts_of(resp) == [f"<{PHONE_B}>;expires=300;q=0.9", f"<{PHONE_A}>;expires=600;q=0.5"]
    assert r.publisher.published[-1].contacts == [PHONE_A, PHONE_B]


@pytest.mark.parametrize(
    "refusal",
    [TooManyBindings("sip:alice@example.com: 40 bindings do not fit"), Forbidden("no")],
    ids=["too-many-bindings", "forbidden"],
)
async def test_a_refused_record_leaves_the_store_unchanged(refusal: SipError) -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    r.publisher.refuse = refusal
    req = register(f"<{PHONE_B}>", expires=600, cseq=2)
    stx = server_tx(req)
    with pytest.raises(SipError) as caught:
        await r.service.handle(stx)
    assert caught.value is refusal
    # Nothing answered here (the server answers the error, once), nothing stored.
    assert r.transactions.sent_to(stx) == []
    assert await r.contacts() == [PHONE_A]
    assert len(r.publisher.published) == 1
    assert error_response(req, caught.value).status == 403


async def test_a_failing_store_is_a_503_with_retry_after() -> None:
    r = registrar()
    r.store.failure = LocationError("redis: connection refused")
    req = register(f"<{PHONE_A}>", expires=600)
    stx = server_tx(req)
    with pytest.raises(LocationError) as caught:
        await r.service.handle(stx)
    resp = error_response(req, caught.value)
    assert (resp.status, resp.reason) == (503, "Location Store Unavailable")
    assert resp.headers.get("Retry-After") == "5"
    assert r.transactions.sent_to(stx) == []
    assert r.publisher.prepared == []


async def test_an_invalid_register_is_answered_without_touching_the_store() -> None:
    r = registrar()
    resp = await r.register(register(f"<{PHONE_A}>", expires=10))  # below min_expires
    assert (resp.status, resp.headers.get("Min-Expires")) == (423, "60")
    assert await r.contacts() == []
    assert r.publisher.prepared == []
    assert r.counters.registers_ok == 0


# --- authentication --------------------------------------------------------------------------


def with_credentials(
    challenge_from: Response, req: Request, username: str, password: str
) -> Request:
    value = digest_answer(
        md5_challenge(challenge_from, "WWW-Authenticate"), username=username,
        password=password, method="REGISTER", uri=req.uri,
    )  # fmt: skip
    req.headers.add("Authorization", value)
    return req


async def test_without_credentials_the_register_is_challenged_and_nothing_stored() -> None:
    r = registrar(("alice", "wonderland"))
    resp = await r.register(register(f"<{PHONE_A}>", expires=600))
    assert resp.status == 401
    assert md5_challenge(resp, "WWW-Authenticate").startswith('Digest realm="example.com"')
    assert await r.contacts() == []
    assert r.publisher.prepared == []


async def test_with_her_credentials_alice_registers() -> None:
    r = registrar(("alice", "wonderland"))
    challenge = await r.register(register(f"<{PHONE_A}>", expires=600))
    req = register(f"<{PHONE_A}>", expires=600, cseq=2)
    resp = await r.register(with_credentials(challenge, req, "alice", "wonderland"))
    assert resp.status == 200
    assert await r.contacts() == [PHONE_A]


async def test_bob_may_not_register_alices_aor() -> None:
    r = registrar(("alice", "wonderland"), ("bob", "builder"))
    challenge = await r.register(register(f"<{PHONE_A}>", expires=600))
    req = with_credentials(challenge, register(f"<{PHONE_A}>", expires=600, cseq=2), "bob",
                           "builder")  # fmt: skip
    stx = server_tx(req)
    with pytest.raises(Forbidden):
        await r.service.handle(stx)
    assert r.transactions.sent_to(stx) == []
    assert await r.contacts() == []
    assert r.publisher.prepared == []


async def test_wrong_credentials_are_refused_with_403() -> None:
    r = registrar(("alice", "wonderland"))
    challenge = await r.register(register(f"<{PHONE_A}>", expires=600))
    req = register(f"<{PHONE_A}>", expires=600, cseq=2)
    resp = await r.register(with_credentials(challenge, req, "alice", "guess"))
    assert resp.status == 403
    assert await r.contacts() == []
    assert r.counters.auth_failures == 1


# --- remove and republish -------------------------------------------------------------------


async def test_remove_one_binding_publishes_the_rest() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", f"<{PHONE_B}>", expires=600))
    assert await r.service.remove(ALICE, PHONE_A) == 1
    assert await r.contacts() == [PHONE_B]
    assert r.publisher.published[-1].contacts == [PHONE_B]


async def test_remove_every_binding_publishes_an_empty_record() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", f"<{PHONE_B}>", expires=600))
    assert await r.service.remove(ALICE) == 2
    assert await r.contacts() == []
    assert r.publisher.published[-1] == Prepared(ALICE, (), force=False)


async def test_removing_what_is_not_there_publishes_nothing() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    assert await r.service.remove(ALICE, "sip:alice@198.51.100.1") == 0
    assert await r.service.remove(BOB) == 0
    assert len(r.publisher.published) == 1


async def test_remove_raises_the_stores_error() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    r.store.failure = LocationError("redis down")
    with pytest.raises(LocationError):
        await r.service.remove(ALICE)


async def test_republish_all_publishes_every_live_aor_with_force() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    await r.register(register("<sip:bob@192.0.2.20>", aor=BOB, expires=3600, call_id="b"))
    await r.register(register("<sip:carol@192.0.2.30>", aor="sip:carol@example.com",
                              expires=60, call_id="c"))  # fmt: skip
    r.clock.advance(120)  # carol's binding has expired
    r.publisher.published.clear()
    assert await r.service.republish_all() == 2
    assert sorted((p.aor, p.force) for p in r.publisher.published) == [
        (ALICE, True),
        (BOB, True),
    ]


async def test_republish_all_goes_on_past_a_refused_aor() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    r.publisher.refuse = TooManyBindings("too big")
    assert await r.service.republish_all() == 0


# --- concurrency and time ---------------------------------------------------------------------


async def test_concurrent_registers_of_one_aor_are_serialized() -> None:
    r = registrar()
    phones = [f"sip:alice@192.0.2.{10 + i}:5060" for i in range(3)]
    reqs = [register(f"<{p}>", expires=600, call_id=f"reg-{i}") for i, p in enumerate(phones)]
    await asyncio.gather(*(r.register(req) for req in reqs))
    assert r.store.most_busy == 1  # never two between load and save
    assert await r.contacts() == sorted(phones)  # no update lost


async def test_a_register_arriving_while_a_queued_one_runs_still_waits() -> None:
    # A holds the AOR's lock, B queues behind it; C arrives once B runs. C must queue
    # behind B, not start beside it and overwrite B's binding.
    r = registrar()
    phones = [f"sip:alice@192.0.2.{10 + i}:5060" for i in range(3)]
    reqs = [register(f"<{p}>", expires=600, call_id=f"reg-{i}") for i, p in enumerate(phones)]
    loop = asyncio.get_running_loop()
    first = [loop.create_task(r.register(req)) for req in reqs[:2]]
    while not first[0].done():
        await asyncio.sleep(0)
    while r.store.busy.get(ALICE, 0) == 0:  # B has the lock and has loaded
        await asyncio.sleep(0)
    await asyncio.gather(*first, r.register(reqs[2]))
    assert r.store.most_busy == 1
    assert await r.contacts() == sorted(phones)


async def test_registers_of_different_aors_run_side_by_side() -> None:
    r = registrar()
    reqs = [register(f"<sip:{u}@192.0.2.{10 + i}>", aor=f"sip:{u}@example.com", call_id=u,
                     expires=600) for i, u in enumerate(["alice", "bob", "carol"])]  # fmt: skip
    await asyncio.gather(*(r.register(req) for req in reqs))
    assert {p.aor for p in r.publisher.published} == {
        "sip:alice@example.com", "sip:bob@example.com", "sip:carol@example.com",
    }  # fmt: skip


async def test_the_clock_decides_expiry() -> None:
    r = registrar()
    await r.register(register(f"<{PHONE_A}>", expires=600))
    r.clock.advance(200)
    resp = await r.register(register(cseq=2))  # a query
    assert contacts_of(resp) == [f"<{PHONE_A}>;expires=400"]
    r.clock.advance(400)
    resp = await r.register(register(cseq=3))
    assert (resp.status, contacts_of(resp)) == (200, [])
    assert await r.contacts() == []
