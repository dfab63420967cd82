"""Unit tests for hdfmgr.settle: when is a file quiet enough to ship? A fake clock, no sleeping.

``now`` is the monotonic clock the tracker schedules with; ``wall`` is the same instant as epoch
seconds, which the tracker compares with the files' mtimes. They differ on purpose here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from hdfmgr.settle import Evidence, SettleTracker, Snapshot, Verdict

SETTLE = 0.1
STABLE_AGE = 2.0
OPEN_GRACE = 5.0
EPOCH = 1_700_000_000  # wall = EPOCH + now
#: Float slack for comparing fake-clock times (epoch seconds carry ~0.2 microsecond of precision).
EPS = 1e-6


def wall(now: float) -> float:
    return EPOCH + now


def snap(size: int, written_at: float, inode: int = 7) -> Snapshot:
    """A stat of a file last written at monotonic time ``written_at``."""
    return Snapshot(size=size, mtime_ns=EPOCH * 10**9 + round(written_at * 1e9), inode=inode)


@pytest.fixture
def tracker() -> SettleTracker:
    return SettleTracker(settle=SETTLE, stable_age=STABLE_AGE, open_grace=OPEN_GRACE)


def check(t: SettleTracker, rel: str, s: Snapshot | None, now: float) -> Verdict:
    return t.check(rel, s, now, wall(now))


# --------------------------------------------------------------------------- CLOSED


def test_closed_is_ready_after_settle_when_unchanged(tracker: SettleTracker) -> None:
    s = snap(100, written_at=0.0)  # written this instant: no age needed after a close
    tracker.note("a", Evidence.CLOSED, 0.0, s)
    assert "a" in tracker and len(tracker) == 1
    assert tracker.next_due() == pytest.approx(SETTLE)
    assert tracker.pop_due(SETTLE / 2) == []
    assert tracker.pop_due(SETTLE) == ["a"]
    assert check(tracker, "a", s, SETTLE) is Verdict.READY
    assert "a" not in tracker and len(tracker) == 0
    assert tracker.next_due() is None


def test_closed_changed_stat_rearms(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0, snap(100, 0.0))
    grown = snap(200, 0.05)
    assert check(tracker, "a", grown, SETTLE) is Verdict.WAIT
    assert "a" in tracker
    assert tracker.next_due() == pytest.approx(2 * SETTLE)
    assert tracker.pop_due(2 * SETTLE - 0.01) == []
    assert tracker.pop_due(2 * SETTLE) == ["a"]
    assert check(tracker, "a", grown, 2 * SETTLE) is Verdict.READY


@pytest.mark.parametrize(
    "changed",
    [
        Snapshot(size=101, mtime_ns=EPOCH * 10**9, inode=7),
        Snapshot(size=100, mtime_ns=EPOCH * 10**9 + 1, inode=7),
        Snapshot(size=100, mtime_ns=EPOCH * 10**9, inode=8),
    ],
    ids=["size", "mtime", "inode"],
)
def test_any_stat_change_rearms(tracker: SettleTracker, changed: Snapshot) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0, snap(100, 0.0))
    assert check(tracker, "a", changed, SETTLE) is Verdict.WAIT


def test_closed_without_a_first_stat_needs_two_agreeing_stats(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0)
    s = snap(100, 0.0)
    assert check(tracker, "a", s, SETTLE) is Verdict.WAIT
    assert check(tracker, "a", s, 2 * SETTLE) is Verdict.READY


def test_a_new_event_restarts_the_quiet_time(tracker: SettleTracker) -> None:
    s = snap(100, 0.0)
    tracker.note("a", Evidence.CLOSED, 0.0, s)
    tracker.note("a", Evidence.CLOSED, 0.08, s)  # closed again (a writer that reopens)
    assert tracker.next_due() == pytest.approx(0.08 + SETTLE)
    assert tracker.pop_due(SETTLE) == []  # the first deadline no longer counts
    assert tracker.pop_due(0.08 + SETTLE) == ["a"]


def test_a_path_is_due_once_even_if_noted_twice_at_one_instant(tracker: SettleTracker) -> None:
    s = snap(100, 0.0)
    tracker.note("a", Evidence.CLOSED, 0.0, s)
    tracker.note("a", Evidence.CLOSED, 0.0, s)  # two events handled with one clock reading
    assert tracker.pop_due(1.0) == ["a"]
    assert check(tracker, "a", s, 1.0) is Verdict.READY


# --------------------------------------------------------------------------- OPENED


def test_opened_waits_for_the_close(tracker: SettleTracker) -> None:
    old = snap(100, -100.0)  # even an old, unchanged file: a writer has it open
    tracker.note("a", Evidence.OPENED, 0.0, old)
    assert tracker.next_due() == pytest.approx(OPEN_GRACE)
    assert tracker.pop_due(OPEN_GRACE - 0.01) == []
    # a caller that looks early is told to wait until the grace ends
    assert check(tracker, "a", old, 1.0) is Verdict.WAIT
    assert tracker.next_due() == pytest.approx(OPEN_GRACE)
    # the close arrives: from now on the CLOSED rule applies
    tracker.note("a", Evidence.CLOSED, 2.0, old)
    assert tracker.next_due() == pytest.approx(2.0 + SETTLE)
    assert tracker.pop_due(2.0 + SETTLE) == ["a"]
    assert check(tracker, "a", old, 2.0 + SETTLE) is Verdict.READY


def test_opened_without_a_close_falls_back_to_seen(tracker: SettleTracker) -> None:
    s = snap(100, -100.0)
    tracker.note("a", Evidence.OPENED, 0.0, s)
    assert tracker.pop_due(OPEN_GRACE) == ["a"]
    # the grace is over: judged by stats alone, which needs one more look
    assert check(tracker, "a", s, OPEN_GRACE) is Verdict.WAIT
    due = tracker.next_due()
    assert due is not None and OPEN_GRACE < due <= OPEN_GRACE + STABLE_AGE
    assert tracker.pop_due(due) == ["a"]
    assert check(tracker, "a", s, due) is Verdict.READY


def test_opened_after_grace_still_needs_stable_age(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.OPENED, 0.0, snap(100, 0.0))
    written = OPEN_GRACE - 0.5  # the writer wrote shortly before the grace ended
    s = snap(150, written)
    assert check(tracker, "a", s, OPEN_GRACE) is Verdict.WAIT
    now = OPEN_GRACE
    while True:
        due = tracker.next_due()
        assert due is not None and due > now
        now = due
        verdict = check(tracker, "a", s, now)
        if verdict is Verdict.READY:
            break
        assert verdict is Verdict.WAIT
    assert now - written >= STABLE_AGE - EPS


def test_opened_with_settle_longer_than_grace() -> None:
    t = SettleTracker(settle=3.0, stable_age=0.0, open_grace=1.0)
    t.note("a", Evidence.OPENED, 0.0)
    assert t.next_due() == pytest.approx(3.0)


# --------------------------------------------------------------------------- SEEN


def test_seen_old_and_unchanged_is_ready_after_a_quiet_period_of_its_own(tracker: SettleTracker) -> None:
    """An old mtime alone proves nothing (a file server's clock, a copier that keeps times, a
    daemon started while a slow writer pauses): the daemon's own stats must agree for
    ``stable_age`` seconds."""
    s = snap(100, -10.0)
    tracker.note("a", Evidence.SEEN, 0.0, s)
    assert tracker.next_due() == pytest.approx(SETTLE)
    assert check(tracker, "a", s, SETTLE) is Verdict.WAIT
    assert tracker.next_due() == pytest.approx(STABLE_AGE)
    assert check(tracker, "a", s, STABLE_AGE) is Verdict.READY


def test_a_writer_keeping_an_old_mtime_is_not_ready_while_it_writes(tracker: SettleTracker) -> None:
    """Found at start with an mtime an hour old, yet growing between the daemon's looks."""
    mtime = snap(0, -3600.0).mtime_ns

    def stat(now: float) -> Snapshot:  # appends 1000 bytes every 1.5 s (under stable_age)
        return Snapshot(1000 * (1 + math.floor(now / 1.5)), mtime, 7)

    tracker.note("a", Evidence.SEEN, 0.0, stat(0.0))
    now = 0.0
    while now < 30.0:
        due = tracker.next_due()
        assert due is not None and due >= now
        now = due
        assert tracker.pop_due(now) == ["a"]
        assert check(tracker, "a", stat(now), now) is Verdict.WAIT, f"ready at {now} while growing"


