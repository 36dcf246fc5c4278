"""The rate search for one server and scenario, and the steps past capacity.

Sustained means: at most ``max_failures`` of the calls (0.1% by default) ended without
their final 200 (a 503, no answer within the receive timeout, or a wrong one), and the
server served at least 95% of the asked rate while SIPp was sending (a server that
answers everything late is not keeping up). The search doubles the rate from the
scenario's start rate while steps are sustained (halving instead if the first is not),
then bisects between the last sustained and the first failed rate until they are within
``precision`` of each other. Each step starts the server afresh.

Then, at the rate found: a confirmation step (its CPU per request, response times and
deferred CPU are the figures the tables show), and steps at 2x and 4x that rate: past
capacity, a server should go on serving about as much and answer the rest 503, not
collapse into retransmissions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .steps import Step

RunStep = Callable[[int, str], Step]


def nice(rate: float) -> int:
    """Round a bisection midpoint to two significant figures (1234 -> 1200, 87 -> 87)."""
    if rate < 100:
        return max(1, round(rate))
    digits = len(str(int(rate))) - 2
    return int(round(rate / 10**digits) * 10**digits)


@dataclass
class Outcome:
    """Everything measured for one server and one scenario."""

    server: str
    scenario: str
    status: str = "ok"  # ok, not available, does not apply, error
    note: str = ""
    sustained: int | None = None
    steps: list[Step] = field(default_factory=list)

    def phase(self, name: str) -> Step | None:
        found = [s for s in self.steps if s.phase == name]
        return found[-1] if found else None

    @property
    def reference(self) -> Step | None:
        """The step the summary quotes: the confirmation, else the best sustained step."""
        confirm = self.phase("confirm") or self.phase("quick")
        if confirm is not None:
            return confirm
        ok = [s for s in self.steps if s.sustained and s.asked == self.sustained]
        return ok[-1] if ok else None

    def to_json(self) -> dict[str, Any]:
        return {
            "server": self.server, "scenario": self.scenario, "status": self.status,
            "note": self.note, "sustained": self.sustained,
            "steps": [s.to_json() for s in self.steps],
        }  # fmt: skip


def find_capacity(
    run: RunStep, outcome: Outcome, start: int, *, max_rate: int, precision: float,
    min_rate: int = 2,
) -> int | None:  # fmt: skip
    """The highest sustained rate found (None if not even ``min_rate``); steps go into
    ``outcome``."""
    best: int | None = None
    failed: int | None = None
    rate = start
    while True:
        step = run(rate, "search")
        outcome.steps.append(step)
        if step.sustained:
            best = rate
            if failed is not None or rate * 2 > max_rate:
                break
            rate *= 2
        else:
            failed = rate
            if best is not None:
                break
            rate //= 2
            if rate < min_rate:
                return None
    while best is not None and failed is not None and failed - best > precision * best:
        mid = nice((best + failed) / 2)
        if mid <= best or mid >= failed:
            break
        step = run(mid, "search")
        outcome.steps.append(step)
        if step.sustained:
            best = mid
        else:
            failed = mid
    return best


def measure(
    run: RunStep, outcome: Outcome, start: int, *, max_rate: int, precision: float,
    multiples: tuple[int, ...] = (2, 4),
) -> None:  # fmt: skip
    """The search, the confirmation step and the steps past capacity."""
    best = find_capacity(run, outcome, start, max_rate=max_rate, precision=precision)
    outcome.sustained = best
    if best is None:
        outcome.note = "no rate was sustained"
        return
    confirm = run(best, "confirm")
    outcome.steps.append(confirm)
    if not confirm.sustained:
        outcome.note = (
            f"the confirmation step at {best}/s was not sustained ({confirm.errors} errors)"
        )
    for multiple in multiples:
        outcome.steps.append(run(best * multiple, f"{multiple}x"))
