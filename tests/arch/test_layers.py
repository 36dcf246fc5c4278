"""The import graph of the project: layers that point one way.

Read from the source with ``ast`` (so imports inside functions count too, and nothing is
executed): no module of ``proxy``, ``dht_adaptor`` or ``admin_api`` may import itself
round a cycle; the sans-IO core ``proxy.sip`` imports only the standard library and
itself, and none of its modules that would bring I/O, clocks or randomness; the admin
API imports nothing of the site it serves.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "dht_adaptor", "admin_api")
# A sans-IO core reads no clock, opens no socket and draws no random numbers (STYLE.md).
IO_MODULES = frozenset(
    {"asyncio", "socket", "selectors", "time", "random", "secrets", "threading", "os"}
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports, anywhere in its source (``TYPE_CHECKING`` too)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # ``from pkg import mod`` imports the module pkg.mod.
            found.update(f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _project(target: str, known: set[str]) -> str | None:
    """The project module ``target`` names (a name inside a module counts as the module)."""
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    known = set(graph)
    edges = {
        m: {t for i in imps if (t := _project(i, known)) is not None and t != m}
        for m, imps in graph.items()
    }
    # A package's __init__ is imported on the way to its modules; it imports nothing here
    # that could close a cycle unless it imports them back, which the edges then show.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert "proxy.server" in graph and "proxy.sip.message" in graph
    assert "proxy.sip.message" in {
        t for i in graph["proxy.server"] if (t := _project(i, set(graph)))
    }


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_sans_io_core_imports_only_the_standard_library_and_itself() -> None:
    bad = {}
    for name, imports in _graph().items():
        if not name.startswith("proxy.sip"):
            continue
        for imp in imports:
            top = imp.split(".")[0]
            if imp == "__future__" or imp.startswith("proxy.sip"):
                continue
            if top not in sys.stdlib_module_names or top in IO_MODULES:
                bad.setdefault(name, []).append(imp)
    assert bad == {}


def test_the_admin_api_imports_nothing_of_the_site() -> None:
    bad = {
        name: sorted(i for i in imports if i.split(".")[0] in ("proxy", "dht_adaptor"))
        for name, imports in _graph().items()
        if name.startswith("admin_api")
    }
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_proxy_core_does_not_import_the_dht_engine() -> None:
    # The handlers reach the overlay through proxy.location's interfaces; only the site
    # builder (and the CLI around it) knows the adaptor, and only dht_adaptor knows
    # kademlia.
    graph = _graph()
    handlers = ("proxy.server", "proxy.router", "proxy.registrar_service",
                "proxy.dht_routing", "proxy.forker", "proxy.transactions")  # fmt: skip
    for name in handlers:
        assert not {i for i in graph[name] if i.startswith("dht_adaptor")}, name
    engine = {"kademlia", "rpcudp", "umsgpack"}
    users = {n for n, imps in graph.items() if {i.split(".")[0] for i in imps} & engine}
    assert users <= {"dht_adaptor.node", "dht_adaptor.protocol", "dht_adaptor.lookup"}, users