def test_seen_needs_stable_age(tracker: SettleTracker) -> None:
    s = snap(100, -0.5)  # written half a second before the scan
    tracker.note("a", Evidence.SEEN, 0.0, s)
    assert check(tracker, "a", s, SETTLE) is Verdict.WAIT
    due = tracker.next_due()
    assert due is not None
    # the next look is when the file will have been quiet for stable_age by the daemon's clock
    # (its mtime is stable_age old by then too), not one settle later
    assert due == pytest.approx(STABLE_AGE)
    assert check(tracker, "a", s, due) is Verdict.READY


def test_seen_needs_an_unchanged_stat_even_when_old(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.SEEN, 0.0, snap(100, -10.0))
    # same old mtime, different size: someone truncated or wrote without touching mtime
    assert check(tracker, "a", Snapshot(50, snap(100, -10.0).mtime_ns, 7), SETTLE) is Verdict.WAIT
    assert "a" in tracker


def test_seen_without_a_first_stat(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.SEEN, 0.0)
    s = snap(100, -10.0)
    assert check(tracker, "a", s, SETTLE) is Verdict.WAIT
    now = SETTLE
    while True:
        due = tracker.next_due()
        assert due is not None and due > now
        now = due
        if check(tracker, "a", s, now) is Verdict.READY:
            break
    assert SETTLE + STABLE_AGE - EPS <= now <= SETTLE + STABLE_AGE + SETTLE


