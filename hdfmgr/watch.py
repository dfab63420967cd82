"""The watcher: the buffer, its observer, its scans, and the evidence that a file is complete.

State owned: the observer's life cycle (started, restarted when the buffer is replaced or its
watch thread dies, stopped), whether the buffer is there, the scan schedule and count, and the
settle tracker: what each event and stat said about files not registered yet. Events and scans
become evidence here (:mod:`hdfmgr.settle` turns evidence into verdicts); only files whose
verdict is *ready* leave, for the file table to register. The watcher reads the file table
but never changes it: what a scan finds that concerns known files (delivered files still in
the buffer, files that vanished) it hands back.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .detect import lease_problem, open_for_writing, scan, snapshot, start_observer, stop_observer
from .files import COMMITTED, FAILED, IN_FLIGHT, QUARANTINED, READY, FileTable
from .holding import prune_empty_dirs
from .settle import Evidence, SettleTracker, Snapshot, Verdict

log = logging.getLogger("hdfmgr")


@dataclass
class Scanned:
    """What a scan found about known files."""

    delivered: list[str] = field(default_factory=list)  # delivered and still in the buffer, or gone
    vanished: list[str] = field(default_factory=list)  # gone before delivery
    gone_tombstones: list[str] = field(default_factory=list)  # quarantined and gone


class Watcher:
    """Detection of one buffer."""

    def __init__(
        self,
        config: Config,
        files: FileTable,
        put: Callable[[tuple[Any, ...]], None],
        *,
        once: bool,
        pins: str,
    ) -> None:
        self.cfg = config
        self.files = files
        self.put = put
        self.once = once
        self.buffer = os.fspath(config.buffer)
        #: The slots' private directory of pins, relative, when it is in the buffer (holding
        #: is another filesystem): never detected.
        inside = pins.startswith(self.buffer + os.sep)
        self.pins_rel = pins[len(self.buffer) + 1 :] + os.sep if inside else None
        self.tracker = SettleTracker(
            settle=config.settle,
            stable_age=config.stable_age,
            open_grace=max(config.pause, config.stable_age),
        )
        self.observer: Any = None
        self.kind = "none"
        self.present = True
        self.inode: tuple[int, int] | None = None
        self.next_scan = 0.0
        self.next_prune = 0.0
        self.scan_number = 0
        self.warned: set[str] = set()

    # ------------------------------------------------------------------ observer

    def start(self) -> None:
        try:
            self.observer, self.kind = start_observer(self.buffer, self.put, self.cfg.observer)
        except OSError as exc:
            log.error(
                "cannot watch %s: %s; relying on rescans every %.0f s", self.buffer, exc, self.cfg.pause
            )
            self.observer, self.kind = None, "none"

    def stop(self) -> None:
        if self.observer is not None:
            stop_observer(self.observer)
            self.observer = None

    def _alive(self) -> bool:
        if self.once or self.observer is None:
            return True
        return all(emitter.is_alive() for emitter in self.observer.emitters)

    def check_buffer(self) -> bool:
        """Notice a buffer that went, came back, or was replaced; True while it is there."""
        try:
            st = os.stat(self.buffer)
            # Not ctime: a directory's ctime changes with every file added or removed.
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        present = inode is not None
        replaced = self.inode is not None and inode != self.inode
        if present and self.present and (replaced or not self._alive()):
            # Removed and recreated between two looks (inotify stops watching a deleted
            # directory), or the watch thread died: the old watch sees nothing any more.
            log.warning("buffer %s was replaced or its watch stopped; watching it again", self.buffer)
            self.present = False
        if present:
            self.inode = inode
        if present != self.present:
            self.present = present
            if present:
                log.warning("buffer %s is back; watching it again", self.buffer)
                if not self.once:
                    self.stop()
                    self.start()
                self.next_scan = 0.0
            else:
                log.error("buffer %s is missing; waiting for it to come back", self.buffer)
        return present

    def prune_due(self, now: float) -> bool:
        if now < self.next_prune or self.once:
            return False
        self.next_prune = now + max(60.0, min(self.cfg.expiration_time, 3600.0))
        return True

    def prune(self) -> None:
        """Empty directories the camera left, old enough: a whole emptied tree in one pass."""
        if self.present:
            removed = prune_empty_dirs(self.buffer, older_than=self.cfg.expiration_time, now=time.time())
            if removed:
                log.info("removed %d empty buffer directories", removed)

    def warn_without_leases(self) -> None:
        """Said once at start: without leases, only close events and quiet time tell."""
        if not os.path.isdir(self.buffer):
            return
        problem = lease_problem(self.buffer)
        if problem is not None:
            log.warning(
                "cannot tell whether a writer still has a file open (%s): a file without a close "
                "event counts as complete once unchanged for general.stable_age (%.1f s), and a "
                "delivered one moves to holding only then; a writer that pauses longer gets its "
                "file sent early and again when it changes",
                problem,
                self.cfg.stable_age,
            )

    # ------------------------------------------------------------------ events

    def _rel(self, path: str) -> str | None:
        if not path.startswith(self.buffer + os.sep):
            return None
        rel = path[len(self.buffer) + 1 :]
        return None if self._private(rel) else rel

    def _private(self, rel: str) -> bool:
        return self.pins_rel is not None and (rel + os.sep).startswith(self.pins_rel)

    def on_file(self, evidence: Evidence, path: str, now: float) -> None:
        rel = self._rel(path)
        if rel is None or self.cfg.excluded(rel):
            return
        snap = snapshot(path)
        if snap is None:
            if os.path.islink(path):
                self._warn_link(rel)
            return
        known = self.files.get(rel)
        if known is not None and known.matches(snap):
            return  # an event for a version already registered
        self.tracker.note(rel, evidence, now, snap)

    def on_dir(self, path: str, *, moved_in: bool, now: float) -> list[str]:
        """A new directory: files can be inside before its watch exists, and one moved in
        brings complete files and no events at all. Returns delivered files found there."""
        rel = self._rel(path)
        delivered: list[str] = []
        if rel is None:
            return delivered
        for child, snap in scan(self.buffer, rel):
            self._seen(child, snap, now, Evidence.CLOSED if moved_in else Evidence.SEEN, delivered)
        return delivered

    def _seen(
        self, rel: str, snap: Snapshot | None, now: float, evidence: Evidence, delivered: list[str]
    ) -> None:
        if self.cfg.excluded(rel) or self._private(rel):
            return
        if snap is None:
            self._warn_link(rel)
            return
        known = self.files.get(rel)
        if known is not None:
            known.scanned = self.scan_number
            if known.matches(snap):
                if known.state == COMMITTED and rel not in self.tracker:
                    delivered.append(rel)
                return
            if known.state in IN_FLIGHT:
                return  # looked at again when its batch reports
        if rel not in self.tracker:
            self.tracker.note(rel, evidence, now, snap)

    def _warn_link(self, rel: str) -> None:
        if rel not in self.warned:
            self.warned.add(rel)
            log.warning("skipping symbolic link %r: links are never followed out of the buffer", rel)

    def settle_again(self, rel: str, now: float | None = None, evidence: Evidence = Evidence.SEEN) -> bool:
        """What is in the buffer under that name now settles like a new file (False: gone)."""
        snap = snapshot(os.path.join(self.buffer, rel))
        if snap is None:
            return False
        self.tracker.note(rel, evidence, time.monotonic() if now is None else now, snap)
        return True

    def recheck(self, rel: str, now: float, snap: Snapshot | None = None) -> None:
        """Look at ``rel`` again (``snap``: its current stat, None if gone)."""
        self.tracker.note(rel, Evidence.SEEN, now, snap)

    # ------------------------------------------------------------------ scans

    def scan_due(self, now: float) -> bool:
        return now >= self.next_scan

    def rescan_soon(self) -> None:
        self.next_scan = 0.0

    def scan(self, queued: Callable[[str], bool]) -> Scanned:
        """A full stat-only pass: new or changed files become evidence; known files the pass
        did not see are handed back (``queued``: in the ready queue, not gone yet)."""
        now = time.monotonic()
        self.next_scan = now + self.cfg.pause if not self.once else float("inf")
        out = Scanned()
        if not os.path.isdir(self.buffer):
            return out
        self.scan_number += 1
        entries = 0
        for rel, snap in scan(self.buffer):
            entries += 1
            self._seen(rel, snap, now, Evidence.SEEN, out.delivered)
        for rel, k in self.files.unseen(self.scan_number):
            if k.state in (READY, FAILED) and not queued(rel):
                out.vanished.append(rel)
            elif k.state == QUARANTINED:
                out.gone_tombstones.append(rel)  # no scan can register it again
            elif k.state == COMMITTED:
                # Still in the buffer: moved to holding. Gone from it: recorded as done.
                out.delivered.append(rel)
        log.debug("scan: %d entries, %.3f s", entries, time.monotonic() - now)
        return out

    def promote(self, now: float, limit: int) -> list[tuple[str, Snapshot]]:
        """Files whose evidence now says complete, a slice at a time: with a backlog of
        thousands, the first batches leave while the rest are still being checked."""
        due = self.tracker.pop_due(now, limit=limit)
        wall = time.time()
        ready: list[tuple[str, Snapshot]] = []
        for rel in due:
            known = self.files.get(rel)
            if known is not None and known.state in IN_FLIGHT:
                self.tracker.note(rel, Evidence.SEEN, now + 1.0)
                continue
            path = os.path.join(self.buffer, rel)
            snap = snapshot(path)
            writing = open_for_writing(path) if snap is not None else None
            verdict = self.tracker.check(rel, snap, now, wall, writing=writing)
            if verdict is Verdict.READY and snap is not None:
                ready.append((rel, snap))
        return ready
