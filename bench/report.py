"""benchmarks.md from the results (the JSON ``python -m bench`` writes), and the plots.

Everything here reads the JSON only, so ``python -m bench --report-only FILE`` rewrites
the document from an earlier run.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

Result = dict[str, Any]
OURS_VS = "kamailio"


def _fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits == 0:
        return f"{value:,.0f}{unit}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}" if isinstance(value, int) else f"{value}{unit}"


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def reference(outcome: Result) -> Result | None:
    """The step the summary quotes: the confirmation (or quick) step, else the best."""
    steps = outcome["steps"]
    for phase in ("confirm", "quick"):
        found = [s for s in steps if s["phase"] == phase]
        if found:
            return found[-1]  # type: ignore[no-any-return]
    ok = [s for s in steps if s["sustained"] and s["asked"] == outcome["sustained"]]
    return ok[-1] if ok else None


def _phase(outcome: Result, phase: str) -> Result | None:
    found = [s for s in outcome["steps"] if s["phase"] == phase]
    return found[-1] if found else None


def _outcome(results: Result, server: str, scenario: str) -> Result | None:
    for o in results["outcomes"]:
        if o["server"] == server and o["scenario"] == scenario:
            return o  # type: ignore[no-any-return]
    return None


def _cpu_with_deferred(step: Result) -> float | None:
    if step.get("deferred_cpu_s") is None or not step["served"]:
        return None
    return float(1e6 * (step["server_cpu_s"] + step["deferred_cpu_s"]) / step["served"])


def _past(outcome: Result, phase: str) -> str:
    step = _phase(outcome, phase)
    if step is None:
        return "-"
    peak = outcome["sustained"] or 0
    share = f" ({100 * step['served_per_s'] / peak:.0f}%)" if peak else ""
    lost = step["failed"] + step["unfinished"]
    return (f"{step['served_per_s']:,.0f}{share}, 503 {step['shed_per_s']:,.0f}/s, "
            f"no answer {lost:,}")  # fmt: skip


def summary(results: Result, scenario: str) -> list[str]:
    rows = []
    for server in results["servers"]:
        o = _outcome(results, server, scenario)
        if o is None:
            continue
        if o["status"] != "ok":
            rows.append([server, o["status"] + (f": {o['note']}" if o["note"] else ""),
                         *["-"] * 7])  # fmt: skip
            continue
        ref = reference(o) or {}
        sustained = _fmt(o["sustained"]) + ("" if not o["note"] else f" ({o['note']})")
        rows.append([
            server, sustained, _fmt(ref.get("cpu_us")),
            _fmt(_cpu_with_deferred(ref)) if ref else "-",
            _fmt(ref.get("p50_ms")), _fmt(ref.get("p99_ms")),
            _past(o, "2x"), _past(o, "4x"),
            f"{_fmt(ref.get('sipp_cpu_pct'))}% / {_fmt(ref.get('others_cores'), 2)}",
        ])  # fmt: skip
    return _table(
        ["server", "sustained /s", "CPU µs per request", "with deferred", "p50 ms", "p99 ms",
         "served /s at 2x", "served /s at 4x", "SIPp CPU / others (cores)"],
        rows,
    )  # fmt: skip


def ratios(results: Result) -> list[str]:
    rows = []
    for scenario in results["scenarios"]:
        theirs = _outcome(results, OURS_VS, scenario)
        if theirs is None or theirs["status"] != "ok":
            continue
        ref_k = reference(theirs) or {}
        for server in results["servers"]:
            ours = _outcome(results, server, scenario)
            if server == OURS_VS or ours is None or ours["status"] != "ok":
                continue
            ref = reference(ours) or {}
            cpu = (ref.get("cpu_us") / ref_k["cpu_us"]
                   if ref.get("cpu_us") and ref_k.get("cpu_us") else None)  # fmt: skip
            rate = (ours["sustained"] / theirs["sustained"]
                    if ours["sustained"] and theirs["sustained"] else None)  # fmt: skip
            rows.append([scenario, server, _fmt(cpu, 2, "x"), _fmt(rate, 2, "x")])
    if not rows:
        return ["No Kamailio figures in this run, so no ratios.", ""]
    return _table(["scenario", "server", "CPU per request, ours/Kamailio",
                   "sustained rate, ours/Kamailio"], rows)  # fmt: skip


def targets(results: Result) -> list[str]:
    """The targets of issue 13, met or missed by how much, from this run's figures."""
    rows: list[list[str]] = []

    def cpu_ratio(server: str, scenario: str) -> float | None:
        ours, theirs = _outcome(results, server, scenario), _outcome(results, OURS_VS, scenario)
        if not ours or not theirs or ours["status"] != "ok" or theirs["status"] != "ok":
            return None
        a, b = (reference(ours) or {}).get("cpu_us"), (reference(theirs) or {}).get("cpu_us")
        return a / b if a and b else None

    for scenario, limit in (("register", 2.0), ("call", 1.5)):
        r = cpu_ratio("p2psip", scenario)
        rows.append([f"CPU per {scenario} ≤ {limit:g}x Kamailio's (one process)",
                     _fmt(r, 2, "x"), "-" if r is None else ("met" if r <= limit else
                     f"missed by {r / limit:.1f}x")])  # fmt: skip
    mem, red = (
        _outcome(results, "p2psip", "register"),
        _outcome(results, "p2psip-redis", "register"),
    )
    if mem and red and mem["sustained"] and red["sustained"]:
        share = red["sustained"] / mem["sustained"]
        rows.append(["Redis + DHT REGISTER rate ≥ 60% of the memory store's", f"{share:.0%}",
                     "met" if share >= 0.6 else "missed"])  # fmt: skip
    work = _outcome(results, "p2psip-workers", "register")
    rows.append(
        [
            "workers: REGISTER and call rates ≥ Kamailio's one worker",
            work["status"] if work and work["status"] != "ok" else "see above",
            "-",
        ]
    )
    for server in results["servers"]:
        if server == OURS_VS:
            continue
        for scenario in results["scenarios"]:
            o = _outcome(results, server, scenario)
            if not o or not o["sustained"]:
                continue
            worst = [s["served_per_s"] / o["sustained"] for s in o["steps"]
                     if s["phase"] in ("2x", "4x")]  # fmt: skip
            if worst:
                w = min(worst)
                rows.append([f"{server} {scenario}: served at 2x and 4x ≥ 90% of the peak",
                             f"{w:.0%}", "met" if w >= 0.9 else "missed"])  # fmt: skip
    return _table(["target (issue 13)", "this run", ""], rows)


