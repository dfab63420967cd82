"""When is a file in the buffer ready to ship? Pure logic over ``(path, now)``.

A file must never leave half-written. The evidence differs by source:

* a close-write or a move into the buffer says the writer is done: the file is ready once no
  further event touched it for ``settle`` seconds and a fresh stat agrees with the last one;
* a creation says a writer has the file open: wait for its close, and only if none arrives
  within ``open_grace`` (a lost event) fall back to the rule for files seen without events;
* a file found by a scan or the polling observer carries no evidence at all: it is ready when
  the daemon's own stats have agreed for ``stable_age`` seconds (by its clock: an mtime can be
  old while a writer is still at the file, from a file server's clock or a copier that keeps
  times) and its mtime is at least ``stable_age`` old as well.

Where the kernel can say whether anyone holds the file open for writing (a read lease can be
taken only when no one does), the caller passes that as ``writing`` and it decides instead of
the timing rules: an unchanged stat and no writer means ready, a writer means wait. Without
that answer and without a close event, nothing tells a finished file from a writer pausing
longer than ``stable_age``: that setting is the longest pause a writer may make.

No clock is read here and no file is touched: the caller passes ``now`` and the stats.

State owned: the settle tracker: what each event and stat said about files not registered yet
(owned, through it, by :mod:`hdfmgr.watch`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from enum import Enum

#: How often a file that a writer still holds open is looked at again.
WRITER_RECHECK = 0.25

#: ``_Pending.due`` of a path that :meth:`SettleTracker.pop_due` handed out and nobody decided yet.
_HANDED_OUT = -math.inf


class Evidence(Enum):
    CLOSED = "closed"  # close-write or moved in: the writer is done
    OPENED = "opened"  # created: a writer probably still has it open
    SEEN = "seen"  # found by a scan or a polling observer: nothing known


class Verdict(Enum):
    READY = "ready"
    WAIT = "wait"
    GONE = "gone"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The parts of a stat that change while a file is written."""

    size: int
    mtime_ns: int
    inode: int


@dataclass(slots=True)
class _Pending:
    evidence: Evidence
    since: float
    due: float
    snapshot: Snapshot | None
    #: When the daemon first saw the current ``snapshot``: the file has been quiet since.
    quiet_since: float


class SettleTracker:
    """Tracks files that were touched and decides when each is quiet enough to ship."""

    def __init__(self, *, settle: float, stable_age: float, open_grace: float) -> None:
        self.settle = settle
        self.stable_age = stable_age
        self.open_grace = open_grace
        self._pending: dict[str, _Pending] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, rel: str) -> bool:
        return rel in self._pending

    def note(self, rel: str, evidence: Evidence, now: float, snapshot: Snapshot | None = None) -> None:
        """Record that an event (or a scan) touched ``rel`` at ``now``."""
        entry = self._pending.get(rel)
        if entry is None:
            due = now + (max(self.open_grace, self.settle) if evidence is Evidence.OPENED else self.settle)
            self._pending[rel] = _Pending(evidence, now, due, snapshot, now)
            heapq.heappush(self._heap, (due, rel))
            return
        if entry.evidence is Evidence.CLOSED and evidence is not Evidence.CLOSED:
            # A scan or a late creation event does not weaken a close: it restarts the quiet time.
            evidence = Evidence.CLOSED
        elif entry.evidence is Evidence.OPENED and evidence is not Evidence.CLOSED:
            # Still waiting for the writer's close; a scan passing by proves nothing.
            self._restat(entry, snapshot, now)
            if entry.due == _HANDED_OUT:  # popped but not checked: it must stay scheduled
                self._reschedule(entry, rel, max(now, entry.since + max(self.open_grace, self.settle)))
            return
        entry.evidence = evidence
        entry.since = now
        entry.due = now + self.settle
        self._restat(entry, snapshot, now)
        heapq.heappush(self._heap, (entry.due, rel))

    @staticmethod
    def _restat(entry: _Pending, snapshot: Snapshot | None, now: float) -> None:
        if snapshot is not None and snapshot != entry.snapshot:
            entry.snapshot = snapshot
            entry.quiet_since = now

    def forget(self, rel: str) -> None:
        self._pending.pop(rel, None)

    def next_due(self) -> float | None:
        """The earliest time at which :meth:`pop_due` may return something."""
        while self._heap:
            due, rel = self._heap[0]
            entry = self._pending.get(rel)
            if entry is not None and entry.due == due:
                return due
            heapq.heappop(self._heap)
        return None

    def pop_due(self, now: float, limit: int | None = None) -> list[str]:
        """Paths whose quiet time has passed; the caller stats each and calls :meth:`check`.

        At most ``limit`` of them, oldest deadline first; the rest stay due.
        """
        out: list[str] = []
        while self._heap and self._heap[0][0] <= now and (limit is None or len(out) < limit):
            due, rel = heapq.heappop(self._heap)
            entry = self._pending.get(rel)
            if entry is not None and entry.due == due:
                entry.due = _HANDED_OUT  # a duplicate heap item for the same deadline is stale now
                out.append(rel)
        return out

    def check(
        self, rel: str, snapshot: Snapshot | None, now: float, wall: float, *, writing: bool | None = None
    ) -> Verdict:
        """Decide with a fresh stat taken at ``now`` (``wall`` is the same instant as epoch).

        ``writing`` says whether some process has the file open for writing (True/False), or
        None when that cannot be known (no lease support, a network filesystem). A known
        answer replaces the guesswork: no writer and an unchanged stat means ready.
        """
        entry = self._pending.get(rel)
        if entry is None:
            return Verdict.GONE
        if snapshot is None:
            del self._pending[rel]
            return Verdict.GONE
        unchanged = entry.snapshot == snapshot
        if not unchanged:
            entry.snapshot = snapshot
            entry.quiet_since = now
        if writing:
            self._reschedule(entry, rel, now + max(self.settle, WRITER_RECHECK))
            return Verdict.WAIT
        if writing is False and entry.evidence is not Evidence.CLOSED:
            if unchanged:
                del self._pending[rel]
                return Verdict.READY
            self._reschedule(entry, rel, now + self.settle)
            return Verdict.WAIT
        if entry.evidence is Evidence.OPENED:
            if now - entry.since < self.open_grace:
                self._reschedule(entry, rel, entry.since + self.open_grace)
                return Verdict.WAIT
            entry.evidence = Evidence.SEEN  # the close event never came: judge by stats alone
            unchanged = False
        if entry.evidence is Evidence.CLOSED:
            if unchanged:
                del self._pending[rel]
                return Verdict.READY
            self._reschedule(entry, rel, now + self.settle)
            return Verdict.WAIT
        age = wall - snapshot.mtime_ns / 1e9
        quiet = now - entry.quiet_since
        if unchanged and age >= self.stable_age and quiet >= self.stable_age:
            del self._pending[rel]
            return Verdict.READY
        if unchanged:
            wait = max(self.settle, self.stable_age - age, self.stable_age - quiet)
        else:
            wait = max(self.settle, 0.05)
        self._reschedule(entry, rel, now + min(wait, max(self.stable_age, self.settle)))
        return Verdict.WAIT

    def _reschedule(self, entry: _Pending, rel: str, due: float) -> None:
        entry.due = due
        heapq.heappush(self._heap, (due, rel))
