"""The seed's capacity model, re-derived from measurements: how many users N one-core
sites hold. Reads what bench/dht_scale.py and bench/dht_sim.py wrote (JSON) and prints
the arithmetic as markdown (docs/scale-model.md explains it and keeps a copy).

Per user, the overlay spends CPU on writes and on lookups::

    CPU/s per user = w * (1 + r) * C_put  +  g * C_get

* ``w``: writes per user per second: 1/60 for "a refresh per user per minute", each
  written; the adaptor's actual rate is one write per ``republish + check/2`` seconds
  (a refresh that changes nothing is not written until half its lifetime is spent,
  1800 s for 3600 s registrations, but every AOR is rewritten once it is
  ``dht_republish`` = 600 s old, checked every 60 s: so every 630 s on average).
* ``r``: the nodes' own republishing on top (``DhtNode.republish`` every 600 s +-10%
  skips a key stored there within 600 s; the adaptor's write is up to 660 s old, so a
  holder's pass finds it stale in (A-600)/600 of its phases, A the write interval):
  ``r = E[1 - (1 - (A-600)/600)^k]`` with A uniform in [600, 660] s; 0 at one write a
  minute.
* ``C_put``, ``C_get``: CPU per put and per get summed over the overlay, measured at
  the harness's largest size and carried to N sites by the simulation's RPC counts:
  ``C_put(N) = finds_put(N) * c_find + stores_put(N) * c_store`` with ``c_find`` the
  measured CPU per RPC of a get, and ``c_store`` what the rest of a put's CPU costs per
  store (the split of a put's RPCs into finds and stores from the simulation at the
  harness's size).
* ``g``: lookups per user per second: ``--bhca`` call attempts per user in the busy
  hour, one get each (no lookup cache).

A site's core also runs its node's idle work (timers, sweeps; measured per node at the
preload nearest to the records a site then holds, U*k/N). Users per overlay:
``U = N * (1 - idle) / (CPU/s per user)``.

Run:  .venv/bin/python bench/scale_model.py --scale scale.json --sim sim1k.json sim10k.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Json = dict[str, Any]


@dataclass(frozen=True)
class OpCost:
    """CPU per put and per get (seconds) at ``nodes`` sites, and how it splits."""

    nodes: int
    put: float
    get: float
    c_find: float  # per find RPC (both ends)
    c_store: float  # per store RPC (both ends)


def republish_extra(
    k: int, interval: float = 600.0, check: float = 60.0, steps: int = 600
) -> float:
    """Expected node-level republishes per key per adaptor write (see the module doc)."""
    total = 0.0
    for i in range(steps):
        stale = (i + 0.5) / steps * check / interval
        total += 1 - (1 - stale) ** k
    return total / steps


def measured(scale: Json, preload: int) -> tuple[Json, Json]:
    """The p2psip put and get rows at the largest size measured, with ``preload``."""
    rows = [
        r
        for r in scale["runs"]
        if r["engine"] == "p2psip" and r["preload"] == preload and "put" in r
    ]
    if not rows:
        raise SystemExit(f"no p2psip run with preload {preload} in the harness JSON")
    best = max(rows, key=lambda r: r["nodes"])
    return best, {"put": best["put"], "get": best["get"]}


def sim_at(sims: list[Json], nodes: int) -> Json:
    for s in sims:
        if s["nodes"] == nodes:
            return s
    raise SystemExit(f"no simulation of {nodes} nodes given")


def costs(row: Json, sims: list[Json], targets: list[int]) -> Iterator[OpCost]:
    put, get = row["put"], row["get"]
    c_put = put["cpu_ms_per_op"] / 1e3
    c_get = get["cpu_ms_per_op"] / 1e3
    c_find = c_get / get["rpcs_per_op"]
    base = sim_at(sims, row["nodes"])
    finds, stores = base["put"]["finds_mean"], base["put"]["stores_mean"]
    c_store = max(0.0, (c_put - finds * c_find) / stores)
    yield OpCost(row["nodes"], c_put, c_get, c_find, c_store)
    for n in targets:
        if n == row["nodes"]:
            continue
        s = sim_at(sims, n)
        yield OpCost(
            n,
            s["put"]["finds_mean"] * c_find + s["put"]["stores_mean"] * c_store,
            s["get"]["finds_mean"] * c_find + s["get"]["stores_mean"] * c_store,
            c_find,
            c_store,
        )


def idle_fraction(scale: Json, records: float) -> tuple[float, int]:
    """Idle CPU of one node (fraction of a core) at the measured preload nearest above
    ``records`` (or the largest), and that preload."""
    rows = [r for r in scale["runs"] if r["engine"] == "p2psip" and "idle" in r]
    largest = max(r["nodes"] for r in rows)
    rows = sorted((r for r in rows if r["nodes"] == largest), key=lambda r: r["preload"])
    chosen = next((r for r in rows if r["preload"] >= records), rows[-1])
    return chosen["idle"]["cpu_us_per_node_s"] / 1e6, chosen["preload"]


def report(options: argparse.Namespace) -> Iterator[str]:
    scale = json.loads(options.scale.read_text())
    sims = [json.loads(p.read_text()) for p in options.sim]
    k = options.k
    row, _ = measured(scale, options.preload)
    r_adaptor = republish_extra(k)
    w_adaptor = 1 / (options.republish + options.check / 2)
    scenarios = [
        ("one write per user per minute", 1 / 60, 0.0),
        (
            f"the adaptor's rate (every {1 / w_adaptor:.0f} s, r = {r_adaptor:.2f})",
            w_adaptor,
            r_adaptor,
        ),
    ]
    g = options.bhca / 3600
    yield f"Harness row: p2psip, {row['nodes']} nodes, {row['preload']} records/node "
    yield f"(k = {k}, lookups: {options.bhca} call attempt(s) per user per busy hour).\n"
    yield "| sites N | C_put ms | C_get ms | c_find ms/RPC | c_store ms/RPC |"
    yield "|---|---|---|---|---|"
    table = list(costs(row, sims, options.sites))
    for c in table:
        yield (
            f"| {c.nodes:,} | {c.put * 1e3:.2f} | {c.get * 1e3:.2f} | {c.c_find * 1e3:.3f} "
            f"| {c.c_store * 1e3:.3f} |"
        )
    yield ""
    yield (
        "| sites N | writes | CPU/s per user (ms) | records/site at U | idle/site "
        "| users per site | users in the overlay |"
    )
    yield "|---|---|---|---|---|---|---|"
    for c in table:
        if c.nodes not in options.sites:
            continue
        for name, w, r in scenarios:
            per_user = w * (1 + r) * c.put + g * c.get
            # Iterate once: idle depends on the records a site holds.
            users = c.nodes / per_user
            idle, at = idle_fraction(scale, users * k / c.nodes)
            users = c.nodes * (1 - idle) / per_user
            yield (
                f"| {c.nodes:,} | {name} | {per_user * 1e3:.4f} "
                f"| {users * k / c.nodes:,.0f} | {idle * 100:.1f}% (at {at:,}) "
                f"| {users / c.nodes:,.0f} | {users / 1e6:,.1f} M |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=Path, required=True, help="bench/dht_scale.py JSON")
    parser.add_argument("--sim", type=Path, nargs="+", required=True, help="dht_sim.py JSONs")
    parser.add_argument("--preload", type=int, default=10_000, help="harness row to use")
    parser.add_argument(
        "--sites", type=lambda t: [int(x) for x in t.split(",")], default=[1000, 10_000]
    )
    parser.add_argument("--k", type=int, default=8, help="copies of a record")
    parser.add_argument("--bhca", type=float, default=1.0, help="calls per user, busy hour")
    parser.add_argument("--republish", type=float, default=600.0, help="dht_republish, s")
    parser.add_argument("--check", type=float, default=60.0, help="adaptor's republish check, s")
    options = parser.parse_args(argv)
    print("\n".join(report(options)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
