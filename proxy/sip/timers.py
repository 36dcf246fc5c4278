"""Transaction timer values (RFC 3261 §17, table in Appendix A).

Every timer is derived from T1, T2 and T4, so tests (and lossy links) can scale them
all by changing three numbers. Durations are in seconds. A duration of 0 means "move
on at once": the transaction does not arm a timer for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Timer(Enum):
    """The transaction timers of RFC 3261 §17 (Timer C belongs to the proxy, §16.6)."""

    A = "A"  # INVITE client: request retransmission (unreliable only)
    B = "B"  # INVITE client: transaction timeout
    D = "D"  # INVITE client: wait for response retransmissions in Completed
    E = "E"  # non-INVITE client: request retransmission (unreliable only)
    F = "F"  # non-INVITE client: transaction timeout
    G = "G"  # INVITE server: final response retransmission (unreliable only)
    H = "H"  # INVITE server: wait for the ACK
    I = "I"  # noqa: E741 -- INVITE server: absorb ACK retransmissions in Confirmed
    J = "J"  # non-INVITE server: absorb request retransmissions in Completed
    K = "K"  # non-INVITE client: absorb response retransmissions in Completed


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1, T2, T4 and what RFC 3261 derives from them.

    ``timer_c`` is the proxy's INVITE timer (§16.6 step 11, "greater than 3 minutes");
    the transaction layer does not run it. ``timer_d_unreliable`` is Timer D on
    unreliable transports, "at least 32 seconds" (§17.1.1.2); tests may shorten it.
    """

    t1: float = 0.5  # RTT estimate
    t2: float = 4.0  # maximum retransmit interval for non-INVITE requests and INVITE responses
    t4: float = 5.0  # maximum time a message remains in the network
    timer_c: float = 180.0
    timer_d_unreliable: float = 32.0

    def __post_init__(self) -> None:
        if not (self.t1 > 0 and self.t2 > 0 and self.t4 > 0):
            raise ValueError("T1, T2 and T4 must be positive")
        if self.t1 > self.t2:
            raise ValueError("T1 must not exceed T2")
        if self.timer_c <= 0 or self.timer_d_unreliable < 0:
            raise ValueError("Timer C must be positive and Timer D not negative")

    # --- INVITE client (§17.1.1.2) ---------------------------------------------------------
    @property
    def timer_a(self) -> float:
        """Initial INVITE retransmit interval; it doubles after every firing, uncapped."""
        return self.t1

    @property
    def timer_b(self) -> float:
        return 64 * self.t1

    def timer_d(self, reliable: bool) -> float:
        return 0.0 if reliable else self.timer_d_unreliable

    # --- non-INVITE client (§17.1.2.2) -----------------------------------------------------
    @property
    def timer_e(self) -> float:
        """Initial retransmit interval; it doubles up to T2 (and is T2 in Proceeding)."""
        return self.t1

    @property
    def timer_f(self) -> float:
        return 64 * self.t1

    def timer_k(self, reliable: bool) -> float:
        return 0.0 if reliable else self.t4

    # --- INVITE server (§17.2.1) -----------------------------------------------------------
    @property
    def timer_g(self) -> float:
        """Initial final-response retransmit interval; it doubles up to T2."""
        return self.t1

    @property
    def timer_h(self) -> float:
        return 64 * self.t1

    def timer_i(self, reliable: bool) -> float:
        return 0.0 if reliable else self.t4

    # --- non-INVITE server (§17.2.2) -------------------------------------------------------
    def timer_j(self, reliable: bool) -> float:
        return 0.0 if reliable else 64 * self.t1

    def backoff(self, interval: float) -> float:
        """The next retransmit interval of Timers E and G: doubled, capped at T2."""
        return min(2 * interval, self.t2)