def test_seen_with_mtime_in_the_future_waits(tracker: SettleTracker) -> None:
    """A clock skewed writer (NFS) gives a negative age: never ready until it is old enough."""
    s = snap(100, 60.0)
    tracker.note("a", Evidence.SEEN, 0.0, s)
    now = SETTLE
    assert check(tracker, "a", s, now) is Verdict.WAIT
    for _ in range(1000):
        due = tracker.next_due()
        assert due is not None and due > now
        now = due
        if check(tracker, "a", s, now) is Verdict.READY:
            break
    assert now >= 60.0 + STABLE_AGE - EPS


# --------------------------------------------------------------------------- scans do not weaken


def test_scan_does_not_weaken_closed(tracker: SettleTracker) -> None:
    young = snap(100, 0.0)
    tracker.note("a", Evidence.CLOSED, 0.0, young)
    tracker.note("a", Evidence.SEEN, 0.05, young)
    assert tracker.next_due() == pytest.approx(0.05 + SETTLE)
    # still the CLOSED rule: no stable_age wait for a young mtime
    assert check(tracker, "a", young, 0.05 + SETTLE) is Verdict.READY


def test_scan_does_not_weaken_opened(tracker: SettleTracker) -> None:
    old = snap(100, -100.0)
    tracker.note("a", Evidence.OPENED, 0.0, old)
    tracker.note("a", Evidence.SEEN, 1.0, old)
    assert tracker.next_due() == pytest.approx(OPEN_GRACE)
    assert tracker.pop_due(1.0 + SETTLE) == []
    assert check(tracker, "a", old, 1.0 + SETTLE) is Verdict.WAIT


def test_an_opened_file_noted_after_its_deadline_stays_scheduled(tracker: SettleTracker) -> None:
    """The pipeline's way to look again later: pop a path, then note it instead of checking it.

    A file whose close never came must not be left pending without a deadline: nothing would
    ever look at it again, and a rescan skips paths the tracker already holds.
    """
    old = snap(100, -100.0)
    tracker.note("a", Evidence.OPENED, 0.0, old)
    assert tracker.pop_due(OPEN_GRACE) == ["a"]
    tracker.note("a", Evidence.SEEN, OPEN_GRACE + 1.0, old)  # "busy now, look again in a second"
    assert tracker.next_due() == pytest.approx(OPEN_GRACE + 1.0)
    assert tracker.pop_due(OPEN_GRACE + 1.0) == ["a"]
    assert check(tracker, "a", old, OPEN_GRACE + 1.0) is Verdict.WAIT  # now judged as SEEN
    due = tracker.next_due()
    assert due is not None
    assert check(tracker, "a", old, due) is Verdict.READY


