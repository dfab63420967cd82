"""The dispatcher: one loop that routes events and timers to the parts that own the state.

State owned: only the loop's own (the batches in flight, the worker pool, the life cycle of a
run). Everything else has one owner, and this loop is the short pump between them:

* :mod:`hdfmgr.watch` (the buffer, its observer and scans, the settle evidence),
* :mod:`hdfmgr.files` (every file's state, and the only database writes of it),
* :mod:`hdfmgr.schedule` (the ready queue, retries, the breaker: what goes next, and when),
* :mod:`hdfmgr.slots` (the staging slots), :mod:`hdfmgr.recovery` (files in doubt),
* :mod:`hdfmgr.outcomes` (what a batch's report and a hold do to the files).

Threads: the watchdog observer thread puts event tuples on ``self.queue``; worker threads
(``num_threads``) run one batch each, never touch the database and report back through the
same queue; this loop, on the main thread, is the only database writer. It waits on the queue
with a timeout that is the next thing due, so it sleeps when nothing happens and reacts at
once when something does.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any

import peewee as pw

from . import __version__, sdnotify
from . import db as dbm
from .config import Config
from .dispatch import Dispatcher
from .endpoint import Endpoint, Listing
from .files import FAILED, FileTable
from .gate import Gate
from .lock import InstanceLock, lock_path, publish, state_path
from .outcomes import Counters, Outcomes
from .pin import clear as clear_pins
from .pin import pin_root
from .record import Recorder
from .recovery import Decided, Reconciler
from .runner import CommandResult
from .schedule import Pending, Scheduler
from .settle import Snapshot
from .slots import SlotPool
from .watch import Watcher

log = logging.getLogger("hdfmgr")

__all__ = ["Counters", "Outcome", "Pipeline", "run_pipeline"]


class Outcome(Enum):
    """How a run of the loop ended."""

    STOPPED = "stopped"  # SIGTERM/SIGINT: drained and exited cleanly
    DRAINED = "drained"  # once mode: everything waiting was delivered
    INCOMPLETE = "incomplete"  # once mode: some files could not be delivered


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
        self.endpoint = Endpoint(config, warm=config.warm_sessions)
        self.files = FileTable()
        self.sched = Scheduler(
            retry_initial=config.retry_initial,
            retry_max=config.retry_max,
            breaker_threshold=config.breaker_threshold,
            once=once,
        )
        self.watcher = Watcher(config, self.files, self.queue.put, once=once, pins=self.pins)
        self.slots = SlotPool(config.num_threads)
        self.doubt = Reconciler(
            self.endpoint,
            self.files,
            self.queue.put,
            backoff=self.sched.backoff,
            retry_initial=config.retry_initial,
            slots=config.num_threads,
        )
        self.outcomes = Outcomes(config, self.files, self.sched, self.watcher, once=once)
        self.batches = Dispatcher(
            config,
            self.endpoint,
            files=self.files,
            scheduler=self.sched,
            slots=self.slots,
            doubt=self.doubt,
            watcher=self.watcher,
            outcomes=self.outcomes,
            put=self.queue.put,
            pins=self.pins,
        )
        self.gate = Gate(
            self.endpoint,
            config.verify,
            backoff=self.sched.backoff,
            limit=self.batches.limit_arguments,
            in_background=self.doubt.in_background,
        )
        self.batches.on_endpoint_back = self._endpoint_back
        self.batches.on_breaker = self._breaker_changed
        #: Files checked and registered per pass of the loop: enough to fill every slot.
        self.promote_slice = max(256, config.chunk_size * config.num_threads)
        self.lock = InstanceLock(lock_path(self.buffer), self.buffer)
        #: What ``hdfmgr status`` reads about this daemon and its slots (see hdfmgr/lock.py):
        #: written beside the lock at most once a second when something changed.
        self.state_path = state_path(self.buffer)
        self.started_wall = time.time()
        self.published_at = 0.0
        self.db: pw.Database | None = None
        self.sync_requested = False
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

    @property
    def counters(self) -> Counters:
        return self.outcomes.counters

    @property
    def budget(self) -> int:
        """What the names of one batch may take on a command line (here and at the endpoint)."""
        return self.batches.budget

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self.batches.executor

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> Outcome:
        """Run until stopped (watch) or until the buffer is drained (once).

        A failed database statement ends the run with :class:`~hdfmgr.db.DatabaseFailure`,
        the way a crash would but without killing anything: batches in flight finish their
        transfer, none starts its commit, and a new run resumes every file from the records.
        """
        self.lock.acquire()
        try:
            self.endpoint.prewarm()  # only once this instance holds the buffer
            self.gate.ask_now()
            self.db = dbm.connect(self.cfg, daemon=True)
            dbm.create_schema(self.db)
            self.files.recorder = Recorder(self.db, self.cfg.name)
            if self.install_signals:
                self._install_signals()
            if threading.current_thread() is threading.main_thread():
                # The writer check takes (and at once drops) read leases; a lease break
                # would send SIGIO, whose default action ends the process.
                signal.signal(signal.SIGIO, signal.SIG_IGN)
            self.watcher.warn_without_leases()
            if self.cfg.sharing_problem is not None:
                log.warning(
                    "ssh connections not shared: %s (general.share_connections)", self.cfg.sharing_problem
                )
            clear_pins(self.pins)
            self._start_from_records()
            if not self.once:
                self.watcher.start()
            self._scan()
            self.watcher.next_prune = time.monotonic() + 60.0
            log.log(
                logging.DEBUG if self.quiet_start else logging.INFO,
                "started: buffer %s -> endpoint %s (%s observer, %d slots, %d files waiting)",
                self.buffer,
                self.cfg.endpoint_buffer,
                self.watcher.kind,
                self.cfg.num_threads,
                len(self.sched.ready) + len(self.watcher.tracker),
            )
            self.announced = True
            self._publish(time.monotonic(), force=True)
            sdnotify.notify("READY=1", f"STATUS=watching {self.buffer}")
            return self._loop()
        except dbm.errors() as exc:
            raise dbm.failure(exc) from exc
        finally:
            self._shutdown()

    def _start_from_records(self) -> None:
        """Resume every file the records name, and reconcile those that were in flight."""
        loaded = self.files.load(once=self.once)
        self.outcomes.enqueue(loaded.ready)
        self.sched.load_retries(loaded.retries)
        decided = self.doubt.at_start(loaded, self.buffer, self.holding)
        self.outcomes.enqueue(decided.resend)
        if decided.moved:
            self.outcomes.hold(decided.moved)
        # The stream's receive creates its slot directory: no batch waits for the sweep then.
        self.doubt.sweep(prepare=not self.cfg.stream)

    def _shutdown(self) -> None:
        self.batches.closing = True
        self.doubt.kill_background()
        self.watcher.stop()
        self.batches.shutdown()
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

    # ------------------------------------------------------------------ the pump

    def _loop(self) -> Outcome:
        while True:
            now = time.monotonic()
            if self.stop_event.is_set():
                return self._drain_and_stop()
            self._handle_queue(self._wait_time(now))
            now = time.monotonic()
            self._maintain(now)
            self._register(self.watcher.promote(now, self.promote_slice))
            self.outcomes.enqueue(self.sched.release(now, self._still_failed))
            if self.gate.open:
                self.batches.dispatch(now, stopping=self.stop_event.is_set())
            if self.on_progress is not None:
                self.on_progress(self)
            self._publish(now)
            if self.on_written is not None and self.files.rec.writes:
                written, self.on_written = self.on_written, None
                written()
            if self.once and self.sched.drained(self._pending()):
                return Outcome.DRAINED if not self._undelivered() else Outcome.INCOMPLETE

    def _still_failed(self, rel: str) -> bool:
        known = self.files.get(rel)
        if known is None or known.state != FAILED:
            return False
        # In line from the moment it is due again, behind files that were ready before.
        known.since = time.monotonic()
        return True

    def _pending(self) -> Pending:
        return Pending(
            in_flight=len(self.batches.inflight),
            settling=len(self.watcher.tracker),
            in_doubt=bool(self.doubt.in_doubt),
            sweeping=self.doubt.sweeping,
        )

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
                self.watcher.on_file(entry[1], entry[2], now)
            elif kind == "dir":
                delivered = self.watcher.on_dir(entry[1], moved_in=entry[2], now=now)
                if delivered:
                    self.outcomes.hold(delivered)
            elif kind == "result":
                self.batches.on_result(entry[1])
            elif kind == "checkpoint":
                self.batches.on_checkpoint(*entry[1:])
            elif kind == "requirements":
                self.gate.answer(entry[1], entry[2])
            elif kind == "probe":
                self._on_probe(entry[1])
            elif kind == "swept":
                self.slots.swept(self.doubt.on_swept(entry[1], entry[2]))
            elif kind == "listed":
                self._on_listed(entry[1], entry[2], entry[3])
            elif kind == "rescan":
                log.info("rescan requested")
                self.watcher.rescan_soon()
                self.sync_requested = True

    def _wait_time(self, now: float) -> float:
        deadlines = [self.watcher.next_scan, now + 1.0, *self.sched.deadlines()]
        due = self.watcher.tracker.next_due()
        if due is not None:
            deadlines.append(due)
        return max(0.0, min(deadlines) - now)

    def _publish(self, now: float, *, force: bool = False) -> None:
        """The daemon's state for ``hdfmgr status``: on a change (at most once a second) and
        every 10 s as a heartbeat (its age tells a loop that is blocked)."""
        if not force and now - self.published_at < (1.0 if self.slots.changed else 10.0):
            return
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
                "breaker": self.sched.breaker.state.value,
                "waiting": len(self.sched.ready) + len(self.watcher.tracker),
                "slots": self.slots.published(),
            },
        )

    def waiting(self) -> tuple[int, int]:
        """Files (and bytes) known and not yet delivered, plus those still settling."""
        files, nbytes = self.files.waiting()
        return files + len(self.watcher.tracker), nbytes

    def _undelivered(self) -> list[str]:
        return self.files.undelivered()

    def _drain_and_stop(self) -> Outcome:
        sdnotify.notify("STOPPING=1")
        if self.batches.inflight:
            log.info(
                "stopping: waiting for %d batch(es) in flight (at most %.0f s)",
                len(self.batches.inflight),
                self.cfg.timeout,
            )
        while self.batches.inflight:
            self._handle_queue(1.0)
        log.info(
            "stopped: %d files delivered (%.1f MB) in %d batches this run",
            self.counters.delivered,
            self.counters.bytes / 1e6,
            self.counters.batches,
        )
        return Outcome.STOPPED

    # ------------------------------------------------------------------ timers

    def _maintain(self, now: float) -> None:
        self.watcher.check_buffer()
        if self.watcher.scan_due(now):
            self._scan()
        if self.watcher.prune_due(now):
            self.doubt.sweep()
            self.watcher.prune()
        if self.doubt.due(now):
            self.doubt.start_listing()
        if self.gate.due(now):
            self.gate.ask()
        breaker = self.sched.breaker
        if breaker.probe_due(now) and not self.batches.inflight:
            breaker.start_probe()
            self.batches.executor.submit(lambda: self.queue.put(("probe", self.endpoint.probe())))

    def _scan(self) -> None:
        if self.sync_requested:
            # Files an operator re-queued ('hdfmgr retry') go out now.
            self.sync_requested = False
            self.outcomes.enqueue(self.files.requeued(time.monotonic()))
        found = self.watcher.scan(self.sched.ready.__contains__)
        if found.vanished:
            self.files.vanished(found.vanished)
            for rel in found.vanished:
                log.warning("%r vanished from the buffer before it was delivered (quarantined)", rel)
        self.files.forget(found.gone_tombstones)
        if found.delivered:
            self.outcomes.hold(found.delivered)

    def _on_probe(self, result: CommandResult) -> None:
        breaker = self.sched.breaker
        if result.ok:
            if breaker.record_success():
                log.warning("endpoint reachable again; resuming dispatch")
            self._endpoint_back()
        else:
            breaker.probe_failed(time.monotonic(), jitter=self.sched.rng.random())
            log.debug("probe failed: %s", result.describe())
        self._breaker_changed(breaker.state.value)

    def _breaker_changed(self, state: str) -> None:
        if self.on_breaker is not None:
            self.on_breaker(self.cfg.name, state)

    def _endpoint_back(self) -> None:
        """After an outage, files that backed off because of it go out now, not in 10 min,
        and staging is listed at once."""
        now = time.monotonic()
        self.slots.all_dirty()
        self.sched.endpoint_back(now)
        self.doubt.hurry(now)
        self.gate.hurry(now)

    def _register(self, items: list[tuple[str, Snapshot]]) -> None:
        if not items:
            return
        registered = self.files.register(items, time.monotonic(), self.sched.ready)
        for rel in registered.retired:
            log.warning("%r: %s", rel, "replaced in the buffer by a new version after delivery")
        self.outcomes.enqueue(registered.ready)
        if registered.settled:
            self.outcomes.hold(registered.settled, proven=True)

    def _on_listed(self, dirs: list[str], result: CommandResult, present: Listing | None) -> None:
        decided = self.doubt.on_listed(dirs, result, present)
        if not isinstance(decided, Decided):
            self.slots.listing_failed(decided)
            return
        for staging_dir in decided.listed:
            self.slots.listed(staging_dir)
        self.outcomes.enqueue(decided.resend)
        if decided.moved:
            # Delivered, and first known to be now: counted in this run's totals.
            self.counters.delivered += len(decided.moved)
            self.counters.bytes += sum(self.files[rel].size for rel in decided.moved)
            self.outcomes.hold(decided.moved)


def run_pipeline(
    config: Config, *, once: bool, on_start: Callable[[Pipeline], None] | None = None
) -> Outcome:
    """Build and run a pipeline (the CLI's entry point)."""
    pipeline = Pipeline(config, once=once)
    if on_start is not None:
        on_start(pipeline)
    return pipeline.run()
