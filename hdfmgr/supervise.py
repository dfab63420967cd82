"""Keep the watcher delivering through database failures.

A failed statement (a full disk, a PostgreSQL restart, a lock held past the busy timeout) ends
a pipeline's run the way a crash would, but safely: no commit starts after it, and the records
on disk are whole, since each write is one transaction (see ``Pipeline.run``). A fresh pipeline
resumes every file from those records, exactly as after a kill -9. So instead of exiting and
counting on a service manager, the watcher waits, with a growing pause, and starts a fresh one.
The log gets one line when the failure starts and one when writes succeed again.

State owned: the episode of database failure (since when, whether it was said), across the
fresh pipelines it starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from . import sdnotify
from .db import DatabaseFailure, DatabaseUnresponsive
from .pipeline import Outcome, Pipeline

log = logging.getLogger("hdfmgr")

#: The longest pause between two attempts, whatever general.retry_max says: a database that
#: is back should not wait ten minutes for the daemon to notice.
MAX_PAUSE = 60.0


def watch(
    make: Callable[[], Pipeline],
    stop: threading.Event,
    *,
    location: str,
    initial: float,
    maximum: float = MAX_PAUSE,
) -> Outcome:
    """Run pipelines from ``make`` until one ends normally or ``stop`` is set.

    ``make`` must build each pipeline with ``stop`` as its stop event, so that SIGTERM also
    ends a pause. A failure while stopping is raised: the operator asked the daemon to go.
    """
    failing_since: float | None = None
    announced = False  # a 'started:' line is in the log: restarts need not repeat it
    pause = initial
    while True:
        pipeline = make()
        if failing_since is not None:
            pipeline.quiet_start = announced
            pipeline.on_written = _announce_back(location, failing_since)
        try:
            return pipeline.run()
        except DatabaseFailure as exc:
            announced = announced or pipeline.announced
            if stop.is_set():
                raise
            if failing_since is None or pipeline.on_written is None:
                # A new episode: none yet, or the last restart had written before failing again.
                failing_since = time.monotonic()
                pause = initial
                how = "did not answer in time" if isinstance(exc, DatabaseUnresponsive) else "failed"
                log.error(
                    "database %s %s: %s; delivery paused (files in flight resume from the records), retrying",
                    location,
                    how,
                    exc,
                )
            else:
                log.debug("database %s still failing: %s", location, exc)
            sdnotify.notify(f"STATUS=database failed: {exc}; retrying")
        if stop.wait(pause):
            return Outcome.STOPPED
        pause = min(pause * 2, maximum)


def _announce_back(location: str, since: float) -> Callable[[], None]:
    def back() -> None:
        elapsed = time.monotonic() - since
        log.info("database %s: writes succeed again after %.0f s; delivering", location, elapsed)

    return back