def memory(results: Result) -> list[str]:
    if not results["memory"]:
        return ["Not measured in this run.", ""]
    rows = [[m["server"], _fmt(m["bindings"]), _fmt(m["rate"]), _fmt(m["before_mb"], 1),
             _fmt(m["after_mb"], 1), _fmt(m["per_100k_mb"], 1), _fmt(m["cpu_us"]),
             _fmt(m["failed"])] for m in results["memory"]]  # fmt: skip
    return _table(["server", "bindings", "REGISTER/s", "MB before", "MB after",
                   "MB per 100,000 bindings", "CPU µs per REGISTER", "failed"], rows)  # fmt: skip


def every_step(results: Result) -> list[str]:
    rows = []
    for o in results["outcomes"]:
        for s in o["steps"]:
            rows.append([
                o["server"], o["scenario"], s["phase"], _fmt(s["asked"]), _fmt(s["sent"]),
                _fmt(s["served"]), _fmt(s["shed"]), _fmt(s["failed"] + s["unfinished"]),
                _fmt(s["retransmissions"]), _fmt(s["served_per_s"]), _fmt(s["p50_ms"]),
                _fmt(s["p99_ms"]), _fmt(s["server_cpu_pct"]), _fmt(s["cpu_us"]),
                _fmt(s["sipp_cpu_pct"]), _fmt(s["others_cores"], 2), _fmt(s["loadavg"], 1),
                "yes" if s["sustained"] else "no", s.get("note") or "",
            ])  # fmt: skip
    return _table(
        ["server", "scenario", "step", "asked /s", "sent", "served", "503", "no answer",
         "retrans", "served /s", "p50 ms", "p99 ms", "server CPU %", "CPU µs/req",
         "SIPp CPU %", "others (cores)", "load avg", "sustained", "note"],
        rows,
    )  # fmt: skip


