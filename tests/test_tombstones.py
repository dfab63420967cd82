"""Records that stay true across scans and restarts: quarantine sticks (one row, not one per
scan), and batches a restart finds in flight are closed with what the endpoint shows."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.site import Site, slow_mv, wait_for


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_quarantine_sticks_over_rescans_and_a_restart(site: Site, tmp_path: Path) -> None:
    corrupt = write_script(
        tmp_path / "corrupting-cp",
        'cp "$@" || exit 1\nfor last; do :; done\n'
        'if [ -e "$last/bad.fits" ]; then printf X | dd of="$last/bad.fits" conv=notrunc status=none; fi\n',
    )
    site.configure(transfer=f"{corrupt} {{batch}} {{dest}}", quarantine_after=2, pause=1, verify="checksum")
    rows = "select state from files where name = 'bad.fits'"
    daemon = site.start()
    try:
        site.write("bad.fits", b"good content")
        wait_for(lambda: site.query(rows) == [("quarantined",)], 20, "quarantine")
        scans = daemon.output().count("scan:")
        wait_for(lambda: daemon.output().count("scan:") >= scans + 5, 20, "five more rescans")
        assert site.query(rows) == [("quarantined",)]
    finally:
        assert daemon.stop() == 0
    daemon = site.start()
    try:
        scans = daemon.output().count("scan:")
        wait_for(lambda: daemon.output().count("scan:") >= scans + 3, 20, "rescans after a restart")
        assert site.query(rows) == [("quarantined",)]
        retry = site.hdfmgr("retry", str(site.config_path))
        assert retry.returncode == 0 and "1 file(s) re-queued" in retry.stdout, retry.stdout
        # Re-queued: tried again (still corrupted in transit), quarantined again, one row.
        wait_for(
            lambda: site.query("select attempts from files where name = 'bad.fits'")[0][0] >= 3, 20, "retried"
        )
        wait_for(lambda: site.query(rows) == [("quarantined",)], 20, "quarantined again")
    finally:
        assert daemon.stop() == 0
    assert daemon.output().count("quarantined after") == 1


def test_a_restart_closes_the_batches_it_finds_in_flight(site: Site, tmp_path: Path) -> None:
    """kill -9 while the commit's mv runs; the mv finishes: the listing proves delivery."""
    started = tmp_path / "mv-started"
    shims = slow_mv(tmp_path / "shims", 2, started)
    site.configure(num_threads=1)
    env = {"PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    daemon = site.start(env=env)
    site.write("a.fits", b"a")
    wait_for(started.exists, 20, "the commit's mv to start")
    os.kill(daemon.proc.pid, signal.SIGKILL)  # the daemon only: its commit goes on
    daemon.proc.wait(10)
    daemon.close()
    wait_for(lambda: site.delivered() == {"a.fits": b"a"}, 20, "the orphaned commit to finish")
    daemon = site.start()
    try:
        wait_for(lambda: site.states() == {"a.fits": "held"}, 20, "recovered as delivered")
    finally:
        assert daemon.stop() == 0
    assert site.query("select outcome from attempts") == [("committed",)]
    assert site.query("select status, committed from batches") == [("committed", 1)]


def test_a_restart_closes_a_batch_interrupted_during_its_transfer(site: Site, tmp_path: Path) -> None:
    started = tmp_path / "transfer-started"
    slow = write_script(tmp_path / "slow-cp", f'touch {started}\nsleep 30\nexec cp "$@"\n')
    site.configure(transfer=f"{slow} {{batch}} {{dest}}", num_threads=1)
    daemon = site.start()
    site.write("a.fits", b"a")
    wait_for(started.exists, 20, "the transfer to start")
    daemon.kill()
    site.configure(num_threads=1)
    daemon = site.start()
    try:
        wait_for(lambda: site.states() == {"a.fits": "held"}, 20, "sent again")
    finally:
        assert daemon.stop() == 0
    time.sleep(0)
    outcomes = site.query("select batch_id, outcome from attempts order by id")
    assert outcomes == [(1, "interrupted"), (2, "committed")]
    assert site.query("select status, committed from batches order by id") == [
        ("interrupted", 0),
        ("committed", 1),
    ]
