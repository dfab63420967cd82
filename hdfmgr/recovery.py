"""The reconciliation of files in doubt: start-up recovery, listings after a lost reply, sweeps.

State owned: the staging directories whose commit may have run without the daemon learning
what it did (each with its ``(file, batch)`` entries), and the one small state machine that
settles them::

    in doubt --(due)--> listing --(answer)--> decided (moved / sent again) --> sweep
                           \\--(no answer)--> in doubt, retried with backoff

plus the sweep of earlier runs' staging (at start-up it also prepares every slot, and
dispatch waits for it). Listings and sweeps are remote commands: each runs on a thread of its
own, so that a hung endpoint holds up neither the loop nor SIGTERM, and reports back on the
loop's queue. A file counts as delivered only on the evidence of its commit's receipt
(:func:`hdfmgr.endpoint.recovered`), never because it is gone from staging.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .db import State
from .endpoint import Endpoint
from .files import COMMITTED, COMMITTING, STAGING, FileTable, Loaded
from .holding import clean_copies, identity
from .replies import Listing, recovered
from .runner import CommandResult

log = logging.getLogger("hdfmgr")


@dataclass
class Decided:
    """What a listing, or a restart, proved: files to send again and files delivered."""

    resend: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)
    listed: list[str] = field(default_factory=list)  # staging directories listed


class Reconciler:
    """Files in doubt, and the remote commands that settle them."""

    def __init__(
        self,
        endpoint: Endpoint,
        files: FileTable,
        put: Callable[[tuple[Any, ...]], None],
        *,
        backoff: Callable[[int], float],
        retry_initial: float,
        slots: int,
    ) -> None:
        self.endpoint = endpoint
        self.files = files
        self.put = put
        self.backoff = backoff
        self.retry_initial = retry_initial
        self.slots = slots
        self.in_doubt: dict[str, list[tuple[str, int]]] = {}
        self.listing = False
        self.failures = 0  # listings failed in a row (said once, retried with backoff)
        self.next_listing = 0.0
        self.sweeping = False
        self.preparing = False  # the sweep creates the slot directories: no dispatch yet
        #: Process groups of the remote commands run off the loop, killed at shutdown.
        self.background_pids: set[int] = set()

    # ------------------------------------------------------------------ start-up

    def at_start(self, loaded: Loaded, buffer: str, holding: str) -> Decided:
        """Reconcile files that were in flight when the last run ended.

        STAGING: the mv never ran; send again. COMMITTING: the mv may have run: listed (the
        slot's receipt tells); if the endpoint cannot be asked, those files wait, untouched,
        until it can. COMMITTED: delivered; the caller moves them to holding.
        """
        rec = self.files.rec
        rec.close_interrupted_batches(time.time(), keep=loaded.committing)
        self._clean_holding_copies(buffer, holding)
        out = Decided()
        staging = self.files.in_state(STAGING)
        if staging:
            self.files.set_state(staging, State.READY, error="interrupted during transfer; sending again")
            out.resend = staging
            log.warning("recovered %d file(s) interrupted during transfer", len(staging))
        if loaded.committing:
            for batch_id, staging_dir in rec.staging_dirs(loaded.committing).items():
                for rel in loaded.committing[batch_id]:
                    self.in_doubt.setdefault(staging_dir, []).append((rel, batch_id))
            self.start_listing()
        out.moved = self.files.in_state(COMMITTED)
        if out.moved:
            log.info("moving %d already delivered file(s) to holding", len(out.moved))
        return out

    def _clean_holding_copies(self, buffer: str, holding: str) -> None:
        """Copies into holding (from another filesystem) that a killed run left: those of
        files that may be in the middle of a move stay, as evidence for the next hold."""
        try:
            dev = os.stat(buffer).st_dev
        except OSError:
            return
        keep = {
            identity(dev, self.files[rel].snapshot()) for rel in self.files.in_state(COMMITTING, COMMITTED)
        }
        removed = clean_copies(holding, keep)
        if removed:
            log.info("removed %d partial copies an earlier run left in holding", removed)

    # ------------------------------------------------------------------ lost replies

    def lost_reply(self, staging_dir: str, entries: list[tuple[str, int]], now: float) -> None:
        """A commit ended without its whole answer: list its slot later, not at once (a
        remote script that outlived its ssh may still be moving files)."""
        self.in_doubt.setdefault(staging_dir, []).extend(entries)
        self.next_listing = now + self.retry_initial

    def due(self, now: float) -> bool:
        return bool(self.in_doubt) and now >= self.next_listing

    def hurry(self, now: float) -> None:
        """The endpoint answers again: list at once."""
        self.next_listing = min(self.next_listing, now)

    def start_listing(self) -> None:
        """List the slot directories of files whose commit may have run, off the loop."""
        if self.listing:
            return
        self.listing = True
        dirs = sorted(self.in_doubt)
        # Every batch whose outcome this listing decides is fenced off: should its commit
        # script start only now, it must move nothing (hdfmgr/remote/commit.sh).
        fences = {d: max(batch for _, batch in self.in_doubt[d]) for d in dirs}

        def listing(started: Callable[[int], None]) -> tuple[Any, ...]:
            return ("listed", dirs, *self.endpoint.list_slots(dirs, on_start=started, fences=fences))

        self.in_background("hdfmgr-list", listing)

    def on_listed(self, dirs: list[str], result: CommandResult, present: Listing | None) -> Decided | str:
        """Apply a listing's answer: what it proved, or (a string) why it proved nothing."""
        self.listing = False
        waiting = sum(len(self.in_doubt.get(d, ())) for d in dirs)
        if present is None:
            self.failures += 1
            delay = self.backoff(self.failures)
            self.next_listing = time.monotonic() + delay
            log.log(
                logging.WARNING if self.failures == 1 else logging.DEBUG,
                "cannot check staging for %d file(s) whose commit may have run (%s); will retry",
                waiting,
                result.describe(),
            )
            return (
                f"commit reply lost; {self.failures} listing(s) of its staging directory failed "
                f"({result.describe()}), next in {delay:.0f} s"
            )
        self.failures = 0
        out = Decided(listed=list(dirs))
        by_batch: dict[int, tuple[list[int], list[int]]] = {}
        for staging_dir in dirs:
            entries = self.in_doubt.pop(staging_dir, [])
            decided = recovered(entries, present.get(staging_dir), present.receipts.get(staging_dir))
            out.moved += decided.moved
            out.resend += decided.resend
            for rel in decided.unknown:
                log.warning(
                    "%r left staging with no receipt of its move (deleted there by someone else, "
                    "or its commit never ran): sending it again, it may arrive twice",
                    rel,
                )
            delivered = set(decided.moved)
            for rel, batch in entries:
                outcome = by_batch.setdefault(batch, ([], []))
                outcome[0 if rel in delivered else 1].append(self.files[rel].id)
        # The batches and attempts learn what the listing proved (a restart left them running).
        self.files.rec.close_listed_batches(by_batch, time.time())
        if out.resend:
            self.files.set_state(out.resend, State.READY, error="interrupted before the move; sending again")
        if out.moved:
            self.files.set_state(out.moved, State.COMMITTED, error=None)
        log.warning(
            "recovered %d file(s) interrupted while committing: %d had been delivered, %d will be sent again",
            len(out.resend) + len(out.moved),
            len(out.moved),
            len(out.resend),
        )
        self.sweep()
        return out

    # ------------------------------------------------------------------ sweeps

    def sweep(self, *, prepare: bool = False) -> None:
        """Clean up earlier runs' staging, off the loop; with ``prepare`` also create every
        slot directory (dispatch waits for it: the first batches then need no remote command
        but their own two)."""
        if self.in_doubt or self.sweeping:
            return  # their slot directories are the evidence; sweep after the listing
        slots = [self.endpoint.slot_dir(slot) for slot in range(self.slots)] if prepare else []
        self.sweeping = True
        self.preparing = prepare

        def sweep(started: Callable[[int], None]) -> tuple[Any, ...]:
            return ("swept", len(slots), self.endpoint.sweep(slots, on_start=started))

        self.in_background("hdfmgr-sweep", sweep)

    def on_swept(self, prepared: int, result: CommandResult) -> int:
        """The number of slot directories the sweep created (0 when it failed)."""
        self.sweeping = self.preparing = False
        if not result.ok:
            log.warning("could not clean old staging directories: %s", result.describe())
            return 0
        return prepared

    # ------------------------------------------------------------------ threads

    def in_background(self, name: str, command: Callable[[Callable[[int], None]], tuple[Any, ...]]) -> None:
        """Run a remote command on a thread; its answer comes back on the queue. ``command``
        gets the callback that records its process group, so that shutdown can kill it."""
        pids: list[int] = []

        def started(pid: int) -> None:
            pids.append(pid)
            self.background_pids.add(pid)

        def run() -> None:
            try:
                message = command(started)
            finally:
                self.background_pids.difference_update(pids)
            self.put(message)

        threading.Thread(target=run, name=name, daemon=True).start()

    def kill_background(self) -> None:
        """Read-only or housekeeping: a sweep or listing still running (a hung endpoint) must
        not outlive the daemon."""
        for pid in list(self.background_pids):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
