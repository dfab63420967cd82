"""The watcher's supervisor: database failures restart the pipeline, one log line per episode."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import pytest

from hdfmgr.db import DatabaseFailure
from hdfmgr.pipeline import Outcome
from hdfmgr.supervise import watch


class FakePipeline:
    """Runs one scripted step: 'fail' (after its 'started:' line), 'fail-early' (before it),
    'write-fail' (writes, then fails) or 'stop'."""

    def __init__(self, step: str, stop: threading.Event) -> None:
        self.step = step
        self.stop = stop
        self.quiet_start = False
        self.on_written: Callable[[], None] | None = None
        self.announced = False

    def run(self) -> Outcome:
        if self.step == "fail-early":
            raise DatabaseFailure("unable to open database file")
        self.announced = True
        if self.step == "write-fail":
            if self.on_written is not None:
                written, self.on_written = self.on_written, None
                written()
            raise DatabaseFailure("disk I/O error")
        if self.step == "fail":
            raise DatabaseFailure("database or disk is full")
        if self.step == "fail-while-stopping":
            self.stop.set()
            raise DatabaseFailure("database is locked")
        return Outcome.STOPPED


def supervise(steps: list[str], stop: threading.Event | None = None) -> tuple[Outcome, list[FakePipeline]]:
    stop = stop or threading.Event()
    made: list[FakePipeline] = []

    def make() -> FakePipeline:
        made.append(FakePipeline(steps[len(made)], stop))
        return made[-1]

    outcome = watch(make, stop, location="db", initial=0.001, maximum=0.004)  # type: ignore[arg-type]
    return outcome, made


def test_one_line_per_episode_and_a_line_when_writes_succeed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="hdfmgr")
    outcome, made = supervise(["fail", "fail", "fail", "write-fail", "fail", "ok"])
    assert outcome is Outcome.STOPPED
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    # The first failure, then a new episode after the restart that wrote before failing.
    assert errors == [
        "database db failed: database or disk is full; delivery paused (files in flight resume "
        "from the records), retrying",
        "database db failed: disk I/O error; delivery paused (files in flight resume from the "
        "records), retrying",
    ]
    backs = [r.getMessage() for r in caplog.records if "writes succeed again" in r.getMessage()]
    assert len(backs) == 1
    still = [r for r in caplog.records if "still failing" in r.getMessage()]
    assert len(still) == 3 and all(r.levelno == logging.DEBUG for r in still)
    # Restarts during an episode start quietly and report the first write.
    assert [p.quiet_start for p in made] == [False, True, True, True, True, True]


def test_a_restart_announces_itself_until_one_pipeline_has() -> None:
    # A database failing before the first 'started:' line (a full disk at start-up): the
    # operator still gets one 'started:' line at INFO, from the first pipeline that starts.
    _, made = supervise(["fail-early", "fail-early", "fail", "ok"])
    assert [p.quiet_start for p in made] == [False, False, False, True]


def test_a_stop_during_the_pause_ends_the_watch() -> None:
    stop = threading.Event()
    made: list[FakePipeline] = []

    def make() -> FakePipeline:
        made.append(FakePipeline("fail", stop))
        threading.Timer(0.05, stop.set).start()  # SIGTERM, as the signal handler does
        return made[-1]

    outcome = watch(make, stop, location="db", initial=30.0)  # type: ignore[arg-type]
    assert outcome is Outcome.STOPPED and len(made) == 1


def test_a_failure_while_stopping_is_raised() -> None:
    with pytest.raises(DatabaseFailure, match="locked"):
        supervise(["fail-while-stopping"])