def test_scan_snapshot_is_kept_for_an_opened_file(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.OPENED, 0.0)
    s = snap(100, -100.0)
    tracker.note("a", Evidence.SEEN, 1.0, s)
    tracker.note("a", Evidence.CLOSED, 2.0)
    # the scan's stat is the baseline the close is compared with
    assert check(tracker, "a", s, 2.0 + SETTLE) is Verdict.READY


def test_seen_is_upgraded_by_a_close(tracker: SettleTracker) -> None:
    young = snap(100, 0.0)
    tracker.note("a", Evidence.SEEN, 0.0, young)
    tracker.note("a", Evidence.CLOSED, 0.02, young)
    assert check(tracker, "a", young, 0.02 + SETTLE) is Verdict.READY


# --------------------------------------------------------------------------- bookkeeping


def test_forget(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0, snap(1, 0.0))
    tracker.note("b", Evidence.CLOSED, 0.5, snap(1, 0.0))
    tracker.forget("a")
    tracker.forget("never-noted")
    assert "a" not in tracker and len(tracker) == 1
    assert tracker.next_due() == pytest.approx(0.5 + SETTLE)
    assert tracker.pop_due(10.0) == ["b"]
    assert check(tracker, "a", snap(1, 0.0), 10.0) is Verdict.GONE


def test_next_due_is_the_earliest_live_deadline(tracker: SettleTracker) -> None:
    assert tracker.next_due() is None
    tracker.note("late", Evidence.OPENED, 0.0)
    tracker.note("early", Evidence.CLOSED, 1.0)
    tracker.note("middle", Evidence.SEEN, 2.0)
    assert tracker.next_due() == pytest.approx(1.0 + SETTLE)
    tracker.forget("early")
    assert tracker.next_due() == pytest.approx(2.0 + SETTLE)
    tracker.note("middle", Evidence.SEEN, 3.0)  # re-noted: its old deadline is stale
    assert tracker.next_due() == pytest.approx(3.0 + SETTLE)
    assert tracker.pop_due(4.0) == ["middle"]
    assert tracker.next_due() == pytest.approx(OPEN_GRACE)


def test_pop_due_is_ordered_by_deadline(tracker: SettleTracker) -> None:
    for i, rel in enumerate(["c", "a", "b"]):
        tracker.note(rel, Evidence.CLOSED, i * 0.01)
    assert tracker.pop_due(1.0) == ["c", "a", "b"]
    assert tracker.pop_due(1.0) == []
    assert len(tracker) == 3  # popped but still pending until checked


def test_gone_when_the_file_vanished(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0, snap(1, 0.0))
    assert check(tracker, "a", None, SETTLE) is Verdict.GONE
    assert "a" not in tracker
    assert tracker.next_due() is None


def test_gone_for_an_unknown_path(tracker: SettleTracker) -> None:
    assert check(tracker, "nobody", snap(1, 0.0), 1.0) is Verdict.GONE


def test_files_are_independent(tracker: SettleTracker) -> None:
    tracker.note("a", Evidence.CLOSED, 0.0, snap(1, 0.0, inode=1))
    tracker.note("b", Evidence.SEEN, 0.0, snap(1, 0.0, inode=2))
    assert sorted(tracker.pop_due(SETTLE)) == ["a", "b"]
    assert check(tracker, "a", snap(1, 0.0, inode=1), SETTLE) is Verdict.READY
    assert check(tracker, "b", snap(1, 0.0, inode=2), SETTLE) is Verdict.WAIT


# --------------------------------------------------------------------------- slow writers


@dataclass
class SlowWriter:
    """Appends ``chunk`` bytes every ``interval`` seconds from ``start`` until ``stop``."""

    start: float
    stop: float
    interval: float
    chunk: int = 4096

    def appends_by(self, now: float) -> int:
        if now < self.start:
            return 0
        last = min(now, self.stop)
        return 1 + math.floor((last - self.start) / self.interval + 1e-9)

    def stat(self, now: float) -> Snapshot:
        n = self.appends_by(now)
        written_at = self.start + (n - 1) * self.interval
        return snap(n * self.chunk, written_at)


