"""The logging options: SIZE and TIME rotation really rotate, SIGHUP reopens a moved file."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hdfmgr import config as config_mod
from hdfmgr import logs
from tests.site import Site, wait_for


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("hdfmgr")
    saved = (list(root.handlers), root.level, root.propagate, signal.getsignal(signal.SIGHUP))
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handlers, level, propagate, sighup = saved
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = propagate
    signal.signal(signal.SIGHUP, sighup)


def logging_config(tmp_path: Path, **options: object) -> config_mod.LoggingConfig:
    site = Site(tmp_path)
    site.configure(logging={"file": str(tmp_path / "hdfmgr.log"), **options})
    return config_mod.load(site.config_path).logging


def test_defaults_rotate_by_size(tmp_path: Path, restore_logging: None) -> None:
    handler = logs.setup(logging_config(tmp_path))
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 10 * 1024 * 1024 and handler.backupCount == 5  # both > 0: it rotates


def test_size_rotation_keeps_backup_count_files(tmp_path: Path, restore_logging: None) -> None:
    logs.setup(logging_config(tmp_path, maxbytes=2000, backup_count=2))
    log = logging.getLogger("hdfmgr.test")
    for i in range(300):
        log.info("line %03d %s", i, "x" * 40)
    names = sorted(p.name for p in tmp_path.glob("hdfmgr.log*"))
    assert names == ["hdfmgr.log", "hdfmgr.log.1", "hdfmgr.log.2"]
    for name in names:
        assert (tmp_path / name).stat().st_size <= 2000
    assert "line 299" in (tmp_path / "hdfmgr.log").read_text()


def test_time_rotation(tmp_path: Path, restore_logging: None) -> None:
    handler = logs.setup(logging_config(tmp_path, rotate="TIME", when="H", interval=6, backup_count=3))
    assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
    assert (handler.when, handler.interval, handler.backupCount) == ("H", 6 * 3600, 3)
    log = logging.getLogger("hdfmgr.test")
    log.info("before the rollover")
    handler.rolloverAt = int(time.time()) - 1  # the period is over (instead of waiting 6 h)
    log.info("after the rollover")
    rotated = list(tmp_path.glob("hdfmgr.log.*"))
    assert len(rotated) == 1 and "before the rollover" in rotated[0].read_text()
    assert (tmp_path / "hdfmgr.log").read_text().strip().endswith("after the rollover")
    assert handler.rolloverAt > time.time()


def test_sighup_reopens_in_process(tmp_path: Path, restore_logging: None) -> None:
    logs.setup(logging_config(tmp_path))
    log = logging.getLogger("hdfmgr.test")
    log.info("first")
    os.rename(tmp_path / "hdfmgr.log", tmp_path / "hdfmgr.log.old")
    log.info("second, still into the moved file")
    os.kill(os.getpid(), signal.SIGHUP)
    log.info("third, into a new file")
    assert "second" in (tmp_path / "hdfmgr.log.old").read_text()
    assert "third" not in (tmp_path / "hdfmgr.log.old").read_text()
    assert "third, into a new file" in (tmp_path / "hdfmgr.log").read_text()


def test_sighup_without_a_log_file_is_harmless(tmp_path: Path, restore_logging: None) -> None:
    site = Site(tmp_path)
    logs.setup(config_mod.load(site.config_path).logging)
    os.kill(os.getpid(), signal.SIGHUP)  # the default action would end this process


def test_daemon_reopens_its_log_on_sighup(tmp_path: Path) -> None:
    """logrotate's way: move the file away, SIGHUP, the next lines go to a new file."""
    site = Site(tmp_path)
    logfile = tmp_path / "log" / "hdfmgr.log"
    logfile.parent.mkdir()
    site.configure(logging={"file": str(logfile), "level": "INFO"})
    # Not Site.start: it watches stdout, and this daemon logs into the file.
    proc = subprocess.Popen(
        [sys.executable, "-m", "hdfmgr", "run", str(site.config_path)], cwd=tmp_path, start_new_session=True
    )
    try:
        wait_for(lambda: logfile.exists() and "started:" in logfile.read_text(), 30, "started")
        os.rename(logfile, logfile.with_suffix(".log.1"))
        os.kill(proc.pid, signal.SIGHUP)
        site.write("after.fits", b"a")
        wait_for(lambda: logfile.exists() and "delivered 1 file" in logfile.read_text(), 20, "a new log file")
        assert "delivered" not in logfile.with_suffix(".log.1").read_text()
        assert proc.poll() is None  # SIGHUP did not end it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
