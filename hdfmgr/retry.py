"""Retry schedule and the per-endpoint circuit breaker. Pure logic over ``now``.

Per file: exponential backoff with jitter, so that a thousand files that failed together do
not come back together. Per endpoint: after ``threshold`` transport failures in a row the
breaker opens, nothing is dispatched, and one cheap probe (the remote command running
``true``) decides when full dispatch resumes. A network outage of an hour thus costs one probe
per backoff step instead of one failed transfer per file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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


# ---------------------------------------------------------------------- batches and the link
#
# A failed batch says little about its files. The transfer tool's exit status, ssh's 255, a
# timeout, a reset connection: none of them names a file, and on a flaky link they strike
# batches at random. So the files of a batch that failed for such a reason are retried
# together, as one group, on the endpoint's backoff (its failures in a row, reset by any
# success), not each on a backoff of its own (which turned one batch into as many batches as
# it had files, each waiting longer after every unlucky try). Only when the same group keeps
# failing while other batches get through is the link too unlikely an explanation: then the
# group is split in two, and the half that fails again is split again (bisection), until a
# file is pinned down: it fails on its own.


@dataclass
class LinkHealth:
    """The endpoint's recent record: how often batches failed for reasons of the link."""

    window: int = 50
    outcomes: list[bool] = field(default_factory=list)  # recent batches, True: got through
    failures_in_a_row: int = 0
    successes: int = 0  # batches that got through, ever (a group remembers where it stood)

    def record(self, ok: bool, *, first_try: bool = True) -> None:
        """A batch got through (``ok``) or failed for a reason that names no file.

        Only first tries sample the link: a group that is tried again is there because it
        failed before, and a file that breaks every batch it rides in would make the link
        look as bad as the file is.
        """
        if first_try:
            self.outcomes.append(ok)
            if len(self.outcomes) > self.window:
                del self.outcomes[0]
        if ok:
            self.failures_in_a_row = 0
            self.successes += 1
        else:
            self.failures_in_a_row += 1

    def failure_rate(self) -> float:
        """The chance a batch fails through no fault of its files, as the window shows it
        (with one failure and one success assumed beyond it: no evidence is no certainty)."""
        failed = sum(1 for ok in self.outcomes if not ok)
        return (failed + 1) / (len(self.outcomes) + 2)

    def delay(self, *, initial: float, maximum: float, jitter: float) -> float:
        """How long a group waits before its next try: the endpoint's backoff."""
        return backoff(max(self.failures_in_a_row, 1), initial=initial, maximum=maximum, jitter=jitter)


#: How unlikely a group's failures in a row must be on the link's record alone before they
#: are pinned on its files. It is a chance per group, and a visit is many groups at once (189
#: files in batches of 10 are 19, more when they arrive in small batches): at 1 in 100, a link
#: dropping 2 calls in 3 pinned a good file of a 189-file visit after 11 failures in a row in
#: 1 run of 6 of tests/test_flaky.py, and it missed the visit's 30 s. At 1 in 1000 such a group
#: needs 18 failures in a row (a chance of 7 in 10,000 each), while a healthy link still
#: isolates a file after 2.
DOUBT = 0.001


def failures_to_isolate(failure_rate: float, *, doubt: float = DOUBT, least: int = 2) -> int:
    """Failures in a row of one group after which the link alone is too unlikely a cause:
    ``failure_rate ** n < doubt``. On a healthy link that is 2; on one that drops 2 calls
    in 3 it is 18."""
    if failure_rate <= 0.0:
        return least
    if failure_rate >= 1.0:
        return 1 << 30
    return max(least, math.ceil(math.log(doubt) / math.log(failure_rate)))


@dataclass
class RetryGroup:
    """Files retried together: a failed batch, or a half of a group that kept failing."""

    rels: list[str]
    failures: int = 0  # failures in a row of this group (or of the group it is a half of)
    successes_at_start: int = 0  # LinkHealth.successes when its first failure was noted

    def alone(self) -> bool:
        return len(self.rels) == 1


def after_failure(group: RetryGroup, health: LinkHealth) -> list[RetryGroup]:
    """The groups to retry after ``group`` failed again for a reason that names no file.

    The group whole, as long as the link explains its failures; else its two halves (each
    carrying the evidence so far, so that the half that fails again is split at once). A
    group of one is returned as it is: :func:`pinned` says whether the file fails alone.
    """
    group.failures += 1
    if len(group.rels) < 2 or not _evident(group, health):
        return [group]
    middle = len(group.rels) // 2
    return [
        RetryGroup(group.rels[:middle], group.failures, group.successes_at_start),
        RetryGroup(group.rels[middle:], group.failures, group.successes_at_start),
    ]


def pinned(group: RetryGroup, health: LinkHealth) -> bool:
    """True when a group of one file has failed too often, while others got through, for
    the link to be the cause: the file fails on its own. Ask it of the group that failed
    (the one :func:`after_failure` was given), never of a half just split off."""
    return group.alone() and _evident(group, health)


def _evident(group: RetryGroup, health: LinkHealth) -> bool:
    others_got_through = health.successes > group.successes_at_start
    return others_got_through and group.failures >= failures_to_isolate(health.failure_rate())
