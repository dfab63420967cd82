"""The dispatcher: batches in flight, from the choice of their files to their report.

State owned: the batches in flight (one per busy slot) and the worker threads that run them,
and the argument budget a batch must fit (this host's limit, and the endpoint's once the
start-up probe told it). Workers run the commands of one batch each (:func:`hdfmgr.deliver.
deliver`); they never touch the database: the checkpoint before the remote ``mv`` and the
batch's report come back through the loop's queue, and are applied here on the loop's thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .batching import arg_budget
from .config import Config
from .deliver import BatchJob, BatchReport, deliver
from .detect import snapshot
from .endpoint import Endpoint, ErrorClass, StagedFile
from .files import FAILED, FileTable
from .holding import HoldResult, hold_delivered
from .outcomes import Outcomes
from .pin import slot_dir
from .recovery import Reconciler
from .schedule import Scheduler
from .settle import Snapshot
from .slots import SlotPool
from .watch import Watcher

log = logging.getLogger("hdfmgr")

#: Soft cap on the data of one batch: large files spread over the transfer slots (hashing and
#: copying in parallel) instead of queueing in one batch; small files are unaffected.
BATCH_BYTES = 256 * 1024 * 1024


class Dispatcher:
    """Starts batches on free slots and applies what they report."""

    def __init__(
        self,
        config: Config,
        endpoint: Endpoint,
        *,
        files: FileTable,
        scheduler: Scheduler,
        slots: SlotPool,
        doubt: Reconciler,
        watcher: Watcher,
        outcomes: Outcomes,
        put: Callable[[tuple[Any, ...]], None],
        pins: str,
    ) -> None:
        self.cfg = config
        self.endpoint = endpoint
        self.files = files
        self.sched = scheduler
        self.slots = slots
        self.doubt = doubt
        self.watcher = watcher
        self.outcomes = outcomes
        self.put = put
        self.pins = pins
        self.buffer = os.fspath(config.buffer)
        self.holding = os.fspath(config.holding)
        self.inflight: dict[int, Future[BatchReport]] = {}
        self.executor = ThreadPoolExecutor(config.num_threads + 1, thread_name_prefix="hdfmgr-worker")
        self.budget = arg_budget() - config.transfer.fixed_length() - len(endpoint.slot_dir(0)) - 64
        #: Set at shutdown: a worker waiting for its checkpoint gives up (nothing is moved).
        self.closing = False
        #: Called after an answer from an endpoint the breaker had given up on.
        self.on_endpoint_back: Callable[[], None] = lambda: None
        #: Called with the breaker's state after each batch (the metrics hook).
        self.on_breaker: Callable[[str], None] = lambda state: None

    def limit_arguments(self, endpoint_arg_max: int) -> None:
        """The endpoint's argument limit, as well as this host's: commands built from a batch
        (xargs on the endpoint included) then never have to be split."""
        self.budget = min(self.budget, endpoint_arg_max - 4096 - len(self.endpoint.slot_dir(0)))

    def shutdown(self) -> None:
        self.closing = True
        self.executor.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float, stopping: bool) -> None:
        """Fill every free slot, while there is something to send and the breaker allows."""
        while self.slots.free() and self.sched.may_dispatch() and not stopping:
            if not self.watcher.present or self.doubt.preparing:
                return
            if self.sched.next_is_group():
                group_id, group = self.sched.take_group()
                rels = [rel for rel in group.rels if rel in self.files and self.files[rel].state == FAILED]
                files, snaps = self._stage(rels, now)
                if not files:
                    self.sched.drop_group(group_id)
                    continue
                group.rels = [f.rel for f in files]
                self._start_batch(files, snaps, group=group_id)
                continue
            batch = self.sched.ready.take_batch(
                chunk_size=self.cfg.chunk_size,
                budget=self.budget,
                path_bytes=len(self.buffer) + 1,
                spread=True,
                max_bytes=BATCH_BYTES,
                slots=self.slots.free(),  # a visit goes over every free stream
            )
            files, snaps = self._stage([item.rel for item in batch], now)
            if files:
                self._start_batch(files, snaps)

    def _stage(self, rels: list[str], now: float) -> tuple[list[StagedFile], dict[str, Snapshot]]:
        """The files of a batch that are still the version registered (others settle again)."""
        files: list[StagedFile] = []
        snaps: dict[str, Snapshot] = {}
        for rel in rels:
            known = self.files.get(rel)
            if known is None:
                continue
            path = os.path.join(self.buffer, rel)
            snap = snapshot(path)
            if snap is None or not known.matches(snap):
                # Changed or gone since it settled: let it settle again (or vanish).
                if snap is not None:
                    self.watcher.recheck(rel, now, snap)
                continue
            files.append(StagedFile(rel, path, known.size))
            snaps[rel] = snap
        return (self.files.with_checksums(files) if files else files), snaps

    def _start_batch(
        self, files: list[StagedFile], snaps: dict[str, Snapshot], *, group: int | None = None
    ) -> None:
        slot = self.slots.take()
        staging_dir = self.endpoint.slot_dir(slot)
        wall = time.time()
        batch_id = self.files.start_batch(staging_dir, files, wall)
        job = BatchJob(
            id=batch_id,
            slot=slot,
            staging_dir=staging_dir,
            files=files,
            snapshots=snaps,
            # The stream's receive program creates the slot directory itself.
            prepare=not self.cfg.stream and self.slots.needs_prepare(slot),
            pin_dir=slot_dir(self.pins, slot),
        )
        if group is not None:
            self.sched.rides(batch_id, group)
        nbytes = sum(f.size for f in files)
        # prepare, transfer and commit each within their deadline
        due = wall + self.cfg.deadline(nbytes) + 2 * self.cfg.timeout
        self.slots.transfer(slot, batch=batch_id, files=len(files), nbytes=nbytes, due=due)
        self.inflight[batch_id] = self.executor.submit(self._deliver, job)

    # ------------------------------------------------------------------ worker threads

    def _deliver(self, job: BatchJob) -> None:
        """Worker thread: run the batch, hand the report to the loop."""
        self.put(("result", deliver(job, self.endpoint, self._checkpoint, self._hold_one)))

    def _hold_one(self, rel: str, sent: Snapshot) -> HoldResult:
        """Worker thread: one delivered file to holding (plain file-system calls, no state)."""
        return hold_delivered(self.buffer, self.holding, rel, sent, proven=False)

    def _checkpoint(self, job: BatchJob, files: list[StagedFile], checksums: dict[str, str]) -> bool:
        """Worker thread: have the loop record COMMITTING, and wait until it has."""
        ack = threading.Event()
        self.put(("checkpoint", job, [f.rel for f in files], checksums, ack))
        while not ack.wait(0.5):
            if self.closing:
                return False
        return True

    # ------------------------------------------------------------------ reports

    def on_checkpoint(
        self, job: BatchJob, rels: list[str], checksums: dict[str, str], ack: threading.Event
    ) -> None:
        """Record COMMITTING before the worker runs the remote mv: a restart must know."""
        self.files.committing(job.id, rels, checksums)
        checked = sum(self.files[rel].size for rel in rels) if self.cfg.verify == "checksum" else 0
        self.slots.committing(
            job.slot, batch=job.id, files=len(rels), due=time.time() + self.cfg.deadline(checked)
        )
        ack.set()

    def on_result(self, report: BatchReport) -> None:
        job = report.job
        self.inflight.pop(job.id, None)
        now = time.monotonic()
        if report.unknown:
            # Its slot directory is the evidence of what the lost commit did: out of use
            # until the listing, then cleaned.
            self.slots.suspend(
                job.slot,
                job.staging_dir,
                batch=job.id,
                files=len(report.unknown),
                reason=f"commit reply lost ({report.error}); out of use until a listing of its "
                "staging directory tells what the commit did",
            )
        else:
            self.slots.finished(
                job.slot, clean=report.slot_clean, prepared=report.prepare is not None and report.prepare.ok
            )
        self.outcomes.batch(report)
        if report.unknown:
            self.doubt.lost_reply(job.staging_dir, [(rel, job.id) for rel in report.unknown], now)
            log.warning(
                "batch %d: the commit's reply was lost (%s); %d file(s) may be in the endpoint "
                "buffer already: staging is checked before any is sent again",
                job.id,
                report.error,
                len(report.unknown),
            )
        self._judge_endpoint(report, now)

    def _judge_endpoint(self, report: BatchReport, now: float) -> None:
        """The breaker learns from every batch: transport failures open it, anything that
        got an answer closes it."""
        breaker = self.sched.breaker
        delivered = set(report.committed()) | set(report.unknown)
        failed = [f for f in report.job.files if f.rel not in delivered]
        transport = report.error_class in (ErrorClass.TRANSPORT, ErrorClass.TIMEOUT)
        troubled = bool(failed or report.unknown)
        if troubled:
            if transport and breaker.record_transport_failure(now, jitter=self.sched.rng.random()):
                log.error("endpoint unreachable (%s); pausing dispatch, probing with 'true'", report.error)
            elif failed and breaker.allows_dispatch():
                log.warning("batch %d: %d file(s) failed: %s", report.job.id, len(failed), report.error)
        if (not troubled or not transport) and breaker.record_success():
            log.warning("endpoint reachable again; resuming dispatch")
            self.on_endpoint_back()
        self.on_breaker(breaker.state.value)
