"""The scheduler: what goes out next, and when. Pure logic over ``now`` (no I/O, no clock).

State owned: the ready queue, the per-file retry heap, the groups of files retried together
after a failure that named none of them (with their heap and the batch each one rides in),
the endpoint's link record and its circuit breaker. The file table says what state a file is
in; the scheduler only says when a file, or a group, may be tried: so it is tested with a fake
clock, without sleeping (``tests/test_schedule.py``).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .batching import Candidate, ReadyQueue
from .retry import CircuitBreaker, LinkHealth, RetryGroup, after_failure, backoff, pinned


@dataclass(frozen=True)
class Pending:
    """What keeps a one-shot rescan from ending, besides files ready or settling."""

    in_flight: int = 0  # batches
    settling: int = 0  # files
    in_doubt: bool = False  # files whose commit may have run, not listed yet
    sweeping: bool = False


class Scheduler:
    """Ready files, retries and the breaker of one endpoint."""

    def __init__(
        self,
        *,
        retry_initial: float,
        retry_max: float,
        breaker_threshold: int,
        once: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.once = once
        self.rng = rng or random.Random()
        self.ready = ReadyQueue()
        self.retry_heap: list[tuple[float, str]] = []
        self.health = LinkHealth()
        self.breaker = CircuitBreaker(threshold=breaker_threshold, initial=retry_initial, maximum=retry_max)
        #: Groups retried whole: group id -> group, (due, group id), the groups due now, and
        #: the group each batch in flight carries.
        self.groups: dict[int, RetryGroup] = {}
        self.group_heap: list[tuple[float, int]] = []
        self.due_groups: deque[int] = deque()
        self.batch_group: dict[int, int] = {}
        self._group_ids = 0
        #: Groups and new batches take turns: files that keep failing never starve the ones
        #: not yet tried, and a retried group never waits behind a backlog.
        self._group_turn = True

    # ------------------------------------------------------------------ files

    def enqueue(self, rel: str, size: int, since: float) -> None:
        self.ready.add(Candidate(rel, size, since))

    def backoff(self, attempts: int) -> float:
        """A file's own delay before its next try."""
        return backoff(attempts, initial=self.retry_initial, maximum=self.retry_max, jitter=self.rng.random())

    def retry_at(self, rel: str, due: float) -> None:
        heapq.heappush(self.retry_heap, (due, rel))

    def load_retries(self, retries: Iterable[tuple[float, str]]) -> None:
        self.retry_heap.extend(retries)
        heapq.heapify(self.retry_heap)

    def release(self, now: float, still_failed: Callable[[str], bool]) -> list[str]:
        """Files and groups due again. The files come back (for the caller to enqueue) in
        line from the moment they are due, behind files that were ready before; a rescan
        never retries (the next run does), so it drops them all."""
        while self.group_heap and self.group_heap[0][0] <= now:
            self.due_groups.append(heapq.heappop(self.group_heap)[1])
        due: list[str] = []
        while self.retry_heap and (self.retry_heap[0][0] <= now or self.once):
            _, rel = heapq.heappop(self.retry_heap)
            if not self.once and still_failed(rel):
                due.append(rel)
        return due

    # ------------------------------------------------------------------ groups

    def next_is_group(self) -> bool:
        """Whether the next dispatch is a group retried whole (else a new batch)."""
        if self.due_groups and (self._group_turn or not len(self.ready)):
            self._group_turn = False
            return True
        self._group_turn = True
        return False

    def take_group(self) -> tuple[int, RetryGroup]:
        group_id = self.due_groups.popleft()
        return group_id, self.groups[group_id]

    def drop_group(self, group_id: int) -> None:
        del self.groups[group_id]

    def rides(self, batch_id: int, group_id: int) -> None:
        self.batch_group[batch_id] = group_id

    def landed(self, batch_id: int) -> RetryGroup | None:
        """The group a finished batch carried (None: a first try)."""
        group_id = self.batch_group.pop(batch_id, None)
        return self.groups.pop(group_id, None) if group_id is not None else None

    def regroup(
        self, group: RetryGroup | None, rels: list[str]
    ) -> tuple[float, list[tuple[RetryGroup, bool]]]:
        """Files a batch failed for a reason that names none of them: the endpoint's delay,
        and the pieces to retry, each with whether it is one file now pinned as failing on
        its own (split only when the link no longer explains their failures)."""
        if group is None:
            group = RetryGroup(rels, successes_at_start=self.health.successes)
        else:
            group.rels = rels
        delay = self.health.delay(
            initial=self.retry_initial, maximum=self.retry_max, jitter=self.rng.random()
        )
        return delay, [
            (piece, piece is group and pinned(piece, self.health))
            for piece in after_failure(group, self.health)
        ]

    def add_group(self, group: RetryGroup, due: float) -> None:
        self._group_ids += 1
        self.groups[self._group_ids] = group
        heapq.heappush(self.group_heap, (due, self._group_ids))

    # ------------------------------------------------------------------ endpoint

    def endpoint_back(self, now: float) -> None:
        """After an outage, files that backed off because of it go out now, not in 10 min."""
        self.retry_heap = [(min(due, now), rel) for due, rel in self.retry_heap]
        heapq.heapify(self.retry_heap)
        self.group_heap = [(min(due, now), group) for due, group in self.group_heap]
        heapq.heapify(self.group_heap)

    def may_dispatch(self) -> bool:
        return bool(len(self.ready) or self.due_groups) and self.breaker.allows_dispatch()

    def deadlines(self) -> list[float]:
        """When something of the scheduler's is due: the loop sleeps until the first."""
        out: list[float] = []
        if self.retry_heap and not self.once:
            out.append(self.retry_heap[0][0])
        if self.group_heap:
            out.append(self.group_heap[0][0])
        if self.breaker.state.value == "open":
            out.append(self.breaker.probe_at)
        return out

    def drained(self, pending: Pending) -> bool:
        """A one-shot rescan is over: nothing ready, settling, in flight or in doubt. Files
        left failed or quarantined then make it incomplete, not endless."""
        return not (
            pending.in_flight or len(self.ready) or pending.settling or pending.in_doubt or pending.sweeping
        )