def drive(
    tracker: SettleTracker,
    writer: SlowWriter,
    first: Evidence,
    *,
    close_at: float | None = None,
    until: float = 120.0,
) -> float | None:
    """Run the caller's loop on a fake clock; return when the file became READY (or None)."""
    tracker.note("f", first, writer.start, writer.stat(writer.start))
    now = writer.start
    closed = close_at is None
    for _ in range(100_000):
        due = tracker.next_due()
        if due is None:
            return None
        if not closed and close_at <= due:  # type: ignore[operator]
            now = close_at  # type: ignore[assignment]
            tracker.note("f", Evidence.CLOSED, now, writer.stat(now))
            closed = True
            continue
        assert due >= now, "time went backwards"
        now = due
        if now > until:
            return None
        for rel in tracker.pop_due(now):
            verdict = check(tracker, rel, writer.stat(now), now)
            if verdict is Verdict.READY:
                return now
            assert verdict is Verdict.WAIT
    raise AssertionError("the tracker never settled the file")


@pytest.mark.parametrize("first", list(Evidence))
def test_slow_appender_growing_between_checks_is_never_ready(tracker: SettleTracker, first: Evidence) -> None:
    """Size grows between any two looks: not ready while it grows, whatever the evidence."""
    writer = SlowWriter(start=0.0, stop=30.0, interval=SETTLE / 4)
    ready_at = drive(tracker, writer, first)
    assert ready_at is not None, "the file must be shipped once the writer stops"
    assert ready_at > writer.stop
    bound = writer.stop + (STABLE_AGE if first is not Evidence.CLOSED else 0.0) + 3 * SETTLE
    if first is Evidence.OPENED:
        bound = max(bound, OPEN_GRACE + STABLE_AGE + 3 * SETTLE)
    assert ready_at <= bound


@pytest.mark.parametrize("first", [Evidence.OPENED, Evidence.SEEN])
@pytest.mark.parametrize("interval", [0.3, 1.0, 1.9])
def test_slow_appender_without_events_is_never_ready(
    tracker: SettleTracker, first: Evidence, interval: float
) -> None:
    """A writer pausing longer than ``settle`` (but under ``stable_age``) between appends.

    The quiet period is measured between the daemon's own looks, so the last write is noticed
    at the first look after it: ready at most two ``stable_age`` after it."""
    writer = SlowWriter(start=0.0, stop=20.0, interval=interval)
    ready_at = drive(tracker, writer, first)
    assert ready_at is not None
    last_write = writer.start + (writer.appends_by(writer.stop) - 1) * interval
    assert ready_at - last_write >= STABLE_AGE - EPS
    assert ready_at <= last_write + 2 * STABLE_AGE + 3 * SETTLE


def test_slow_appender_that_closes_at_the_end(tracker: SettleTracker) -> None:
    writer = SlowWriter(start=0.0, stop=10.0, interval=1.0)
    ready_at = drive(tracker, writer, Evidence.OPENED, close_at=10.0)
    assert ready_at is not None
    assert 10.0 < ready_at <= 10.0 + 2 * SETTLE


# --------------------------------------------------------------------------- writer known


def test_known_writer_always_waits(tracker: SettleTracker) -> None:
    s = snap(100, -100.0)
    tracker.note("a", Evidence.CLOSED, 0.0, s)
    assert tracker.check("a", s, SETTLE, wall(SETTLE), writing=True) is Verdict.WAIT
    assert "a" in tracker


def test_known_no_writer_and_unchanged_is_ready(tracker: SettleTracker) -> None:
    s = snap(100, 0.0)
    tracker.note("a", Evidence.OPENED, 0.0, s)
    assert tracker.check("a", s, SETTLE, wall(SETTLE), writing=False) is Verdict.READY


def test_pop_due_limit_hands_out_oldest_first_and_keeps_the_rest() -> None:
    tracker = SettleTracker(settle=0.1, stable_age=0.0, open_grace=1.0)
    for i in range(5):
        tracker.note(f"f{i}", Evidence.SEEN, float(i), Snapshot(1, 1, i))
    assert tracker.pop_due(10.0, limit=2) == ["f0", "f1"]
    assert tracker.next_due() == 2.1
    assert tracker.pop_due(10.0, limit=2) == ["f2", "f3"]
    assert tracker.pop_due(10.0) == ["f4"]
    assert tracker.pop_due(10.0) == []
