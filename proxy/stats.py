"""Counters a site exposes (logged now; scraped by the admin API later)."""

from __future__ import annotations

from collections import Counter


class Stats:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def request(self, method: str) -> None:
        self.counters[f"requests_received.{method}"] += 1

    def response(self, status: int, *, sent: bool = False) -> None:
        direction = "sent" if sent else "received"
        self.counters[f"responses_{direction}.{status // 100}xx"] += 1

    def snapshot(self) -> dict[str, int]:
        return dict(self.counters)
