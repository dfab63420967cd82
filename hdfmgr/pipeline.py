"""The dispatcher: one loop that ties detection, settling, batching, delivery and records.

Threads and their jobs:

* the watchdog observer thread puts event tuples on ``self.queue``;
* worker threads (``num_threads``) run the commands of one batch each; they never touch the
  database and report back through the same queue;
* this loop, on the main thread, is the only database writer. It waits on the queue with a
  timeout that is the next thing due (a settle deadline, a retry, the periodic rescan), so it
  sleeps when nothing happens and reacts at once when something does.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from typing import Any

import peewee as pw

from . import __version__, sdnotify
from . import db as dbm
from .batching import Candidate, ReadyQueue, arg_budget
from .config import Config
from .db import State
from .deliver import CHANGED, CHANGED_AFTER, UNREADABLE, UNVERIFIED, WAITING, BatchJob, BatchReport, deliver
from .detect import lease_problem, open_for_writing, scan, snapshot, start_observer, stop_observer
from .endpoint import Endpoint, EndpointUnfit, ErrorClass, Listing, StagedFile, recovered
from .holding import HoldError, HoldResult, clean_copies, hold_delivered, identity, prune_empty_dirs
from .holding import Outcome as HoldOutcome
from .lock import InstanceLock, lock_path, publish, state_path
from .pin import clear as clear_pins
from .pin import pin_root, slot_dir
from .record import Failure, Recorder
from .retry import CircuitBreaker, LinkHealth, RetryGroup, after_failure, backoff, pinned
from .runner import CommandResult
from .settle import Evidence, SettleTracker, Snapshot, Verdict

log = logging.getLogger("hdfmgr")

IN_FLIGHT = (State.STAGING.value, State.COMMITTING.value)
#: A plain string for the per-file loops: an enum member's ``.value`` is a descriptor call each time.
COMMITTED_STATE = State.COMMITTED.value
FAILED_STATE = State.FAILED.value
#: A quarantined file stays known (a tombstone) while it is in the buffer unchanged, so that
#: no scan registers it again; it is forgotten once it leaves the buffer or changes.
QUARANTINED_STATE = State.QUARANTINED.value

#: Soft cap on the data of one batch: large files spread over the transfer slots (hashing and
#: copying in parallel) instead of queueing in one batch; small files are unaffected.
BATCH_BYTES = 256 * 1024 * 1024


class Outcome(Enum):
    """How a run of the loop ended."""

    STOPPED = "stopped"  # SIGTERM/SIGINT: drained and exited cleanly
    DRAINED = "drained"  # once mode: everything waiting was delivered
    INCOMPLETE = "incomplete"  # once mode: some files could not be delivered


def _stamp(mtime_ns: int, inode: int) -> int:
    """mtime and inode in one int: one object a file instead of two (3 MB per 100,000)."""
    return (inode << 64) | (mtime_ns + (1 << 63))


class Known:
    """The in-memory mirror of an active database row."""

    __slots__ = ("attempts", "hashed", "id", "scanned", "since", "size", "stamp", "state")

    def __init__(
        self,
        id: int,
        size: int,
        mtime_ns: int,
        inode: int,
        state: str,
        attempts: int = 0,
        hashed: bool = False,
        since: float = 0.0,
    ) -> None:
        self.id = id
        self.size = size
        self.stamp = _stamp(mtime_ns, inode)
        self.state = state
        self.attempts = attempts
        #: The BLAKE2b is in the database (read back per batch: 177 bytes a file is too
        #: much to keep in memory for a backlog of 100,000).
        self.hashed = hashed
        self.since = since
        #: Number of the last full scan that saw the file (a set of 100,000 names per scan
        #: would cost more memory than all of these).
        self.scanned = 0

    @property
    def mtime_ns(self) -> int:
        return (self.stamp & ((1 << 64) - 1)) - (1 << 63)

    @property
    def inode(self) -> int:
        return self.stamp >> 64

    def matches(self, snap: Snapshot) -> bool:
        return self.size == snap.size and self.stamp == _stamp(snap.mtime_ns, snap.inode)

    def restamp(self, snap: Snapshot) -> None:
        self.size, self.stamp = snap.size, _stamp(snap.mtime_ns, snap.inode)


@dataclass
class Counters:
    delivered: int = 0
    bytes: int = 0
    failed: int = 0
    batches: int = 0


class Pipeline:
    """Watch mode (``once=False``) or one rescan pass (``once=True``)."""

    def __init__(
        self,
        config: Config,
        *,
        once: bool = False,
        stop: threading.Event | None = None,
        install_signals: bool = True,
    ) -> None:
        self.cfg = config
        self.once = once
        self.stop_event = stop or threading.Event()
        self.install_signals = install_signals
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.buffer = os.fspath(config.buffer)
        self.holding = os.fspath(config.holding)
        #: The slots' private directories of pinned files (hdfmgr.pin), never detected.
        self.pins = pin_root(self.buffer, self.holding)
        #: Their relative path when they are in the buffer (holding is another filesystem).
        inside = self.pins.startswith(self.buffer + os.sep)
        self.pins_rel = self.pins[len(self.buffer) + 1 :] + os.sep if inside else None
        self.tracker = SettleTracker(
            settle=config.settle,
            stable_age=config.stable_age,
            open_grace=max(config.pause, config.stable_age),
        )
        self.ready = ReadyQueue()
        self.known: dict[str, Known] = {}
        self.retry_heap: list[tuple[float, str]] = []
        #: Files of batches that failed for a reason naming no file, retried together on the
        #: endpoint's backoff (see hdfmgr/retry.py): group id -> group, (due, group id), the
        #: groups due now, and the group each batch in flight carries.
        self.health = LinkHealth()
        self.groups: dict[int, RetryGroup] = {}
        self.group_heap: list[tuple[float, int]] = []
        self.due_groups: deque[int] = deque()
        self.batch_group: dict[int, int] = {}
        self.group_ids = 0
        self.group_turn = True
        self.endpoint = Endpoint(config, warm=config.warm_sessions)
        self.breaker = CircuitBreaker(
            threshold=config.breaker_threshold, initial=config.retry_initial, maximum=config.retry_max
        )
        self.free_slots = list(range(config.num_threads - 1, -1, -1))
        self.slot_ready: dict[int, bool] = {}
        self.slot_dirty: dict[int, bool] = {}
        self.inflight: dict[int, Future[BatchReport]] = {}
        self.executor = ThreadPoolExecutor(config.num_threads + 1, thread_name_prefix="hdfmgr-worker")
        self.counters = Counters()
        self.unrecovered: dict[str, list[tuple[str, int]]] = {}
        #: Slots whose commit reply was lost, by slot directory: back in use once it is listed.
        self.suspended_slots: dict[str, int] = {}
        self.listing = False  # a listing of those slot directories is running
        self.listing_failures = 0  # listings failed in a row (said once, retried with backoff)
        self.warned: set[str] = set()
        self.rng = random.Random()
        self.budget = arg_budget() - config.transfer.fixed_length() - len(self.endpoint.slot_dir(0)) - 64
        self.sweeping = False  # a sweep of old staging directories is running
        #: Process groups of the remote commands run off the loop, killed at shutdown.
        self.background_pids: set[int] = set()
        self.preparing = False  # ... and it creates the slot directories: no dispatch yet
        #: Files checked and registered per pass of the loop: enough to fill every slot.
        self.promote_slice = max(256, config.chunk_size * config.num_threads)
        self.observer: Any = None
        self.observer_kind = "none"
        self.buffer_present = True
        self.buffer_inode: tuple[int, int] | None = None
        self.next_scan = 0.0
        self.next_prune = 0.0
        self.next_recovery = 0.0
        self.lock = InstanceLock(lock_path(self.buffer), self.buffer)
        #: What ``hdfmgr status`` reads about this daemon and its slots (see hdfmgr/lock.py):
        #: written beside the lock at most once a second when something changed.
        self.state_path = state_path(self.buffer)
        self.slot_info: dict[int, dict[str, Any]] = {
            slot: {"slot": slot, "state": "free"} for slot in range(config.num_threads)
        }
        self.started_wall = time.time()
        self.publish_due = True
        self.published_at = 0.0
        self.db: pw.Database | None = None
        self.recorder: Recorder | None = None
        self.closing = False
        self.sync_requested = False
        self.scan_number = 0
        #: Called on every pass of the loop (rescan's progress line throttles itself).
        self.on_progress: Callable[[Pipeline], None] | None = None
        #: Called with (source, state) after each breaker decision (the metrics server's
        #: hook; prometheus_client is imported only where metrics are served).
        self.on_breaker: Callable[[str, str], None] | None = None
        #: Called once, after the first transaction this run commits (the supervisor's sign
        #: that a database failure is over).
        self.on_written: Callable[[], None] | None = None
        #: The 'started' line at DEBUG: a restart after a database failure is not news once
        #: an earlier run has logged it (the supervisor reads ``announced``).
        self.quiet_start = False
        self.announced = False  # the 'started:' line was logged (at whatever level)

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> Outcome:
        """Run until stopped (watch) or until the buffer is drained (once).

        A failed database statement ends the run with :class:`~hdfmgr.db.DatabaseFailure`,
        the way a crash would but without killing anything: batches in flight finish their
        transfer, none starts its commit, and a new run resumes every file from the records.
        """
        self.lock.acquire()
        try:
            self._check_endpoint()
            self.db = dbm.connect(self.cfg, daemon=True)
            dbm.create_schema(self.db)
            self.recorder = Recorder(self.db, self.cfg.name)
            if self.install_signals:
                self._install_signals()
            if threading.current_thread() is threading.main_thread():
                # The writer check takes (and at once drops) read leases; a lease break
                # would send SIGIO, whose default action ends the process.
                signal.signal(signal.SIGIO, signal.SIG_IGN)
            self._warn_without_leases()
            clear_pins(self.pins)
            self._load_known()
            self._recover()
            self._sweep_staging(prepare=True)
            if not self.once:
                self._start_observer()
            self._scan(initial=True)
            self.next_prune = time.monotonic() + 60.0
            log.log(
                logging.DEBUG if self.quiet_start else logging.INFO,
                "started: buffer %s -> endpoint %s (%s observer, %d slots, %d files waiting)",
                self.buffer,
                self.cfg.endpoint_buffer,
                self.observer_kind,
                self.cfg.num_threads,
                len(self.ready) + len(self.tracker),
            )
            self.announced = True
            self._publish(time.monotonic(), force=True)
            sdnotify.notify("READY=1", f"STATUS=watching {self.buffer}")
            return self._loop()
        except dbm.errors() as exc:
            raise dbm.failure(exc) from exc
        finally:
            self._shutdown()

    def _check_endpoint(self) -> None:
        """Ask the endpoint, in one command, whether it can run the commit this configuration
        needs; refuse to start (:class:`EndpointUnfit`) when it says it cannot.

        An endpoint that cannot be asked (unreachable, a login that fails) is no reason to
        stop: the daemon waits for it as for any outage, and the commit program itself moves
        nothing it cannot verify and lock.
        """
        result, found = self.endpoint.requirements()
        if found is None:
            log.warning(
                "could not check what the endpoint provides (%s); checking it at each commit",
                result.describe(),
            )
            return
        problems = found.problems(self.cfg.verify)
        if problems:
            raise EndpointUnfit(
                f"endpoint cannot run the commit (verify: {self.cfg.verify}): "
                + "; ".join(problems)
                + " (see 'hdfmgr doctor')"
            )
        if found.arg_max:
            # The endpoint's argument limit, as well as this host's: commands built from a
            # batch (xargs on the endpoint included) then never have to be split.
            self.budget = min(self.budget, found.arg_max - 4096 - len(self.endpoint.slot_dir(0)))

    def _shutdown(self) -> None:
        self.closing = True
        for pid in list(self.background_pids):
            # Read-only or housekeeping: a sweep or listing still running (a hung endpoint)
            # must not outlive us.
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        if self.observer is not None:
            stop_observer(self.observer)
            self.observer = None
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.endpoint.close()  # the warm sessions' remote shells exit on end of file
        if self.db is not None:
            try:
                self.db.close()
            except dbm.errors():
                pass  # a lost connection is already closed
        self.lock.release()

    def _install_signals(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stop_event.set()
            self.queue.put(("wake",))

        def rescan(signum: int, frame: object) -> None:
            self.queue.put(("rescan",))

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, rescan)

    def _warn_without_leases(self) -> None:
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

    def _start_observer(self) -> None:
        try:
            self.observer, self.observer_kind = start_observer(self.buffer, self.queue.put, self.cfg.observer)
        except OSError as exc:
            log.error(
                "cannot watch %s: %s; relying on rescans every %.0f s", self.buffer, exc, self.cfg.pause
            )
            self.observer, self.observer_kind = None, "none"

    # ------------------------------------------------------------------ main loop

    def _loop(self) -> Outcome:
        while True:
            now = time.monotonic()
            if self.stop_event.is_set():
                return self._drain_and_stop()
            self._handle_queue(self._wait_time(now))
            now = time.monotonic()
            self._maintain(now)
            self._promote(now)
            self._release_retries(now)
            self._dispatch(now)
            if self.on_progress is not None:
                self.on_progress(self)
            self._publish(now)
            if self.on_written is not None and self._rec().writes:
                written, self.on_written = self.on_written, None
                written()
            if self.once and self._idle():
                return Outcome.DRAINED if not self._undelivered() else Outcome.INCOMPLETE

    def _publish(self, now: float, *, force: bool = False) -> None:
        """The daemon's state for ``hdfmgr status``: on a change (at most once a second) and
        every 10 s as a heartbeat (its age tells a loop that is blocked)."""
        if not force and now - self.published_at < (1.0 if self.publish_due else 10.0):
            return
        self.publish_due = False
        self.published_at = now
        publish(
            self.state_path,
            {
                "pid": os.getpid(),
                "version": __version__,
                "source": self.cfg.name,
                "buffer": self.buffer,
                "config": os.fspath(self.cfg.path),
                "started_at": self.started_wall,
                "updated_at": time.time(),
                "breaker": self.breaker.state.value,
                "waiting": len(self.ready) + len(self.tracker),
                "slots": [self.slot_info[slot] for slot in sorted(self.slot_info)],
            },
        )

    def _slot(self, slot: int, state: str, **details: Any) -> None:
        self.slot_info[slot] = {"slot": slot, "state": state, **details}
        self.publish_due = True

    def _wait_time(self, now: float) -> float:
        deadlines = [self.next_scan, now + 1.0]
        due = self.tracker.next_due()
        if due is not None:
            deadlines.append(due)
        if self.retry_heap and not self.once:
            deadlines.append(self.retry_heap[0][0])
        if self.group_heap:
            deadlines.append(self.group_heap[0][0])
        if self.breaker.state.value == "open":
            deadlines.append(self.breaker.probe_at)
        return max(0.0, min(deadlines) - now)

    def _handle_queue(self, timeout: float) -> None:
        try:
            item = self.queue.get(timeout=timeout)
        except queue.Empty:
            return
        items = [item]
        # Take whatever else is there already: one pass handles a burst of events at once.
        while len(items) < 10000:
            try:
                items.append(self.queue.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for entry in items:
            kind = entry[0]
            if kind == "file":
                self._on_file(entry[1], entry[2], now)
            elif kind == "dir":
                self._on_dir(entry[1], moved_in=entry[2], now=now)
            elif kind == "result":
                self._on_result(entry[1])
            elif kind == "checkpoint":
                self._on_checkpoint(*entry[1:])
            elif kind == "probe":
                self._on_probe(entry[1])
            elif kind == "swept":
                self._on_swept(entry[1], entry[2])
            elif kind == "listed":
                self._on_listed(entry[1], entry[2], entry[3])
            elif kind == "rescan":
                log.info("rescan requested")
                self.next_scan = 0.0
                self.sync_requested = True

    def _idle(self) -> bool:
        return not (
            self.inflight or len(self.ready) or len(self.tracker) or self.unrecovered or self.sweeping
        )

    def waiting(self) -> tuple[int, int]:
        """Files (and bytes) known and not yet delivered, plus those still settling."""
        pending = [k for k in self.known.values() if k.state not in (COMMITTED_STATE, QUARANTINED_STATE)]
        return len(pending) + len(self.tracker), sum(k.size for k in pending)

    def _undelivered(self) -> list[str]:
        return [rel for rel, k in self.known.items() if k.state not in (COMMITTED_STATE, QUARANTINED_STATE)]

    def _drain_and_stop(self) -> Outcome:
        sdnotify.notify("STOPPING=1")
        if self.inflight:
            log.info(
                "stopping: waiting for %d batch(es) in flight (at most %.0f s)",
                len(self.inflight),
                self.cfg.timeout,
            )
        while self.inflight:
            self._handle_queue(1.0)
        log.info(
            "stopped: %d files delivered (%.1f MB) in %d batches this run",
            self.counters.delivered,
            self.counters.bytes / 1e6,
            self.counters.batches,
        )
        return Outcome.STOPPED

    # ------------------------------------------------------------------ detection

    def _rel(self, path: str) -> str | None:
        if not path.startswith(self.buffer + os.sep):
            return None
        rel = path[len(self.buffer) + 1 :]
        return None if self._private(rel) else rel

    def _private(self, rel: str) -> bool:
        """The pins' directory, when it is in the buffer: never detected."""
        return self.pins_rel is not None and (rel + os.sep).startswith(self.pins_rel)

    def _on_file(self, evidence: Evidence, path: str, now: float) -> None:
        rel = self._rel(path)
        if rel is None or self.cfg.excluded(rel):
            return
        snap = snapshot(path)
        if snap is None:
            if os.path.islink(path):
                self._warn_link(rel)
            return
        known = self.known.get(rel)
        if known is not None and known.matches(snap):
            return  # an event for a version already registered
        self.tracker.note(rel, evidence, now, snap)

    def _on_dir(self, path: str, *, moved_in: bool, now: float) -> None:
        rel = self._rel(path)
        if rel is None:
            return
        # Files can be inside before the new directory's watch exists; a directory moved in
        # brings complete files and no events at all.
        delivered: list[str] = []
        for child, snap in scan(self.buffer, rel):
            self._seen(child, snap, now, Evidence.CLOSED if moved_in else Evidence.SEEN, delivered)
        if delivered:
            self._hold_committed(delivered)

    def _seen(
        self, rel: str, snap: Snapshot | None, now: float, evidence: Evidence, delivered: list[str]
    ) -> None:
        """A scan saw ``rel``; a delivered file still in the buffer goes to ``delivered``
        (moved to holding by the caller, one transaction for the lot)."""
        if self.cfg.excluded(rel) or self._private(rel):
            return
        if snap is None:
            self._warn_link(rel)
            return
        known = self.known.get(rel)
        if known is not None:
            known.scanned = self.scan_number
            if known.matches(snap):
                if known.state == COMMITTED_STATE and rel not in self.tracker:
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

    def _scan(self, *, initial: bool = False) -> None:
        now = time.monotonic()
        self.next_scan = now + self.cfg.pause if not self.once else float("inf")
        if not os.path.isdir(self.buffer):
            return
        if self.sync_requested:
            self._sync_requeued()
        self.scan_number += 1
        entries = 0
        delivered: list[str] = []
        for rel, snap in scan(self.buffer):
            entries += 1
            self._seen(rel, snap, now, Evidence.SEEN, delivered)
        unseen = [(rel, k) for rel, k in self.known.items() if k.scanned != self.scan_number]
        vanished = [
            rel
            for rel, k in unseen
            if k.state in (State.READY.value, State.FAILED.value) and rel not in self.ready
        ]
        if vanished:
            self._mark_vanished(vanished)
        for rel, k in unseen:
            if k.state == QUARANTINED_STATE:
                del self.known[rel]  # gone from the buffer: no scan can register it again
        # Still in the buffer: moved to holding. Gone from it: recorded as done, with the reason.
        delivered += [rel for rel, k in unseen if k.state == COMMITTED_STATE]
        if delivered:
            self._hold_committed(delivered)
        log.debug("scan: %d entries, %.3f s", entries, time.monotonic() - now)

    def _sync_requeued(self) -> None:
        """Pick up files an operator re-queued (``hdfmgr retry``): they go out now."""
        self.sync_requested = False
        now = time.monotonic()
        for row in self._rec().requeued():
            known = self.known.get(row.rel)
            if known is not None and known.id != row.id:
                continue  # a newer version of that path is already being handled
            if known is None:
                known = Known(
                    row.id,
                    row.size,
                    row.mtime_ns,
                    row.inode,
                    row.state,
                    row.attempts,
                    row.hashed,
                    since=now,
                )
                self.known[row.rel] = known
            elif known.state in IN_FLIGHT:
                continue
            known.state = State.READY.value
            if row.rel not in self.ready:
                self._enqueue(row.rel, known)

    def _mark_vanished(self, rels: Iterable[str]) -> None:
        rels = list(rels)
        self._rec().set_state(
            [self.known[rel].id for rel in rels],
            State.QUARANTINED,
            error="vanished from the buffer before it was delivered",
            error_class=ErrorClass.LOCAL,
            wall=time.time(),
        )
        for rel in rels:
            log.warning("%r vanished from the buffer before it was delivered (quarantined)", rel)
            del self.known[rel]

    # ------------------------------------------------------------------ maintenance

    def _maintain(self, now: float) -> None:
        try:
            st = os.stat(self.buffer)
            # Not ctime: a directory's ctime changes with every file added or removed.
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        present = inode is not None
        replaced = self.buffer_inode is not None and inode != self.buffer_inode
        if present and self.buffer_present and (replaced or not self._observer_alive()):
            # Removed and recreated between two looks (inotify stops watching a deleted
            # directory), or the watch thread died: the old watch sees nothing any more.
            log.warning("buffer %s was replaced or its watch stopped; watching it again", self.buffer)
            self.buffer_present = False
        if present:
            self.buffer_inode = inode
        if present != self.buffer_present:
            self.buffer_present = present
            if present:
                log.warning("buffer %s is back; watching it again", self.buffer)
                if not self.once:
                    if self.observer is not None:
                        stop_observer(self.observer)
                    self._start_observer()
                self.next_scan = 0.0
            else:
                log.error("buffer %s is missing; waiting for it to come back", self.buffer)
        if now >= self.next_scan:
            self._scan()
        if now >= self.next_prune and not self.once:
            self.next_prune = now + max(60.0, min(self.cfg.expiration_time, 3600.0))
            self._sweep_staging()
            if present:
                removed = prune_empty_dirs(self.buffer, older_than=self.cfg.expiration_time, now=time.time())
                if removed:
                    log.info("removed %d empty buffer directories", removed)
        if self.unrecovered and now >= self.next_recovery:
            self._recover_committing()
        if self.breaker.probe_due(now) and not self.inflight:
            self.breaker.start_probe()
            self.executor.submit(self._probe_worker)

    def _observer_alive(self) -> bool:
        if self.once or self.observer is None:
            return True
        return all(emitter.is_alive() for emitter in self.observer.emitters)

    def _probe_worker(self) -> None:
        self.queue.put(("probe", self.endpoint.probe()))

    def _on_probe(self, result: CommandResult) -> None:
        if result.ok:
            if self.breaker.record_success():
                log.warning("endpoint reachable again; resuming dispatch")
            self._endpoint_back()
        else:
            self.breaker.probe_failed(time.monotonic(), jitter=self.rng.random())
            log.debug("probe failed: %s", result.describe())
        if self.on_breaker is not None:
            self.on_breaker(self.cfg.name, self.breaker.state.value)

    # ------------------------------------------------------------------ registration

    def _promote(self, now: float) -> None:
        # A slice at a time: with a backlog of thousands, the first batches leave while the
        # rest are still being checked and recorded, instead of after all of them.
        due = self.tracker.pop_due(now, limit=self.promote_slice)
        if not due:
            return
        wall = time.time()
        ready: list[tuple[str, Snapshot]] = []
        for rel in due:
            known = self.known.get(rel)
            if known is not None and known.state in IN_FLIGHT:
                self.tracker.note(rel, Evidence.SEEN, now + 1.0)
                continue
            path = os.path.join(self.buffer, rel)
            snap = snapshot(path)
            writing = open_for_writing(path) if snap is not None else None
            verdict = self.tracker.check(rel, snap, now, wall, writing=writing)
            if verdict is Verdict.READY and snap is not None:
                ready.append((rel, snap))
        if ready:
            self._register(ready, now)

    def _register(self, items: list[tuple[str, Snapshot]], now: float) -> None:
        wall = time.time()
        new: list[tuple[str, Snapshot]] = []
        changed: list[tuple[str, Snapshot, Known]] = []
        settled: list[str] = []  # delivered files that waited for their writer
        for rel, snap in items:
            known = self.known.get(rel)
            if known is None:
                new.append((rel, snap))
            elif known.matches(snap):
                if known.state == State.READY.value and rel not in self.ready:
                    self._enqueue(rel, known)
                elif known.state == COMMITTED_STATE:
                    settled.append(rel)
            elif known.state == COMMITTED_STATE:
                # Delivered, then rewritten before it reached holding: the delivered version
                # is done; the new content is a new version.
                self._retire(rel, known, "replaced in the buffer by a new version after delivery")
                new.append((rel, snap))
            elif known.state == QUARANTINED_STATE:
                # Replaced by the operator (or the camera): the quarantined row stays as it
                # was, the new content is a new version.
                del self.known[rel]
                new.append((rel, snap))
            else:
                changed.append((rel, snap, known))
        rec = self._rec()
        if changed:
            rec.new_version([(known.id, snap) for _, snap, known in changed], wall)
            for rel, snap, known in changed:
                known.restamp(snap)
                known.hashed, known.state, known.since = False, State.READY.value, now
                self._enqueue(rel, known)
        if new:
            ids = rec.insert(new, wall)
            for (rel, snap), row_id in zip(new, ids, strict=True):
                known = Known(row_id, snap.size, snap.mtime_ns, snap.inode, State.READY.value, since=now)
                self.known[rel] = known
                self._enqueue(rel, known)
        if settled:
            self._hold_committed(settled, proven=True)

    def _retire(self, rel: str, known: Known, reason: str) -> None:
        self._rec().set_state([known.id], State.HELD, error=reason, wall=time.time())
        log.warning("%r: %s", rel, reason)
        del self.known[rel]

    def _enqueue(self, rel: str, known: Known) -> None:
        self.ready.add(Candidate(rel, known.size, known.since))

    def _release_retries(self, now: float) -> None:
        while self.group_heap and self.group_heap[0][0] <= now:
            self.due_groups.append(heapq.heappop(self.group_heap)[1])
        while self.retry_heap and (self.retry_heap[0][0] <= now or self.once):
            _, rel = heapq.heappop(self.retry_heap)
            known = self.known.get(rel)
            if known is not None and known.state == State.FAILED.value and not self.once:
                # In line from the moment it is due again, behind files that were ready
                # before: files that keep failing never starve the ones not yet tried.
                known.since = now
                self._enqueue(rel, known)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, now: float) -> None:
        while (
            self.free_slots
            and (len(self.ready) or self.due_groups)
            and self.breaker.allows_dispatch()
            and not self.stop_event.is_set()
        ):
            if not self.buffer_present or self.preparing:
                return
            # Groups retried whole and new batches take turns: files that keep failing never
            # starve the ones not yet tried, and a retried group never waits behind a backlog.
            if self.due_groups and (self.group_turn or not len(self.ready)):
                self.group_turn = False
                self._dispatch_group(now)
                continue
            self.group_turn = True
            batch = self.ready.take_batch(
                chunk_size=self.cfg.chunk_size,
                budget=self.budget,
                path_bytes=len(self.buffer) + 1,
                spread=True,
                max_bytes=BATCH_BYTES,
                slots=len(self.free_slots),  # a visit goes over every free stream
            )
            files, snaps = self._stage([item.rel for item in batch], now)
            if files:
                self._start_batch(files, snaps)

    def _dispatch_group(self, now: float) -> None:
        group_id = self.due_groups.popleft()
        group = self.groups[group_id]
        known = self.known
        rels = [rel for rel in group.rels if rel in known and known[rel].state == FAILED_STATE]
        files, snaps = self._stage(rels, now)
        if not files:
            del self.groups[group_id]
            return
        group.rels = [f.rel for f in files]
        self._start_batch(files, snaps, group=group_id)

    def _stage(self, rels: list[str], now: float) -> tuple[list[StagedFile], dict[str, Snapshot]]:
        """The files of a batch that are still the version registered (others settle again)."""
        files: list[StagedFile] = []
        snaps: dict[str, Snapshot] = {}
        for rel in rels:
            known = self.known.get(rel)
            if known is None:
                continue
            snap = snapshot(os.path.join(self.buffer, rel))
            if snap is None or not known.matches(snap):
                # Changed or gone since it settled: let it settle again (or vanish).
                if snap is not None:
                    self.tracker.note(rel, Evidence.SEEN, now, snap)
                continue
            files.append(StagedFile(rel, os.path.join(self.buffer, rel), known.size))
            snaps[rel] = snap
        if not files:
            return files, snaps
        stored = self._rec().checksums([self.known[f.rel].id for f in files if self.known[f.rel].hashed])
        if stored:
            files = [StagedFile(f.rel, f.path, f.size, stored.get(self.known[f.rel].id)) for f in files]
        return files, snaps

    def _start_batch(
        self, files: list[StagedFile], snaps: dict[str, Snapshot], *, group: int | None = None
    ) -> None:
        slot = self.free_slots.pop()
        staging_dir = self.endpoint.slot_dir(slot)
        ids = [self.known[f.rel].id for f in files]
        batch_id = self._rec().start_batch(staging_dir, ids, sum(f.size for f in files), time.time())
        for f in files:
            known = self.known[f.rel]
            known.state = State.STAGING.value
            known.attempts += 1
        dirty = self.slot_dirty.get(slot, False)
        job = BatchJob(
            id=batch_id,
            slot=slot,
            staging_dir=staging_dir,
            files=files,
            snapshots=snaps,
            prepare=dirty or not self.slot_ready.get(slot, False),
            pin_dir=slot_dir(self.pins, slot),
        )
        if group is not None:
            self.batch_group[batch_id] = group
        wall = time.time()
        nbytes = sum(f.size for f in files)
        self._slot(
            slot,
            "transfer",
            batch=batch_id,
            files=len(files),
            bytes=nbytes,
            since=wall,
            # prepare, transfer and commit each within their deadline
            due=wall + self.cfg.deadline(nbytes) + 2 * self.cfg.timeout,
        )
        self.inflight[batch_id] = self.executor.submit(self._deliver, job)

    def _deliver(self, job: BatchJob) -> None:
        """Worker thread: run the batch, hand the report to the loop."""
        self.queue.put(("result", deliver(job, self.endpoint, self._checkpoint, self._hold_one)))

    def _hold_one(self, rel: str, sent: Snapshot) -> HoldResult:
        """Worker thread: one delivered file to holding (plain file-system calls, no state)."""
        return hold_delivered(self.buffer, self.holding, rel, sent, proven=False)

    def _checkpoint(self, job: BatchJob, files: list[StagedFile], checksums: dict[str, str]) -> bool:
        """Worker thread: have the loop record COMMITTING, and wait until it has."""
        ack = threading.Event()
        self.queue.put(("checkpoint", job, [f.rel for f in files], checksums, ack))
        while not ack.wait(0.5):
            if self.closing:
                return False
        return True

    # ------------------------------------------------------------------ results

    def _on_checkpoint(
        self, job: BatchJob, rels: list[str], checksums: dict[str, str], ack: threading.Event
    ) -> None:
        """Record COMMITTING before the worker runs the remote mv: a restart must know."""
        self._rec().committing(
            job.id, [self.known[rel].id for rel in rels], self._new_checksums(checksums), time.time()
        )
        for rel in rels:
            self.known[rel].state = State.COMMITTING.value
        wall = time.time()
        info = self.slot_info.get(job.slot, {})
        checked = sum(self.known[rel].size for rel in rels) if self.cfg.verify == "checksum" else 0
        self._slot(
            job.slot,
            "committing",
            batch=job.id,
            files=info.get("files", len(rels)),
            bytes=info.get("bytes", 0),
            since=wall,
            due=wall + self.cfg.deadline(checked),
        )
        ack.set()

    def _new_checksums(self, checksums: dict[str, str]) -> list[tuple[int, str]]:
        """Checksums not stored yet (each file version is hashed once, then remembered)."""
        pairs = []
        for rel, digest in checksums.items():
            known = self.known[rel]
            if not known.hashed:
                known.hashed = True
                pairs.append((known.id, digest))
        return pairs

    def _on_result(self, report: BatchReport) -> None:
        job = report.job
        self.inflight.pop(job.id, None)
        if report.unknown:
            # Its slot directory is the evidence of what the lost commit did: out of use
            # until the listing (see _recover_committing), then cleaned.
            self.suspended_slots[job.staging_dir] = job.slot
            self._slot(
                job.slot,
                "suspended",
                batch=job.id,
                files=len(report.unknown),
                since=time.time(),
                reason=f"commit reply lost ({report.error}); out of use until a listing of its "
                "staging directory tells what the commit did",
            )
        else:
            self.free_slots.append(job.slot)
            self._slot(job.slot, "free")
        self.slot_dirty[job.slot] = not report.slot_clean
        if report.prepare is not None and report.prepare.ok:
            self.slot_ready[job.slot] = True
        now = time.monotonic()
        wall = time.time()
        committed = report.committed()
        delivered = set(committed)
        unknown = set(report.unknown)
        failed = [f for f in job.files if f.rel not in delivered and f.rel not in unknown]
        failures: list[Failure] = []
        quarantined: list[tuple[str, str]] = []
        unpinned: list[str] = []  # failed for a reason that names no file
        for f in failed:
            known = self.known[f.rel]
            outcome, error = report.outcomes.get(f.rel, ("failed", None))
            error_class = report.error_class or ErrorClass.REMOTE
            message = error or report.error or "failed"
            if outcome == UNREADABLE:
                # The file's own fault, and it was left out of the transfer: at once.
                failures.append(Failure(known.id, outcome, message, ErrorClass.LOCAL, wall, True))
                quarantined.append((f.rel, message))
                continue
            if outcome == CHANGED:
                error_class, delay = ErrorClass.LOCAL, 0.0
            elif outcome in (UNVERIFIED, WAITING):
                # The file's own outcome: its own backoff. An existing final name is never
                # quarantined: the file waits for the consumer to take the earlier version.
                error_class = ErrorClass.VERIFICATION if outcome == UNVERIFIED else ErrorClass.EXISTS
                delay = backoff(
                    known.attempts,
                    initial=self.cfg.retry_initial,
                    maximum=self.cfg.retry_max,
                    jitter=self.rng.random(),
                )
            elif not self.once:
                unpinned.append(f.rel)
                continue
            else:
                delay = 0.0  # a rescan does not retry; the next run does
            # A file that keeps failing verification needs an operator.
            quarantine = (
                error_class == ErrorClass.VERIFICATION and known.attempts >= self.cfg.quarantine_after
            )
            failures.append(Failure(known.id, outcome, message, error_class, wall + delay, quarantine))
            if quarantine:
                quarantined.append((f.rel, message))
                continue
            known.state = FAILED_STATE
            current = snapshot(f.path) if outcome == CHANGED else None
            if outcome == CHANGED and (current is None or not known.matches(current)):
                self.tracker.note(f.rel, Evidence.SEEN, now, current)  # gone, or a new version
            elif outcome == CHANGED:
                # Reported changed, yet the buffer holds the registered version (its pin went
                # away during the transfer, e.g. a purge of holding): settling again would find
                # nothing new, so it is retried, with backoff.
                delay = backoff(
                    known.attempts,
                    initial=self.cfg.retry_initial,
                    maximum=self.cfg.retry_max,
                    jitter=self.rng.random(),
                )
                heapq.heappush(self.retry_heap, (now + delay, f.rel))
            else:
                heapq.heappush(self.retry_heap, (now + delay, f.rel))
        group_id = self.batch_group.pop(job.id, None)
        group = self.groups.pop(group_id, None) if group_id is not None else None
        self.health.record(not unpinned and not unknown, first_try=group is None)
        if unpinned:
            self._retry_together(report, group, unpinned, failures, quarantined, now, wall)
        held = report.held
        self._rec().finish_batch(
            report,
            committed=[self.known[rel].id for rel in committed if rel not in held],
            held=[self.known[rel].id for rel in committed if held.get(rel) == rel],
            renamed=[(self.known[rel].id, held[rel]) for rel in committed if held.get(rel, rel) != rel],
            failures=failures,
            unknown=[self.known[rel].id for rel in report.unknown],
            checksums=self._new_checksums(report.checksums),
            wall=wall,
        )
        for rel in committed:
            self.known[rel].state = COMMITTED_STATE
        if unknown:
            for rel in report.unknown:
                self.unrecovered.setdefault(job.staging_dir, []).append((rel, job.id))
            # Not at once: a remote script that outlived its ssh may still be moving files.
            self.next_recovery = now + self.cfg.retry_initial
            log.warning(
                "batch %d: the commit's reply was lost (%s); %d file(s) may be in the endpoint "
                "buffer already: staging is checked before any is sent again",
                job.id,
                report.error,
                len(unknown),
            )
        size = sum(self.known[rel].size for rel in committed)
        self._after_hold(report)
        for rel, message in quarantined:
            known = self.known[rel]
            known.state = QUARANTINED_STATE
            log.error(
                "%r quarantined after %d attempts (%s); it stays in the buffer: fix the cause, "
                "then run 'hdfmgr retry'",
                rel,
                known.attempts,
                message,
            )
        self.counters.batches += 1
        if committed:
            self.counters.delivered += len(committed)
            self.counters.bytes += size
            directory = os.path.dirname(job.files[0].rel)
            log.info(
                "batch %d: delivered %d file(s), %.1f MB in %.2f s%s",
                job.id,
                len(committed),
                size / 1e6,
                wall - report.started,
                f" from {directory}/" if directory else "",
            )
            # Normally none: the worker held them, or says why not (a holding error is
            # retried by the next scan, not at once). Only if the worker's step broke off.
            rest = [
                rel
                for rel in committed
                if rel in self.known and rel not in report.hold_errors and rel not in report.deferred
            ]
            if rest:
                self._hold_committed(rest)
        transport = report.error_class in (ErrorClass.TRANSPORT, ErrorClass.TIMEOUT)
        troubled = bool(failed or unknown)
        if troubled:
            self.counters.failed += len(failed)
            if transport and self.breaker.record_transport_failure(now, jitter=self.rng.random()):
                log.error("endpoint unreachable (%s); pausing dispatch, probing with 'true'", report.error)
            elif failed and self.breaker.allows_dispatch():
                log.warning("batch %d: %d file(s) failed: %s", job.id, len(failed), report.error)
        if (not troubled or not transport) and self.breaker.record_success():
            log.warning("endpoint reachable again; resuming dispatch")
            self._endpoint_back()
        if self.on_breaker is not None:
            self.on_breaker(self.cfg.name, self.breaker.state.value)

    def _retry_together(
        self,
        report: BatchReport,
        group: RetryGroup | None,
        rels: list[str],
        failures: list[Failure],
        quarantined: list[tuple[str, str]],
        now: float,
        wall: float,
    ) -> None:
        """Files a batch failed for a reason that names none of them (the tool's exit status,
        ssh's 255, a timeout): retried together on the endpoint's backoff, split only when
        the link no longer explains their failures, pinned once one fails on its own."""
        if group is None:
            group = RetryGroup(rels, successes_at_start=self.health.successes)
        else:
            group.rels = rels
        error_class = report.error_class or ErrorClass.REMOTE
        message = report.error or "failed"
        delay = self.health.delay(
            initial=self.cfg.retry_initial, maximum=self.cfg.retry_max, jitter=self.rng.random()
        )
        for piece in after_failure(group, self.health):
            wait = delay
            why = message
            quarantine = False
            if piece is group and pinned(piece, self.health):  # failed alone, not just split
                rel = piece.rels[0]
                known = self.known[rel]
                why = self._alone(rel, known, piece, error_class, message)
                # Its own backoff from now on; a tool that fails on this one file needs an
                # operator. A link that is too slow for it does not: it is only reported.
                wait = backoff(
                    known.attempts,
                    initial=self.cfg.retry_initial,
                    maximum=self.cfg.retry_max,
                    jitter=self.rng.random(),
                )
                quarantine = error_class == ErrorClass.REMOTE and known.attempts >= self.cfg.quarantine_after
            for rel in piece.rels:
                known = self.known[rel]
                failures.append(Failure(known.id, "failed", why, error_class, wall + wait, quarantine))
                if quarantine:
                    quarantined.append((rel, why))
                else:
                    known.state = FAILED_STATE
            if not quarantine:
                self.group_ids += 1
                self.groups[self.group_ids] = piece
                heapq.heappush(self.group_heap, (now + wait, self.group_ids))

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

    def _after_hold(self, report: BatchReport) -> None:
        """What the worker did with the delivered files: held, changed, left to a writer, or
        not movable."""
        for rel in report.held:
            del self.known[rel]
        for rel, reason in report.changed_after.items():
            self._retire(rel, self.known[rel], reason)
            self._settle_again(rel)
        for rel, outcome in report.deferred.items():
            self._await_writer(rel, outcome)
        for rel, error in report.hold_errors.items():
            self._hold_failed(rel, self.known[rel], error)
        if report.held:
            self.warned.discard("holding")

    def _settle_again(self, rel: str) -> None:
        """What is in the buffer under a delivered file's name now is a new version."""
        snap = snapshot(os.path.join(self.buffer, rel))
        if snap is not None:
            self.tracker.note(rel, Evidence.SEEN, time.monotonic(), snap)

    def _await_writer(self, rel: str, outcome: HoldOutcome) -> None:
        """A delivered file that a writer may still be at stays in the buffer, settling like a
        new file: once settled it is held if unchanged, or goes again as a new version."""
        if rel in self.tracker:
            return
        snap = snapshot(os.path.join(self.buffer, rel))
        if snap is None:
            return  # the scan finds out where it went
        evidence = Evidence.OPENED if outcome is HoldOutcome.WRITING else Evidence.SEEN
        self.tracker.note(rel, evidence, time.monotonic(), snap)
        log.debug("%r delivered; not moved to holding yet: %s", rel, outcome.value)

    def _hold_failed(self, rel: str, known: Known, error: str) -> None:
        """It stays in the buffer, delivered; the next scan tries again."""
        self._rec().note_error(known.id, ErrorClass.LOCAL, error)
        if "holding" not in self.warned:
            self.warned.add("holding")
            log.error("cannot move delivered files to holding %s: %s (will retry)", self.holding, error)

    def _endpoint_back(self) -> None:
        """After an outage, files that backed off because of it go out now, not in 10 min."""
        self.slot_ready.clear()
        now = time.monotonic()
        self.retry_heap = [(min(due, now), rel) for due, rel in self.retry_heap]
        heapq.heapify(self.retry_heap)
        self.group_heap = [(min(due, now), group) for due, group in self.group_heap]
        heapq.heapify(self.group_heap)
        self.next_recovery = min(self.next_recovery, now)  # and staging is listed at once

    def _hold_committed(self, rels: list[str], *, proven: bool = False) -> None:
        """Move delivered files to holding and record it (one transaction for the lot).

        The same rule as the worker's (holding.hold_delivered): only the version that was sent,
        only when no writer is at it; ``proven`` when a settle verdict just said so.
        """
        plain: list[str] = []
        renamed: list[tuple[str, str]] = []
        for rel in rels:
            known = self.known.get(rel)
            if known is None:
                continue
            sent = Snapshot(known.size, known.mtime_ns, known.inode)
            try:
                result = hold_delivered(self.buffer, self.holding, rel, sent, proven=proven)
            except HoldError as exc:
                self._hold_failed(rel, known, str(exc))
                continue
            if result.outcome is HoldOutcome.CHANGED:
                self._retire(rel, known, CHANGED_AFTER)
                self._settle_again(rel)
            elif result.outcome is not HoldOutcome.HELD or result.name is None:
                self._await_writer(rel, result.outcome)
            elif result.name == rel:
                plain.append(rel)
            else:
                renamed.append((rel, result.name))
        if not plain and not renamed:
            return
        self.warned.discard("holding")
        self._rec().held(
            [self.known[rel].id for rel in plain],
            [(self.known[rel].id, held_as) for rel, held_as in renamed],
            time.time(),
        )
        for rel in plain:
            del self.known[rel]
        for rel, _ in renamed:
            del self.known[rel]

    # ------------------------------------------------------------------ start-up

    def _rec(self) -> Recorder:
        assert self.recorder is not None
        return self.recorder

    def _load_known(self) -> None:
        now = time.monotonic()
        wall = time.time()
        self._committing_batches: dict[int, list[str]] = {}
        # One shared string per state, not one per row; the enum's members are looked up
        # once, not per row (a restart with 100,000 unfinished files runs this loop for each).
        states = {s.value: s.value for s in State}
        committing, ready, failed = State.COMMITTING.value, State.READY.value, State.FAILED.value
        known_files, enqueue, retry_heap = self.known, self._enqueue, self.retry_heap
        for row in self._rec().active():
            rel, state = row.rel, states[row.state]
            known = Known(
                row.id, row.size, row.mtime_ns, row.inode, state, row.attempts, row.hashed, since=now
            )
            known_files[rel] = known
            if state == committing and row.last_batch is not None:
                self._committing_batches.setdefault(row.last_batch, []).append(rel)
            elif state == ready or (state == failed and self.once):
                enqueue(rel, known)
            elif state == failed:
                retry_heap.append((now + max(0.0, row.next_try - wall), rel))
        heapq.heapify(retry_heap)
        for row in self._rec().quarantined():
            if row.rel not in known_files:
                known_files[row.rel] = Known(
                    row.id, row.size, row.mtime_ns, row.inode, QUARANTINED_STATE, row.attempts, row.hashed
                )

    def _recover(self) -> None:
        """Reconcile files that were in flight when the last run ended.

        STAGING: the mv never ran; send again. COMMITTING: the mv may have run. The slot's
        receipt tells: a name in the receipt of its batch was moved (committed, never send
        again); anything else is sent again, with a warning when the copy is gone from staging
        too (see :func:`hdfmgr.endpoint.recovered`). If the endpoint cannot be asked, those
        files wait, untouched, until it can.
        """
        self._rec().close_interrupted_batches(time.time(), keep=self._committing_batches)
        self._clean_holding_copies()
        staging = [rel for rel, k in self.known.items() if k.state == State.STAGING.value]
        if staging:
            self._set_state(staging, State.READY, error="interrupted during transfer; sending again")
            for rel in staging:
                self._enqueue(rel, self.known[rel])
            log.warning("recovered %d file(s) interrupted during transfer", len(staging))
        if self._committing_batches:
            dirs = self._rec().staging_dirs(self._committing_batches)
            for batch_id, staging_dir in dirs.items():
                for rel in self._committing_batches[batch_id]:
                    self.unrecovered.setdefault(staging_dir, []).append((rel, batch_id))
            self._recover_committing()
        committed = [rel for rel, k in self.known.items() if k.state == COMMITTED_STATE]
        if committed:
            log.info("moving %d already delivered file(s) to holding", len(committed))
            self._hold_committed(committed)

    def _clean_holding_copies(self) -> None:
        """Copies into holding (from another filesystem) that a killed run left: those of
        files that may be in the middle of a move stay, as evidence for the next hold."""
        try:
            dev = os.stat(self.buffer).st_dev
        except OSError:
            return
        keep = {
            identity(dev, Snapshot(k.size, k.mtime_ns, k.inode))
            for k in self.known.values()
            if k.state in (State.COMMITTING.value, COMMITTED_STATE)
        }
        removed = clean_copies(self.holding, keep)
        if removed:
            log.info("removed %d partial copies an earlier run left in holding", removed)

    def _recover_committing(self) -> None:
        """List the slot directories of files whose commit may have run.

        On a thread of its own, like the sweep: it is a remote command, and a hung endpoint
        must not stop the loop (nor SIGTERM). ``_on_listed`` applies the answer.
        """
        if self.listing:
            return
        self.listing = True
        dirs = sorted(self.unrecovered)
        # Every batch whose outcome this listing decides is fenced off: should its commit
        # script start only now, it must move nothing (hdfmgr/remote/commit.sh).
        fences = {d: max(batch for _, batch in self.unrecovered[d]) for d in dirs}

        def listing(started: Callable[[int], None]) -> tuple[Any, ...]:
            return ("listed", dirs, *self.endpoint.list_slots(dirs, on_start=started, fences=fences))

        self._in_background("hdfmgr-list", listing)

    def _on_listed(self, dirs: list[str], result: CommandResult, present: Listing | None) -> None:
        self.listing = False
        waiting = sum(len(self.unrecovered.get(d, ())) for d in dirs)
        if present is None:
            self.listing_failures += 1
            delay = backoff(
                self.listing_failures,
                initial=self.cfg.retry_initial,
                maximum=self.cfg.retry_max,
                jitter=self.rng.random(),
            )
            self.next_recovery = time.monotonic() + delay
            for slot in self.suspended_slots.values():
                info = self.slot_info[slot]
                info["reason"] = (
                    f"commit reply lost; {self.listing_failures} listing(s) of its staging "
                    f"directory failed ({result.describe()}), next in {delay:.0f} s"
                )
                self.publish_due = True
            log.log(
                logging.WARNING if self.listing_failures == 1 else logging.DEBUG,
                "cannot check staging for %d file(s) whose commit may have run (%s); will retry",
                waiting,
                result.describe(),
            )
            return
        self.listing_failures = 0
        resend: list[str] = []
        moved: list[str] = []
        by_batch: dict[int, tuple[list[int], list[int]]] = {}
        for staging_dir in dirs:
            names = present.get(staging_dir)
            entries = self.unrecovered.pop(staging_dir, [])
            decided = recovered(entries, names, present.receipts.get(staging_dir))
            moved += decided.moved
            resend += decided.resend
            for rel in decided.unknown:
                log.warning(
                    "%r left staging with no receipt of its move (deleted there by someone else, "
                    "or its commit never ran): sending it again, it may arrive twice",
                    rel,
                )
            delivered = set(decided.moved)
            for rel, batch in entries:
                outcome = by_batch.setdefault(batch, ([], []))
                outcome[0 if rel in delivered else 1].append(self.known[rel].id)
            slot = self.suspended_slots.pop(staging_dir, None)
            if slot is not None:
                self.slot_dirty[slot] = True
                self.free_slots.append(slot)
                self._slot(slot, "free")
        # The batches and attempts learn what the listing proved (a restart left them running).
        self._rec().close_listed_batches(by_batch, time.time())
        if resend:
            self._set_state(resend, State.READY, error="interrupted before the move; sending again")
            for rel in resend:
                self._enqueue(rel, self.known[rel])
        if moved:
            # Delivered, and first known to be now: counted in this run's totals.
            self.counters.delivered += len(moved)
            self.counters.bytes += sum(self.known[rel].size for rel in moved)
            self._set_state(moved, State.COMMITTED, error=None)
            self._hold_committed(moved)
        log.warning(
            "recovered %d file(s) interrupted while committing: %d had been delivered, %d will be sent again",
            len(resend) + len(moved),
            len(moved),
            len(resend),
        )
        self._sweep_staging()

    def _set_state(self, rels: list[str], state: State, *, error: str | None) -> None:
        self._rec().set_state([self.known[rel].id for rel in rels], state, error=error, wall=time.time())
        for rel in rels:
            self.known[rel].state = state.value

    def _sweep_staging(self, *, prepare: bool = False) -> None:
        """Clean up earlier runs' staging on a thread of its own (it is a remote command).

        With ``prepare`` it also creates every slot directory, and dispatch waits for it: at
        start-up the first batches then need no remote command but their own two.
        """
        if self.unrecovered or self.sweeping:
            return  # their slot directories are the evidence; sweep after recovery
        slots = [self.endpoint.slot_dir(slot) for slot in range(self.cfg.num_threads)] if prepare else []
        self.sweeping = True
        self.preparing = prepare

        def sweep(started: Callable[[int], None]) -> tuple[Any, ...]:
            return ("swept", len(slots), self.endpoint.sweep(slots, on_start=started))

        self._in_background("hdfmgr-sweep", sweep)

    def _in_background(self, name: str, command: Callable[[Callable[[int], None]], tuple[Any, ...]]) -> None:
        """Run a remote command off the loop, on a thread; its answer comes back on the queue.

        ``command`` gets the callback that records its process group, so that shutdown can
        kill it (a hung endpoint must not outlive the daemon).
        """
        pids: list[int] = []

        def started(pid: int) -> None:
            pids.append(pid)
            self.background_pids.add(pid)

        def run() -> None:
            try:
                message = command(started)
            finally:
                self.background_pids.difference_update(pids)
            self.queue.put(message)

        threading.Thread(target=run, name=name, daemon=True).start()

    def _on_swept(self, prepared: int, result: CommandResult) -> None:
        self.sweeping = self.preparing = False
        if not result.ok:
            log.warning("could not clean old staging directories: %s", result.describe())
            return
        for slot in range(prepared):
            if not self.slot_dirty.get(slot, False):
                self.slot_ready[slot] = True


def run_pipeline(
    config: Config, *, once: bool, on_start: Callable[[Pipeline], None] | None = None
) -> Outcome:
    """Build and run a pipeline (the CLI's entry point)."""
    pipeline = Pipeline(config, once=once)
    if on_start is not None:
        on_start(pipeline)
    return pipeline.run()
