"""bench/dht_sim.py: real DhtNodes on a simulated network find every key they stored.

A correctness check of the simulator and the overlay together (simulated time, no
sockets): 200 nodes, no datagram loss, every put's record is found by gets from random
other nodes, before and after a fifth of the nodes are killed. Nothing here is timed;
bench/README.md and docs/scale-model.md hold the numbers of larger runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from dht_adaptor.keys import SiteKey

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dht_sim", BENCH / "dht_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("dht_sim", module)
    spec.loader.exec_module(module)
    return module


def test_every_lookup_finds_its_key() -> None:
    sim = load_sim()
    options = sim.parse_args(
        ["--nodes", "200", "--puts", "40", "--gets", "80", "--loss", "0",
         "--churn-seconds", "10", "--churn-rate", "8", "--settle", "2", "--seed", "7"]
    )  # fmt: skip
    result = sim.simulate(options)

    assert result["put"]["ok"] == result["put"]["ops"] == 40
    assert result["get"]["ok"] == result["get"]["ops"] == 80
    churn = result["churn"]
    assert churn["killed"] == 40
    assert churn["all"]["ops"] >= 70
    assert churn["all"]["ok"] == churn["all"]["ops"]
    # Lookups went through the overlay: several RPCs, at least one hop each.
    assert result["get"]["rpcs_mean"] > 1 and result["get"]["hops_mean"] >= 1


def test_the_simulation_puts_the_real_signatures_back() -> None:
    sim = load_sim()
    key = SiteKey.generate()
    with sim.instrumented(real_crypto=False):
        assert key.sign(b"x") == bytes(64)
    assert key.sign(b"x") != bytes(64)
