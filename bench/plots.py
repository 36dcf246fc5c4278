"""The PNGs of benchmarks.md (matplotlib, no display needed): rate asked against rate
served, CPU per request, and response-time percentiles, per scenario and server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .report import Result, reference

COLORS = {"p2psip": "tab:blue", "p2psip-redis": "tab:green", "p2psip-workers": "tab:purple",
          "kamailio": "tab:red"}  # fmt: skip


def _by_server(results: Result, scenario: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for o in results["outcomes"]:
        if o["scenario"] == scenario and o["steps"]:
            out[o["server"]] = sorted(o["steps"], key=lambda s: s["asked"])
    return out


def _grid(n: int) -> tuple[Any, list[Any]]:
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat


def served(results: Result, path: Path) -> None:
    scenarios = list(results["scenarios"])
    fig, axes = _grid(len(scenarios))
    for ax, scenario in zip(axes, scenarios, strict=False):
        top = 1.0
        for server, steps in _by_server(results, scenario).items():
            xs = [s["asked"] for s in steps]
            ax.plot(xs, [s["served_per_s"] for s in steps], "o-", label=server,
                    color=COLORS.get(server))  # fmt: skip
            top = max(top, *xs)
        ax.plot([0, top], [0, top], ":", color="grey", label="served = asked")
        ax.set_title(f"{scenario}: rate asked vs rate served")
        ax.set_xlabel("asked /s")
        ax.set_ylabel("served /s (final 200s while sending)")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cpu(results: Result, path: Path) -> None:
    scenarios = list(results["scenarios"])
    servers = list(results["servers"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(servers))
    for i, server in enumerate(servers):
        values = []
        for scenario in scenarios:
            found = [o for o in results["outcomes"]
                     if o["server"] == server and o["scenario"] == scenario]  # fmt: skip
            ref = reference(found[0]) if found else None
            values.append((ref or {}).get("cpu_us") or 0.0)
        xs = [j + i * width for j in range(len(scenarios))]
        ax.bar(xs, values, width, label=server, color=COLORS.get(server))
    ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(scenarios))])
    ax.set_xticklabels(scenarios)
    ax.set_ylabel("server CPU µs per request (at the sustained rate)")
    ax.set_title("CPU per request (lower is better; 0: not measured)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def latency(results: Result, path: Path) -> None:
    scenarios = list(results["scenarios"])
    fig, axes = _grid(len(scenarios))
    for ax, scenario in zip(axes, scenarios, strict=False):
        for server, steps in _by_server(results, scenario).items():
            timed = [s for s in steps if s["p50_ms"] is not None]
            xs = [s["asked"] for s in timed]
            color = COLORS.get(server)
            ax.plot(xs, [max(s["p50_ms"], 0.5) for s in timed], "o-", color=color,
                    label=f"{server} p50")  # fmt: skip
            ax.plot(xs, [max(s["p99_ms"], 0.5) for s in timed], "s--", color=color,
                    label=f"{server} p99")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{scenario}: response time (1 ms resolution; 0 drawn at 0.5)")
        ax.set_xlabel("asked /s")
        ax.set_ylabel("ms")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw(results: Result, directory: Path) -> list[str]:
    """Write the three PNGs into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "bench_served.png", directory / "bench_cpu.png",
             directory / "bench_latency.png"]  # fmt: skip
    served(results, paths[0])
    cpu(results, paths[1])
    latency(results, paths[2])
    return [str(p) for p in paths]
