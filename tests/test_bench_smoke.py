"""``python -m bench --quick``: the side-by-side harness runs end to end and writes its
table and raw results. A smoke test of the harness, never of speed: nothing here asserts
a rate, a CPU time or a duration (the machine running the suite is shared), only that
every scenario was measured and its calls were served.

The pure parts (the rate search, percentiles, SIPp's files) are checked on their own.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.load import _rtt_freq, percentile, window_rates
from bench.search import Outcome, find_capacity, measure, nice
from bench.steps import Step

ROOT = Path(__file__).resolve().parent.parent


def kamailio_installed() -> bool:
    return shutil.which("kamailio") is not None or Path("/usr/sbin/kamailio").exists()


@pytest.mark.e2e
def test_the_quick_run_measures_every_scenario_and_writes_a_table(tmp_path: Path) -> None:
    if shutil.which("sipp") is None:
        pytest.skip("sipp is not installed (apt-get install sip-tester)")
    servers = ["p2psip", *(["kamailio"] if kamailio_installed() else [])]
    plots = importlib.util.find_spec("matplotlib") is not None
    argv = [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path),
            "--servers", ",".join(servers), *([] if plots else ["--no-plots"])]  # fmt: skip
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    results = json.loads((tmp_path / "benchmarks.json").read_text())
    outcomes = {(o["server"], o["scenario"]): o for o in results["outcomes"]}
    scenarios = ("register", "call", "register-auth", "call-sites")
    assert set(outcomes) == {(s, c) for s in servers for c in scenarios}
    for (server, scenario), outcome in outcomes.items():
        if (server, scenario) == ("kamailio", "call-sites"):
            assert outcome["status"] == "does not apply"
            continue
        assert outcome["status"] == "ok", outcome
        (step,) = outcome["steps"]
        assert step["phase"] == "quick"
        # Calls went through (at 20/s for 2 s), and their cost and times were read.
        assert step["served"] > 0, outcome
        assert step["server_cpu_s"] >= 0 and step["p50_ms"] is not None, step
    calls_across = outcomes[("p2psip", "call-sites")]["steps"][0]
    assert calls_across["stats"]["calls_routed_dht"] > 0  # the second site looked them up
    assert {m["server"] for m in results["memory"]} == set(servers)

    table = (tmp_path / "benchmarks.md").read_text()
    assert "A --quick run" in table
    for scenario in scenarios:
        assert f"### {scenario}: " in table
    assert "| p2psip | 20 |" in table
    assert "## Every step" in table and "## Machine" in table
    if plots:
        for name in ("bench_served", "bench_cpu", "bench_latency"):
            assert (tmp_path / "img" / f"{name}.png").stat().st_size > 0


def test_a_missing_tool_is_named_with_its_install_command(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no sipp there
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--servers", "p2psip", "--no-plots",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["bench: sipp is missing: apt-get install sip-tester"]
    assert not (tmp_path / "out").exists()


# --- the pure parts ------------------------------------------------------------------------


def fake_step(rate: int, phase: str, capacity: int) -> Step:
    ok = rate <= capacity
    return Step(
        server="fake", scenario="register", phase=phase, asked=rate, duration=20,
        sent=rate * 20, served=rate * 20 if ok else capacity * 20, shed=0,
        failed=0 if ok else (rate - capacity) * 20, unfinished=0, retransmissions=0,
        wall_s=20, served_per_s=min(rate, capacity), shed_per_s=0, p50_ms=1, p99_ms=2,
        server_cpu_s=1, server_cpu_pct=5, cpu_us=10, deferred_cpu_s=None, sipp_cpu_pct=1,
        others_cores=0, loadavg=0, sustained=ok,
    )  # fmt: skip


@pytest.mark.parametrize("capacity", [30, 199, 200, 1000, 1234, 7000])
def test_the_search_doubles_then_bisects_to_within_the_precision(capacity: int) -> None:
    outcome = Outcome("fake", "register")
    found = find_capacity(
        lambda rate, phase: fake_step(rate, phase, capacity), outcome, 200,
        max_rate=20000, precision=0.1,
    )  # fmt: skip
    assert found is not None and found <= capacity
    assert min(s.asked for s in outcome.steps if not s.sustained) > capacity
    assert found >= 0.85 * capacity
    assert len(outcome.steps) <= 12


def test_past_capacity_runs_at_twice_and_four_times_the_rate_found() -> None:
    outcome = Outcome("fake", "register")
    measure(lambda rate, phase: fake_step(rate, phase, 500), outcome, 100, max_rate=20000,
            precision=0.1)  # fmt: skip
    assert outcome.sustained is not None
    phases = [(s.phase, s.asked) for s in outcome.steps if s.phase != "search"]
    best = outcome.sustained
    assert phases == [("confirm", best), ("2x", 2 * best), ("4x", 4 * best)]
    assert outcome.reference is not None and outcome.reference.phase == "confirm"


def test_a_server_that_sustains_nothing_gets_no_rate() -> None:
    outcome = Outcome("fake", "call")
    measure(lambda rate, phase: fake_step(rate, phase, 0), outcome, 50, max_rate=20000,
            precision=0.1)  # fmt: skip
    assert outcome.sustained is None and outcome.note == "no rate was sustained"


def test_nice_rates_and_percentiles() -> None:
    assert [nice(x) for x in (87.4, 1234, 1250, 15500)] == [87, 1200, 1200, 16000]
    assert percentile([], 0.5) is None
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99)) == (50.0, 99.0)
    assert _rtt_freq(40) == 40 and _rtt_freq(4000) == 200 and _rtt_freq(401) == 1


def test_served_and_shed_rates_come_from_the_counts_rows_while_sending() -> None:
    def row(t: float, ok: int, shed: int) -> dict[str, str]:
        return {"ElapsedTime": f"00:00:{int(t):02d}:{int(t % 1 * 1e6):06d}",
                "2_503_Recv": str(shed), "3_200_Recv": "0", "4_200_Recv": str(ok)}  # fmt: skip

    rows = [row(0, 0, 0), row(1.0, 90, 5), row(2.0, 190, 10), row(3.0, 290, 15)]
    rows.append(row(4.0, 300, 15))  # the tail after sending: left out
    assert window_rates(rows, 1.0, 3.0) == (100.0, 5.0)
