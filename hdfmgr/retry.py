"""Retry schedule and the per-endpoint circuit breaker. Pure logic over ``now``.

Per file: exponential backoff with jitter, so that a thousand files that failed together do
not come back together. Per endpoint: after ``threshold`` transport failures in a row the
breaker opens, nothing is dispatched, and one cheap probe (the remote command running
``true``) decides when full dispatch resumes. A network outage of an hour thus costs one probe
per backoff step instead of one failed transfer per file.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


def backoff(attempts: int, *, initial: float, maximum: float, jitter: float) -> float:
    """Delay before try ``attempts + 1``; ``jitter`` in [0, 1) spreads it over [50 %, 100 %]."""
    exponent = min(max(attempts - 1, 0), 60)
    base = min(maximum, initial * (2.0**exponent))
    return base * (0.5 + 0.5 * jitter)


class BreakerState(Enum):
    CLOSED = "closed"  # dispatch freely
    OPEN = "open"  # endpoint unreachable: wait, then probe
    PROBING = "probing"  # one probe in flight


@dataclass
class CircuitBreaker:
    threshold: int
    initial: float
    maximum: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    probes_failed: int = 0
    probe_at: float = 0.0
    opened_at: float | None = None

    def allows_dispatch(self) -> bool:
        return self.state is BreakerState.CLOSED

    def record_success(self) -> bool:
        """Note a success; True when this closes an open breaker (log "reachable again")."""
        was_open = self.state is not BreakerState.CLOSED
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probes_failed = 0
        self.opened_at = None
        return was_open

    def record_transport_failure(self, now: float, *, jitter: float = 0.0) -> bool:
        """Note a transport failure; True when this opens the breaker (log "unreachable")."""
        self.failures += 1
        if self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.probe_at = now + backoff(1, initial=self.initial, maximum=self.maximum, jitter=jitter)
            return True
        return False

    def probe_due(self, now: float) -> bool:
        return self.state is BreakerState.OPEN and now >= self.probe_at

    def start_probe(self) -> None:
        self.state = BreakerState.PROBING

    def probe_failed(self, now: float, *, jitter: float = 0.0) -> None:
        self.probes_failed += 1
        self.state = BreakerState.OPEN
        self.probe_at = now + backoff(
            self.probes_failed + 1, initial=self.initial, maximum=self.maximum, jitter=jitter
        )
