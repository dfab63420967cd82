"""What a batch's report, and a hold, do to the files: the rules, applied in one place.

State owned: none of a file's (the file table owns that; this module decides which transition
a report calls for), only what the log has already said (so that each warning is said once).
A batch's report says, file by file, what happened; here each outcome becomes a transition, a
retry (the file's own backoff, or its group's on the endpoint's), a quarantine, or a hold.

Holding has one path, used for every delivered file whoever moves it (the worker right after
its commit, or the loop for files a scan, a restart or a listing finds delivered):
:func:`hdfmgr.holding.hold_delivered`, which moves only the version that was sent and only
when no writer is at it; what it could not hold comes back here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from .config import Config
from .deliver import CHANGED, CHANGED_AFTER, UNREADABLE, UNVERIFIED, WAITING, BatchReport
from .detect import snapshot
from .endpoint import ErrorClass
from .files import BatchOutcome, FileTable, Known
from .holding import HoldError, hold_delivered
from .holding import Outcome as HoldOutcome
from .record import Failure
from .retry import RetryGroup
from .schedule import Scheduler
from .settle import Evidence
from .watch import Watcher

log = logging.getLogger("hdfmgr")


@dataclass
class Counters:
    delivered: int = 0
    bytes: int = 0
    failed: int = 0
    batches: int = 0


class Outcomes:
    """Batch reports and holds, applied to the file table and the scheduler."""

    def __init__(
        self, config: Config, files: FileTable, scheduler: Scheduler, watcher: Watcher, *, once: bool
    ) -> None:
        self.cfg = config
        self.files = files
        self.sched = scheduler
        self.watcher = watcher
        self.once = once
        self.buffer = os.fspath(config.buffer)
        self.holding = os.fspath(config.holding)
        self.counters = Counters()
        self.warned: set[str] = set()

    def enqueue(self, rels: list[str]) -> None:
        for rel in rels:
            known = self.files[rel]
            self.sched.enqueue(rel, known.size, known.since)

    # ------------------------------------------------------------------ a batch

    def batch(self, report: BatchReport) -> None:
        """Every file of a finished batch: delivered, failed (how, and when it goes again),
        quarantined, or in doubt (its reply was lost: the reconciliation decides)."""
        job = report.job
        now, wall = time.monotonic(), time.time()
        committed = report.committed()
        delivered, unknown = set(committed), set(report.unknown)
        failed = [f for f in job.files if f.rel not in delivered and f.rel not in unknown]
        failures: list[tuple[str, Failure]] = []
        unpinned: list[str] = []  # failed for a reason that names no file
        settle: list[str] = []  # changed while sent: settles again
        for f in failed:
            known = self.files[f.rel]
            outcome, error = report.outcomes.get(f.rel, ("failed", None))
            error_class = report.error_class or ErrorClass.REMOTE
            message = error or report.error or "failed"
            if outcome == UNREADABLE:
                # The file's own fault, and it was left out of the transfer: at once.
                failures.append((f.rel, Failure(known.id, outcome, message, ErrorClass.LOCAL, wall, True)))
                continue
            if outcome == CHANGED:
                error_class, delay = ErrorClass.LOCAL, 0.0
            elif outcome in (UNVERIFIED, WAITING):
                # The file's own outcome: its own backoff. An existing final name is never
                # quarantined: the file waits for the consumer to take the earlier version.
                error_class = ErrorClass.VERIFICATION if outcome == UNVERIFIED else ErrorClass.EXISTS
                delay = self.sched.backoff(known.attempts)
            elif not self.once:
                unpinned.append(f.rel)
                continue
            else:
                delay = 0.0  # a rescan does not retry; the next run does
            # A file that keeps failing verification needs an operator.
            quarantine = (
                error_class == ErrorClass.VERIFICATION and known.attempts >= self.cfg.quarantine_after
            )
            failures.append(
                (f.rel, Failure(known.id, outcome, message, error_class, wall + delay, quarantine))
            )
            if quarantine:
                continue
            if outcome == CHANGED:
                settle.append(f.rel)
            else:
                self.sched.retry_at(f.rel, now + delay)
        group = self.sched.landed(job.id)
        if report.transfers or report.commit is not None:
            # Only a batch that carried something over the link says how the link is: one
            # whose every file was unreadable never got that far.
            self.sched.health.record(not unpinned and not unknown, first_try=group is None)
        if unpinned:
            self._retry_together(report, group, unpinned, failures, now, wall)
        size = sum(self.files[rel].size for rel in committed)
        self.files.finish_batch(BatchOutcome(report, committed, failures), wall)
        for rel in settle:
            self._changed_while_sent(rel, now)
        self.after_worker(report)
        for rel, failure in failures:
            if failure.quarantine:
                log.error(
                    "%r quarantined after %d attempts (%s); it stays in the buffer: fix the cause, "
                    "then run 'hdfmgr retry'",
                    rel,
                    self.files[rel].attempts,
                    failure.error,
                )
        self.counters.batches += 1
        self.counters.failed += len(failed)
        if committed:
            self._delivered(report, committed, size, wall)

    def _changed_while_sent(self, rel: str, now: float) -> None:
        known = self.files[rel]
        current = snapshot(os.path.join(self.buffer, rel))
        if current is None or not known.matches(current):
            self.watcher.recheck(rel, now, current)  # gone, or a new version
        else:
            # Reported changed, yet the buffer holds the registered version (its pin went
            # away during the transfer, e.g. a purge of holding): settling again would find
            # nothing new, so it is retried, with backoff.
            self.sched.retry_at(rel, now + self.sched.backoff(known.attempts))

    def _delivered(self, report: BatchReport, committed: list[str], size: int, wall: float) -> None:
        self.counters.delivered += len(committed)
        self.counters.bytes += size
        directory = os.path.dirname(report.job.files[0].rel)
        log.info(
            "batch %d: delivered %d file(s), %.1f MB in %.2f s%s",
            report.job.id,
            len(committed),
            size / 1e6,
            wall - report.started,
            f" from {directory}/" if directory else "",
        )
        # Normally none: the worker held them, or says why not (a holding error is retried by
        # the next scan, not at once). Only if the worker's step broke off.
        rest = [
            rel
            for rel in committed
            if rel in self.files and rel not in report.hold_errors and rel not in report.deferred
        ]
        if rest:
            self.hold(rest)

    def _retry_together(
        self,
        report: BatchReport,
        group: RetryGroup | None,
        rels: list[str],
        failures: list[tuple[str, Failure]],
        now: float,
        wall: float,
    ) -> None:
        """Files a batch failed for a reason that names none of them (the tool's exit status,
        ssh's 255, a timeout): retried together on the endpoint's backoff, split only when
        the link no longer explains their failures, pinned once one fails on its own."""
        error_class = report.error_class or ErrorClass.REMOTE
        message = report.error or "failed"
        delay, pieces = self.sched.regroup(group, rels)
        for piece, alone in pieces:
            wait, why, quarantine = delay, message, False
            if alone:
                rel = piece.rels[0]
                known = self.files[rel]
                why = self._alone(rel, known, piece, error_class, message)
                # Its own backoff from now on; a tool that fails on this one file needs an
                # operator. A link that is too slow for it does not: it is only reported.
                wait = self.sched.backoff(known.attempts)
                quarantine = error_class == ErrorClass.REMOTE and known.attempts >= self.cfg.quarantine_after
            for rel in piece.rels:
                failures.append(
                    (rel, Failure(self.files[rel].id, "failed", why, error_class, wall + wait, quarantine))
                )
            if not quarantine:
                self.sched.add_group(piece, now + wait)

    def _alone(self, rel: str, known: Known, group: RetryGroup, error_class: str, message: str) -> str:
        """The reason recorded for a file that fails on its own; said once in the log."""
        if error_class == ErrorClass.TIMEOUT:
            why = (
                f"times out on its own ({group.failures} times in a row while other batches got "
                f"through; its deadline is {self.cfg.deadline(known.size):.0f} s for "
                f"{known.size / 1e6:.1f} MB: raise general.timeout or lower general.min_rate): {message}"
            )
        else:
            why = (
                f"fails on its own ({group.failures} times in a row, alone, while other batches "
                f"got through): {message}"
            )
        key = f"alone:{rel}"
        if key not in self.warned:
            self.warned.add(key)
            log.error("%r %s", rel, why)
        return why

    # ------------------------------------------------------------------ holding

    def after_worker(self, report: BatchReport) -> None:
        """What the worker did with the delivered files it could not hold: changed since they
        were sent, left to a writer, or not movable."""
        for rel, reason in report.changed_after.items():
            self.files.retire(rel, reason)
            log.warning("%r: %s", rel, reason)
            self.watcher.settle_again(rel)
        for rel, outcome in report.deferred.items():
            self._await_writer(rel, outcome)
        for rel, error in report.hold_errors.items():
            self._hold_failed(rel, error)
        if report.held:
            self.warned.discard("holding")

    def hold(self, rels: list[str], *, proven: bool = False) -> None:
        """Move delivered files to holding and record it (one transaction for the lot).

        The same rule as the worker's (:func:`hdfmgr.holding.hold_delivered`): only the version
        that was sent, only when no writer is at it; ``proven`` when a settle verdict just said so.
        """
        plain: list[str] = []
        renamed: list[tuple[str, str]] = []
        for rel in rels:
            known = self.files.get(rel)
            if known is None:
                continue
            try:
                result = hold_delivered(self.buffer, self.holding, rel, known.snapshot(), proven=proven)
            except HoldError as exc:
                self._hold_failed(rel, str(exc))
                continue
            if result.outcome is HoldOutcome.CHANGED:
                self.files.retire(rel, CHANGED_AFTER)
                log.warning("%r: %s", rel, CHANGED_AFTER)
                self.watcher.settle_again(rel)
            elif result.outcome is not HoldOutcome.HELD or result.name is None:
                self._await_writer(rel, result.outcome)
            elif result.name == rel:
                plain.append(rel)
            else:
                renamed.append((rel, result.name))
        if plain or renamed:
            self.warned.discard("holding")
            self.files.held(plain, renamed)

    def _await_writer(self, rel: str, outcome: HoldOutcome) -> None:
        """A delivered file that a writer may still be at stays in the buffer, settling like a
        new file: once settled it is held if unchanged, or goes again as a new version."""
        if rel in self.watcher.tracker:
            return
        evidence = Evidence.OPENED if outcome is HoldOutcome.WRITING else Evidence.SEEN
        if self.watcher.settle_again(rel, evidence=evidence):  # else the scan finds where it went
            log.debug("%r delivered; not moved to holding yet: %s", rel, outcome.value)

    def _hold_failed(self, rel: str, error: str) -> None:
        """It stays in the buffer, delivered; the next scan tries again."""
        self.files.note_error(rel, ErrorClass.LOCAL, error)
        if "holding" not in self.warned:
            self.warned.add("holding")
            log.error("cannot move delivered files to holding %s: %s (will retry)", self.holding, error)