def conditions(results: Result) -> list[str]:
    steps = [s for o in results["outcomes"] for s in o["steps"]]
    if not steps:
        return []
    others = sorted(s["others_cores"] for s in steps)
    loads = [s["loadavg"] for s in steps]
    cores = int(results["machine"].get("cores", "1"))
    text = (f"Other processes on the machine used {others[len(others) // 2]:.2f} cores "
            f"(median over the steps; {others[0]:.2f}-{others[-1]:.2f}) of {cores}, and the "
            f"load average was {min(loads):.1f}-{max(loads):.1f}.")  # fmt: skip
    if others[len(others) // 2] > 0.2 * cores:
        text = (
            "**This machine was busy with other work during the run: read the ratios, "
            "not the absolute figures, and expect both to move.** " + text
        )
    return [text, ""]


def write_report(results: Result, out: Path, *, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images: list[str] = []
    if plots:
        from .plots import draw

        images = draw(results, out / "img")
    settings = results["settings"]
    lines = ["# Benchmarks: p2psip side by side with Kamailio", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    if results.get("quick"):
        lines += ["**A --quick run (the smoke test): one short step per scenario, no search. "
                  "Its figures say the harness works, nothing about speed.**", ""]  # fmt: skip
    lines += [f"Run {results['started']} - {results.get('finished', '(unfinished)')}.", ""]
    lines += conditions(results)
    lines += ["## Machine", ""]
    lines += _table(["", ""], ([k, str(v)] for k, v in results["machine"].items()))
    lines += ["## Command", "", "```sh", results["command"], "```", ""]
    env = " ".join(f"{k}={v}" for k, v in settings["p2psip_environment"].items())
    lines += [
        f"Each step runs {settings['duration_s']:g} s of SIPp load (UDP, open loop) against a "
        f"server started afresh; sustained means under {100 * settings['max_failures']:g}% "
        f"of the calls without their final 200 (a 503 or no answer within "
        f"{settings['recv_timeout_s']:g} s) and at least 95% of the asked rate served while "
        f"sending; the search doubles, then bisects to within "
        f"{100 * settings['precision']:g}%. p2psip runs with `{env}`. The servers:", "",
    ]  # fmt: skip
    lines += [f"* `{k}`: {v['title']}" + (f" ({v['note']})" if v.get("note") else "")
              for k, v in results["servers"].items()]  # fmt: skip
    lines += ["", "## Results", ""]
    lines += [
        "Per scenario: the highest rate sustained; at that rate (the confirmation step) the "
        "server's CPU per request (all its processes) without and with the work it did in "
        f"the {settings['tail_s']:g} s after the load (UDP transactions waiting out Timer "
        "J), the response times, the load generator's CPU and the other processes' use of "
        "the machine; and the rate still served at 2x and 4x it (% of the sustained rate).",
        "",
    ]  # fmt: skip
    for key, scenario in results["scenarios"].items():
        lines += [f"### {key}: {scenario['title']} (per {scenario['unit']})", ""]
        lines += summary(results, key)
    lines += ["### Ours / Kamailio, same run", "", *ratios(results)]
    lines += ["### The targets of issue 13", "", *targets(results)]
    if results.get("analysis"):
        lines += [results["analysis"].rstrip(), ""]
    lines += ["### Memory per 100,000 bindings", "", *memory(results)]
    lines += [
        "Proportional set size (PSS) summed over all the server's processes, before the "
        "REGISTERs and 35 s after the last one (after Timer J), scaled to 100,000.", "",
    ]  # fmt: skip
    if images:
        lines += ["## Plots", ""] + [f"![{Path(i).stem}](img/{Path(i).name})" for i in images]
        lines += [""]
    lines += ["## Every step", "", *every_step(results)]
    lines += [
        "How to read this: `bench/README.md`, section \"Side by side with Kamailio\". Raw "
        "results: `benchmarks.json` next to this file.", "",
    ]  # fmt: skip
    (out / "benchmarks.md").write_text("\n".join(lines))
