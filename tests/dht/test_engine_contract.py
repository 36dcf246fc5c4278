"""The contract between our DHT node and the engine it subclasses (kademlia, rpcudp, umsgpack).

``dht_adaptor/protocol.py``, ``lookup.py`` and ``node.py`` override private internals of
rpcudp's ``RPCProtocol``, kademlia's ``KademliaProtocol`` and ``Server``, and call
``RoutingTable``, ``NodeHeap`` and ``Node`` directly. (rpcudp's RPC stub is not used: our
``NodeProtocol._request`` sends rpcudp's datagram sealed with a membership proof and keeps
rpcudp's ``_outstanding`` table, so its framing and limits are checked on ours.) A
renamed method would not fail loudly: our override would simply stop being called and
the engine's default (5 s timeouts, untracked tasks, tracebacks for bad datagrams) would
come back. (Since issue 11 the datagram half of NodeProtocol is the ``Endpoint`` mixin of
``dht_adaptor/endpoint.py``, and datagrams are packed with the compiled ``msgpack``,
not rpcudp's umsgpack: rpcudp still needs umsgpack, so its pin stays.) So every name we
override or rely on is checked here, with the parameter names we use, and each failure
says which part of our code to re-check. The versions are pinned in pyproject.toml;
:data:`REVIEWED` is what this contract was checked against.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.metadata
import inspect
import random
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from kademlia.network import Server
from kademlia.node import Node, NodeHeap
from kademlia.protocol import KademliaProtocol
from kademlia.routing import KBucket, RoutingTable
from kademlia.storage import IStorage
from kademlia.utils import digest
from rpcudp.protocol import RPCProtocol

from dht_adaptor.endpoint import RpcTooLarge
from dht_adaptor.keys import SiteKey, TrustStore
from dht_adaptor.membership import Member
from dht_adaptor.node import NodeServer
from dht_adaptor.protocol import _RPC_NAMES, _UNPACK_ERRORS, DhtStats, NodeProtocol, NoStorage
from dht_adaptor.record import MAX_RECORD_BYTES, WIRE_LIMIT, dht_key
from dht_adaptor.record_store import MemoryRecordStore
from dht_adaptor.session import Sessions
from dht_adaptor.wire import pack, unpack

ROOT = Path(__file__).resolve().parents[2]

# The engine versions whose sources this contract was written against. After an upgrade:
# read the new sources, re-check every override named below, then update these and the
# pins in pyproject.toml together.
REVIEWED = {"kademlia": "2.2.3", "rpcudp": "5.0.1", "u-msgpack-python": "2.8.0"}

PROTO = "dht_adaptor/protocol.py (and endpoint.py)"
LOOKUP = "dht_adaptor/lookup.py"
NODE = "dht_adaptor/node.py"


def params(func: Callable[..., Any]) -> list[str]:
    """Parameter names of ``func``, without ``self`` nor keyword-only ones with a default
    (an override may add those: callers passing the engine's parameters still fit)."""
    names = [
        name
        for name, p in inspect.signature(func).parameters.items()
        if not (p.kind is p.KEYWORD_ONLY and p.default is not p.empty)
    ]
    return names[1:] if names[:1] == ["self"] else names


# -- versions ----------------------------------------------------------------------------


def pins() -> dict[str, str]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    found = {}
    for dep in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*(\S+)", dep)
        if match:
            found[match[1]] = match[2]
    return found


@pytest.mark.parametrize("dist", sorted(REVIEWED))
def test_engine_versions_are_pinned_and_installed(dist: str) -> None:
    pinned = pins().get(dist)
    assert pinned == REVIEWED[dist], (
        f"pyproject.toml pins {dist}=={pinned}, but this contract was reviewed against "
        f"{REVIEWED[dist]}: re-read the new sources against {PROTO}, {LOOKUP} and {NODE}, "
        "then update REVIEWED"
    )
    installed = importlib.metadata.version(dist)
    assert installed == pinned, (
        f"{dist} {installed} is installed, pyproject.toml pins {pinned}: reinstall "
        "(scripts/venv.sh), or review the new version as for an upgrade"
    )


# -- who may import the engine ----------------------------------------------------------

ENGINE = {"kademlia", "rpcudp", "umsgpack"}
ENGINE_IMPORTERS = {"node.py", "protocol.py", "lookup.py"}


def test_only_node_protocol_and_lookup_import_the_engine() -> None:
    for path in sorted((ROOT / "dht_adaptor").glob("*.py")):
        imported = set()
        for stmt in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(stmt, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in stmt.names}
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                imported.add(stmt.module.split(".")[0])
        if path.name not in ENGINE_IMPORTERS:
            assert not imported & ENGINE, (
                f"dht_adaptor/{path.name} imports {sorted(imported & ENGINE)}: only "
                f"{sorted(ENGINE_IMPORTERS)} may (the engine is pinned and contract-tested)"
            )


def test_errors_import_without_the_engine() -> None:
    code = "import sys, dht_adaptor.errors; print(sorted({m.split('.')[0] for m in sys.modules}))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert not set(ast.literal_eval(out)) & ENGINE, "dht_adaptor.errors loads the DHT engine"


# -- names we override: the engine's method must exist with the same parameters -----------

OVERRIDES: list[tuple[type, type, str, list[str], str]] = [
    # (engine class, our class, method, parameters, what of ours to re-check)
    (RPCProtocol, NodeProtocol, "connection_made", ["transport"],
     f"NodeProtocol.connection_made in {PROTO} (reads the socket family after super())"),
    (RPCProtocol, NodeProtocol, "datagram_received", ["data", "addr"],
     f"NodeProtocol.datagram_received in {PROTO} (admits members, spawns _dispatch)"),
    (RPCProtocol, NodeProtocol, "_solve_datagram", ["datagram", "address"],
     f"NodeProtocol._solve_datagram in {PROTO} (admits members, then _dispatch)"),
    (RPCProtocol, NodeProtocol, "_accept_request", ["msg_id", "data", "address"],
     f"NodeProtocol._accept_request in {PROTO} (request checks, response framing)"),
    (RPCProtocol, NodeProtocol, "_accept_response", ["msg_id", "data", "address"],
     f"NodeProtocol._accept_response in {PROTO} (pops _outstanding, late answers)"),
    (RPCProtocol, NodeProtocol, "_timeout", ["msg_id"],
     f"NodeProtocol._timeout in {PROTO} (counts rpc_timeouts, fails the future quietly)"),
    (KademliaProtocol, NodeProtocol, "rpc_ping", ["sender", "nodeid"],
     f"NodeProtocol.rpc_ping in {PROTO} (the arguments stock peers send)"),
    (KademliaProtocol, NodeProtocol, "rpc_store", ["sender", "nodeid", "key", "value"],
     f"NodeProtocol.rpc_store in {PROTO} (the arguments stock peers send)"),
    (KademliaProtocol, NodeProtocol, "rpc_find_node", ["sender", "nodeid", "key"],
     f"NodeProtocol.rpc_find_node in {PROTO} (the arguments stock peers send)"),
    (KademliaProtocol, NodeProtocol, "rpc_find_value", ["sender", "nodeid", "key"],
     f"NodeProtocol.rpc_find_value in {PROTO} (the arguments stock peers send)"),
    (KademliaProtocol, NodeProtocol, "call_find_node", ["node_to_ask", "node_to_find"],
     f"NodeProtocol.call_find_node in {PROTO} and IterativeLookup.run in {LOOKUP}"),
    (KademliaProtocol, NodeProtocol, "call_find_value", ["node_to_ask", "node_to_find"],
     f"NodeProtocol.call_find_value in {PROTO} and IterativeLookup.run in {LOOKUP}"),
    (KademliaProtocol, NodeProtocol, "call_ping", ["node_to_ask"],
     f"NodeProtocol.call_ping in {PROTO} (RoutingTable.add_contact calls it)"),
    (KademliaProtocol, NodeProtocol, "call_store", ["node_to_ask", "key", "value"],
     f"NodeProtocol.call_store and send_record in {PROTO}"),
    (KademliaProtocol, NodeProtocol, "welcome_if_new", ["node"],
     f"NodeProtocol.welcome_if_new and _replicate_to in {PROTO}"),
    (KademliaProtocol, NodeProtocol, "handle_call_response", ["result", "node"],
     f"NodeProtocol.handle_call_response and _call in {PROTO}"),
    (Server, NodeServer, "_create_protocol", [],
     f"NodeServer._create_protocol in {NODE} (how our protocol gets into the Server)"),
    (Server, NodeServer, "refresh_table", ["interval"],
     f"NodeServer.refresh_table in {NODE} (tracked refresh task, refresh_loop)"),
    (Server, NodeServer, "_refresh_table", [],
     f"NodeServer._refresh_table in {NODE} (bucket refresh through IterativeLookup)"),
    (IStorage, NoStorage, "__setitem__", ["key", "value"], f"NoStorage in {PROTO}"),
    (IStorage, NoStorage, "__getitem__", ["key"], f"NoStorage in {PROTO}"),
    (IStorage, NoStorage, "get", ["key", "default"], f"NoStorage in {PROTO}"),
    (IStorage, NoStorage, "iter_older_than", ["seconds_old"], f"NoStorage in {PROTO}"),
    (IStorage, NoStorage, "__iter__", [], f"NoStorage in {PROTO}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("engine", "ours", "name", "expected", "recheck"),
    OVERRIDES,
    ids=[f"{e.__name__}.{n}" for e, _, n, _, _ in OVERRIDES],
)
def test_overridden_names_exist_with_our_parameters(
    engine: type, ours: type, name: str, expected: list[str], recheck: str
) -> None:
    where = f"{engine.__module__}.{engine.__name__}.{name}"
    assert callable(getattr(engine, name, None)), f"{where} is gone: re-check {recheck}"
    assert params(getattr(engine, name)) == expected, (
        f"{where}{inspect.signature(getattr(engine, name))} changed: re-check {recheck}"
    )
    owner = next(c for c in ours.__mro__ if name in vars(c))
    assert owner.__module__.startswith("dht_adaptor."), (
        f"{ours.__name__}.{name} no longer overrides {where}"
    )
    assert params(getattr(ours, name)) == expected, (
        f"{ours.__name__}.{name} no longer takes {where}'s parameters {expected}"
    )


def test_no_storage_implements_every_abstract_storage_method() -> None:
    implemented = {name for engine, _, name, _, _ in OVERRIDES if engine is IStorage}
    missing = IStorage.__abstractmethods__ - implemented
    assert not missing, f"IStorage gained {sorted(missing)}: implement them in NoStorage ({PROTO})"
    assert isinstance(NoStorage(), IStorage)


def test_every_engine_rpc_is_one_we_answer() -> None:
    engine_rpcs = {n.removeprefix("rpc_") for n in dir(KademliaProtocol) if n.startswith("rpc_")}
    ours = {"offer"}  # replica sync, between p2psip nodes only
    assert engine_rpcs == _RPC_NAMES - ours, (
        f"kademlia's RPCs are now {sorted(engine_rpcs)}: stock peers may call them; update "
        f"_RPC_NAMES and the rpc_* handlers in {PROTO}"
    )
    assert params(KademliaProtocol.rpc_stun) == ["sender"], (
        f"KademliaProtocol.rpc_stun changed: we answer stun with it (_RPC_NAMES in {PROTO})"
    )


# -- names we call ------------------------------------------------------------------------

CALLED: list[tuple[Callable[..., Any], list[str], str]] = [
    (KademliaProtocol.__init__, ["source_node", "storage", "ksize"],
     f"NodeProtocol.__init__ in {PROTO} (super().__init__(source_node, NoStorage(), ksize))"),
    (KademliaProtocol.get_refresh_ids, [], f"NodeServer._refresh_table in {NODE}"),
    (RPCProtocol.__init__, ["wait_timeout"],
     f"NodeProtocol.__init__ in {PROTO} (sets _wait_timeout after super().__init__)"),
    (Server.__init__, ["ksize", "alpha", "node_id", "storage"],
     f"NodeServer.__init__ in {NODE} (passes all four as keywords)"),
    (Server.listen, ["port", "interface"], f"DhtNode.listen in {NODE} (interface=host)"),
    (Server.stop, [], f"DhtNode.close in {NODE}"),
    (RoutingTable.find_neighbors, ["node", "k", "exclude"],
     f"NodeProtocol.live_neighbors, _neighbors_answer, keys_for in {PROTO} (k keyword); "
     f"NodeServer._refresh_table in {NODE} (k positional)"),
    (RoutingTable.remove_contact, ["node"], f"NodeProtocol._forget_contact in {PROTO}"),
    (RoutingTable.get_bucket_for, ["node"], f"NodeProtocol._forget_contact in {PROTO}"),
    (KBucket.__getitem__, ["node_id"], f"NodeProtocol._forget_contact in {PROTO}"),
    (RoutingTable.is_new_node, ["node"], f"NodeProtocol.welcome_if_new in {PROTO}"),
    (RoutingTable.add_contact, ["node"], f"NodeProtocol.welcome_if_new in {PROTO}"),
    (KBucket.get_nodes, [], f"DhtNode.peers in {NODE}"),
    (Node.__init__, ["node_id", "ip", "port"], f"every Node(...) in {PROTO}, {LOOKUP}, {NODE}"),
    (Node.distance_to, ["node"],
     f"NodeProtocol._replicate_to in {PROTO}; DhtNode._we_are_close in {NODE}"),
    (NodeHeap.__init__, ["node", "maxsize"], f"IterativeLookup.__init__ in {LOOKUP}"),
    (NodeHeap.push, ["nodes"], f"IterativeLookup in {LOOKUP}"),
    (NodeHeap.remove, ["peers"], f"IterativeLookup._set_aside in {LOOKUP}"),
    (NodeHeap.mark_contacted, ["node"], f"IterativeLookup.run in {LOOKUP}"),
    (NodeHeap.get_uncontacted, [], f"IterativeLookup.run in {LOOKUP}"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("func", "expected", "recheck"), CALLED, ids=[f.__qualname__ for f, _, _ in CALLED]
)
def test_called_names_take_our_arguments(
    func: Callable[..., Any], expected: list[str], recheck: str
) -> None:
    assert params(func) == expected, (
        f"{func.__module__}.{func.__qualname__}{inspect.signature(func)} changed: "
        f"re-check {recheck}"
    )


def test_routing_table_pings_through_our_call_ping() -> None:
    # A full bucket that cannot split pings its head through protocol.call_ping, which we
    # override (dead-node marks, no warning per timeout); the path is hard to reach.
    assert "self.protocol.call_ping(" in inspect.getsource(RoutingTable.add_contact), (
        f"RoutingTable.add_contact no longer pings via protocol.call_ping: re-check "
        f"NodeProtocol.call_ping and _call in {PROTO}"
    )


def test_msgpack_errors_and_types() -> None:
    # rpcudp packs args as a tuple: _request_received expects them back as a list.
    packed = pack(["store", (b"\x01" * 20, b"k", b"v")])
    assert unpack(packed) == ["store", [b"\x01" * 20, b"k", b"v"]], (
        f"msgpack no longer unpacks arrays to lists or keeps bytes: re-check "
        f"NodeProtocol._request_received and parse_nodes in {PROTO}"
    )
    assert unpack(pack({"value": b"v"})) == {"value": b"v"}, (
        f"re-check rpc_find_value in {PROTO} and IterativeLookup.run in {LOOKUP}"
    )


@given(st.binary(max_size=48))
@example(b"\xc1")  # never used
@example(b"\x92\x01")  # truncated array
@example(b"\x81\x90\x01")  # map with an unhashable key
@example(b"\xd9\x05ab")  # truncated str
@example(b"\xa2\xff\xfe")  # str that is not UTF-8
@example(b"\x91" * 5000)  # nested too deeply
def test_msgpack_fails_only_with_the_errors_we_catch(data: bytes) -> None:
    # Any other exception fails the test: add it to wire.UNPACK_ERRORS, or an attacker's
    # datagram raises inside datagram_received.
    with contextlib.suppress(*_UNPACK_ERRORS):
        unpack(data)


def test_a_full_bucket_keeps_newcomers_in_its_replacement_cache() -> None:
    # NodeProtocol._welcome tells "in a bucket" from "waiting" with is_new_node after
    # add_contact; _forget_contact drops dead contacts from replacement_nodes.
    bucket = KBucket(0, 2**160, 1)
    held, waiting = (Node(bytes([i] * 20), "192.0.2.1", 5000 + i) for i in (1, 2))
    assert bucket.add_node(held) and not bucket.add_node(waiting)
    assert dict(bucket.replacement_nodes) == {waiting.id: waiting}, (
        f"KBucket.replacement_nodes changed: NodeProtocol._forget_contact in {PROTO}"
    )
    assert bucket.is_new_node(waiting) and not bucket.is_new_node(held), (
        f"a waiting node no longer counts as new: NodeProtocol._welcome in {PROTO}"
    )


def test_dht_key_is_kademlias_digest() -> None:
    aor = "sip:alice@example.com"
    assert dht_key(aor) == digest(aor), (
        "kademlia.utils.digest changed: record.dht_key and the comment in "
        f"NodeProtocol.welcome_if_new ({PROTO}) say they agree"
    )


# -- behaviour of the engine we build on ---------------------------------------------------


class Spawner:
    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task

    async def settle(self) -> None:
        while not all(t.done() for t in self.tasks):
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> None:
        self.sent.append((data, addr))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


SITE = SiteKey.generate()
TRUST = TrustStore({SITE.key_id: SITE.public_bytes})
MEMBER_A, MEMBER_B = Member(SITE, b"a" * 8), Member(SITE, b"b" * 8)
A, B = MEMBER_A.node_id, MEMBER_B.node_id
ADDR_A, ADDR_B = ("127.0.0.1", 4001), ("127.0.0.1", 4002)
NOW = 1_700_000_000.0


def make_protocol(
    member: Member, spawn: Spawner, *, rpc_timeout: float = 5.0, ksize: int = 20
) -> NodeProtocol:
    return NodeProtocol(
        Node(member.node_id),
        ksize,
        member=member,
        trust=TRUST,
        store=MemoryRecordStore(TRUST),
        clock=lambda: NOW,
        stats=DhtStats(),
        spawn=spawn,
        rpc_timeout=rpc_timeout,
        dead_ttl=30.0,
        hedge=True,
    )


def test_protocol_attributes_set_by_the_engine() -> None:
    # On the engine's own objects: NodeProtocol sets _wait_timeout itself, so only a bare
    # RPCProtocol shows whether rpcudp still has that attribute.
    recheck = (
        f"re-check NodeProtocol.__init__, _request, _timeout, patience and shutdown in {PROTO}"
    )
    bare = vars(RPCProtocol(wait_timeout=0.25))
    assert bare.get("_wait_timeout") == 0.25, f"rpcudp's _wait_timeout is gone: {recheck}"
    assert bare.get("_outstanding") == {}, f"rpcudp's _outstanding dict is gone: {recheck}"
    assert "transport" in bare, f"rpcudp's transport attribute is gone: {recheck}"
    source = Node(A)
    kademlia = vars(KademliaProtocol(source, NoStorage(), 7))
    assert kademlia.get("source_node") is source, f"KademliaProtocol.source_node: {recheck}"
    assert isinstance(kademlia.get("storage"), NoStorage), f"KademliaProtocol.storage: {recheck}"
    router = kademlia.get("router")
    assert isinstance(router, RoutingTable), f"KademliaProtocol.router changed: {recheck}"
    assert router.ksize == 7, f"RoutingTable.ksize changed: _replicate_to in {PROTO}"
    assert all(isinstance(b, KBucket) for b in router.buckets), f"DhtNode.peers in {NODE}"


def test_a_protocol_is_bound_to_its_members_node_id() -> None:
    with pytest.raises(ValueError, match="bound"):
        NodeProtocol(
            Node(B), 20, member=MEMBER_A, trust=TRUST, store=MemoryRecordStore(TRUST),
            clock=lambda: NOW, stats=DhtStats(), spawn=Spawner(), rpc_timeout=1.0,
            dead_ttl=30.0, hedge=True,
        )  # fmt: skip


def inner(sent: bytes) -> bytes:
    """The rpcudp datagram inside one we sent (which must be sealed by a member)."""
    return Sessions(Member(SITE, b"c" * 8), TRUST).open(sent, NOW).datagram


async def test_request_wire_format_and_answer() -> None:
    spawn = Spawner()
    a, b = make_protocol(MEMBER_A, spawn), make_protocol(MEMBER_B, spawn)
    a.connection_made(ta := FakeTransport())
    b.connection_made(tb := FakeTransport())
    assert a.transport is ta, f"rpcudp's connection_made: NodeProtocol.connection_made ({PROTO})"
    pinging = asyncio.ensure_future(a.ping_address(ADDR_B))
    await asyncio.sleep(0)
    [(request, to)] = ta.sent
    plain = inner(request)
    msg_id = plain[1:21]
    assert to == ADDR_B and plain[:1] == b"\x00", f"re-check _dispatch in {PROTO}"
    assert unpack(plain[21:]) == ["ping", [A]], (
        f"rpcudp's request framing changed: re-check _request/_accept_request in {PROTO}"
    )
    entry = a._outstanding[msg_id]
    assert isinstance(entry, tuple) and len(entry) == 2
    b.datagram_received(request, ADDR_A)
    await spawn.settle()
    [(answer, back)] = tb.sent
    assert back == ADDR_A and inner(answer) == b"\x01" + msg_id + pack(B)
    a.datagram_received(answer, ADDR_B)
    assert await asyncio.wait_for(pinging, 1.0) == B
    assert a._outstanding == {} and entry[1].cancelled()
    await spawn.close()


async def test_request_timeout_calls_our_timeout() -> None:
    spawn = Spawner()
    protocol = make_protocol(MEMBER_A, spawn, rpc_timeout=0.01)
    protocol.connection_made(FakeTransport())
    future = protocol._request(ADDR_B, "find_node", (A, B), B)
    assert await asyncio.wait_for(future, 1.0) == (False, None)
    assert protocol._stats.rpc_timeouts == 1
    assert protocol._outstanding == {} and protocol._expect == {}
    await spawn.close()


async def test_request_size_limit_fits_a_record() -> None:
    spawn = Spawner()
    protocol = make_protocol(MEMBER_A, spawn)
    protocol.connection_made(transport := FakeTransport())
    record = b"x" * MAX_RECORD_BYTES
    protocol._request(ADDR_B, "store", (A, B, record), B).cancel()
    assert len(transport.sent) == 1, "a store of MAX_RECORD_BYTES no longer fits WIRE_LIMIT"
    with pytest.raises(RpcTooLarge):
        protocol._request(ADDR_B, "store", (A, B, b"x" * WIRE_LIMIT), B)
    protocol.shutdown()
    await spawn.close()


async def test_refresh_ids_are_node_ids() -> None:
    spawn = Spawner()
    protocol = make_protocol(MEMBER_A, spawn)
    for bucket in protocol.router.buckets:
        bucket.last_updated = float("-inf")  # lonely
    ids = protocol.get_refresh_ids()
    assert ids and all(isinstance(i, bytes) and len(i) == 20 for i in ids), (
        f"KademliaProtocol.get_refresh_ids changed: re-check NodeServer._refresh_table in {NODE}"
    )
    await spawn.close()


def test_node_is_an_id_ip_port_triple() -> None:
    node = Node(A, "192.0.2.1", 5060)
    assert (node.id, node.ip, node.port) == (A, "192.0.2.1", 5060)
    assert tuple(node) == (A, "192.0.2.1", 5060), (
        f"tuple(Node) changed: find_node answers are built from it (rpc_find_node in {PROTO})"
    )
    assert node.long_id == int.from_bytes(A, "big")
    assert node.distance_to(Node(B)) == int.from_bytes(A, "big") ^ int.from_bytes(B, "big")


def test_find_neighbors_nearest_first_without_target_or_excluded() -> None:
    table = RoutingTable(None, 3, Node(bytes(20)))
    nodes = [Node(bytes([0] * 19 + [i]), "192.0.2.1", 5000 + i) for i in range(1, 6)]
    for node in nodes:
        table.add_contact(node)
    target = nodes[0]
    found = table.find_neighbors(target, exclude=nodes[1])
    distances = [n.distance_to(target) for n in found]
    assert distances == sorted(distances) and len(found) == 3, (
        f"find_neighbors is no longer the k nearest, nearest first: re-check _replicate_to "
        f"(neighbors[0] nearest, [-1] farthest) in {PROTO}"
    )
    assert target not in found and nodes[1] not in found, (
        f"find_neighbors no longer leaves out the target and exclude: rpc_find_node in {PROTO}"
    )
    assert len(table.find_neighbors(target, 2)) == 2, f"NodeServer._refresh_table in {NODE}"
    assert table.is_new_node(Node(b"\x09" * 20)) and not table.is_new_node(nodes[0])
    held = nodes[2]
    bucket = table.buckets[table.get_bucket_for(held)]
    assert bucket[held.id] is held and bucket[b"\x09" * 20] is None, (
        f"a bucket no longer gives its contact by id: NodeProtocol._forget_contact in {PROTO}"
    )
    table.remove_contact(nodes[0])
    assert table.is_new_node(nodes[0])


def test_node_heap_as_the_lookup_uses_it() -> None:
    target = Node(bytes(20))
    heap = NodeHeap(target, 2)
    near, mid, far = (Node(bytes([0] * 19 + [i]), "192.0.2.1", i) for i in (1, 2, 3))
    heap.push([far, near])
    heap.push(mid)  # a single node, not a list
    heap.push([near])  # already there: no duplicate
    recheck = f"IterativeLookup in {LOOKUP}"
    assert list(heap) == [near, mid], f"NodeHeap iteration is not the k nearest: {recheck}"
    heap.mark_contacted(near)
    assert heap.get_uncontacted() == [mid], f"NodeHeap contacted marks changed: {recheck}"
    heap.remove([near.id])
    assert list(heap) == [mid, far], f"NodeHeap.remove no longer takes ids: {recheck}"


async def test_server_uses_our_protocol_and_refresh() -> None:
    spawn = Spawner()
    made: list[tuple[Node, int]] = []

    def make(node: Node, ksize: int) -> NodeProtocol:
        made.append((node, ksize))
        assert bytes(node.id) == MEMBER_A.node_id
        return make_protocol(MEMBER_A, spawn, ksize=ksize)

    server = NodeServer(make, spawn, ksize=5, alpha=2, node_id=A)
    assert (server.node.id, server.ksize, server.alpha) == (A, 5, 2), (
        f"Server attributes node/ksize/alpha changed: re-check NodeServer in {NODE}"
    )
    assert server.protocol is None and server.transport is None
    await server.listen(0, interface="127.0.0.1")
    try:
        assert made == [(server.node, 5)] and isinstance(server.protocol, NodeProtocol), (
            f"Server.listen no longer builds the protocol with _create_protocol: {NODE}"
        )
        assert server.transport.get_extra_info("sockname")[1] > 0, f"DhtNode.listen in {NODE}"
        names = [t.get_coro().__qualname__ for t in spawn.tasks]
        assert "NodeServer._refresh_table" in names, (
            f"Server.listen no longer calls refresh_table(): re-check NodeServer in {NODE}"
        )
        loop = server.refresh_loop
        assert isinstance(loop, asyncio.TimerHandle)
    finally:
        server.stop()
    assert loop.cancelled() and server.transport.is_closing(), (
        f"Server.stop no longer cancels refresh_loop or closes transport: DhtNode.close in {NODE}"
    )
    await spawn.close()


def test_our_table_finds_the_nearest_contacts_wherever_they_are() -> None:
    # kademlia's TableTraverser can stop before reading every bucket (see Table in
    # dht_adaptor/protocol.py); ours must always give the k nearest of all contacts.
    from dht_adaptor.protocol import Table

    rng = random.Random(5)
    me = Node(rng.randbytes(20))
    table = Table(None, 4, me)
    contacts = [Node(rng.randbytes(20), "192.0.2.1", 5000 + i) for i in range(300)]
    for node in contacts:
        with contextlib.suppress(AttributeError):  # a full bucket pings its head: no protocol
            table.add_contact(node)
    held = [n for b in table.buckets for n in b.get_nodes()]
    assert len(table.buckets) > 4 and len(held) > 20
    for _ in range(300):
        target = Node(rng.randbytes(20))
        want = sorted(held, key=lambda n: n.distance_to(target))[:4]
        assert table.find_neighbors(target) == want
    # The target itself and what shares the excluded node's address are left out.
    assert held[0] not in table.find_neighbors(held[0], k=50)
    assert held[1] not in table.find_neighbors(held[0], k=50, exclude=held[1])
