"""Faults: outages, full disks, read-only holding, a locked database, a replaced buffer, SIGTERM
under load. Each fault is injected with a real mechanism where this machine has one (tmpfs
mounts, SQLite locks) and with small wrapper commands otherwise. The daemon must stay up, log
one line per episode, and deliver everything once the fault clears.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.site import Site, wait_for


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def write_script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small real filesystem that can fill up or turn read-only (we are root here)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def fill(mount: Path) -> Path:
    """Fill ``mount`` to the last block with one file; returns it (unlink it to free the space)."""
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as f:
        for block in (65536, 4096, 512, 1):
            try:
                while True:
                    f.write(b"\0" * block)
            except OSError:
                pass
    return filler


def test_long_outage_one_line_per_episode_then_everything_delivered(site: Site, tmp_path: Path) -> None:
    """ssh exits 255 for a long stretch: the breaker opens once, probes, and closes once."""
    down = tmp_path / "endpoint-down"
    calls = tmp_path / "calls"
    fake_ssh = write_script(
        tmp_path / "fake-ssh",
        f'echo "$1" | head -c 20 >> {calls}; echo >> {calls}\n'
        f'if [ -e {down} ]; then echo "ssh: connect to host endpoint port 22: Connection refused" >&2; '
        "exit 255; fi\n"
        'exec sh -c "$1"\n',
    )
    fake_scp = write_script(
        tmp_path / "fake-scp",
        f'if [ -e {down} ]; then echo "ssh: connect to host endpoint port 22: Connection refused" >&2; '
        "exit 255; fi\n"
        'exec cp "$@"\n',
    )
    site.configure(
        transfer=f"{fake_scp} {{batch}} {{dest}}",
        remote=f"{fake_ssh} {{command}}",
        retry_initial=0.1,
        retry_max=0.4,
        breaker_threshold=2,
        num_threads=1,
    )
    daemon = site.start()
    # Down once the daemon has started (an endpoint down at start holds dispatch at the
    # start-up gate instead: tests/test_commit_holes.py).
    down.touch()
    try:
        files = {f"night/{i:03d}.fits": os.urandom(500) for i in range(40)}
        for rel, data in files.items():
            site.write(rel, data)
        # Let the outage last for several probe rounds.
        wait_for(lambda: calls.read_text().count("true") >= 4, 30, "several probes")
        assert site.delivered() == {}
        down.unlink()
        wait_for(lambda: site.delivered() == files, 30, "delivery after the outage")
        wait_for(lambda: site.held() == files, 10, "holding")
    finally:
        assert daemon.stop() == 0
    log = daemon.output()
    assert log.count("endpoint unreachable") == 1, log
    assert log.count("endpoint reachable again") == 1, log
    classes = {r[0] for r in site.query("select error_class from batches where status != 'committed'")}
    assert classes == {"transport"}
    assert {r[0] for r in site.query("select state from files")} == {"held"}


def test_endpoint_disk_full_then_space_freed(site: Site, tmpfs: Path) -> None:
    """A real ENOSPC at the endpoint: nothing partial is committed; delivered once space is back."""
    ep_buffer, staging = tmpfs / "buffer", tmpfs / "staging"
    ep_buffer.mkdir()
    staging.mkdir()
    site.ep_buffer, site.staging = ep_buffer, staging
    site.configure(verify="size", num_threads=1)
    big = os.urandom(3 * 1024 * 1024)
    site.write("big.fits", big)
    site.write("small.fits", b"s" * 100)
    daemon = site.start()
    try:
        wait_for(
            lambda: site.query("select count(*) from batches where stderr like '%No space left%'")[0][0] >= 1,
            20,
            "an ENOSPC failure",
        )
        assert not (ep_buffer / "big.fits").exists()
        remount(tmpfs, "size=20m")
        expected = {"big.fits": big, "small.fits": b"s" * 100}
        wait_for(lambda: site.files_under(ep_buffer) == expected, 30, "delivery after space was freed")
    finally:
        assert daemon.stop() == 0


def test_holding_full_then_space_freed(site: Site, tmpfs: Path) -> None:
    """Delivered files wait in the buffer (state committed) until holding works; never resent."""
    site.holding = tmpfs
    site.configure(pause=1)
    daemon = site.start()
    filler = fill(tmpfs)
    try:
        site.write("a/h.fits", os.urandom(200_000))
        wait_for(lambda: "a/h.fits" in site.delivered(), 20, "delivery")
        wait_for(lambda: site.states().get("a/h.fits") == "committed", 10, "committed state")
        assert (site.buffer / "a" / "h.fits").exists()
        assert not [p for p in tmpfs.rglob("*") if p.is_file() and p.name not in ("filler", ".hdfmgr.lock")]
        filler.unlink()
        wait_for(lambda: (tmpfs / "a" / "h.fits").exists(), 20, "holding after space was freed")
        wait_for(lambda: site.states().get("a/h.fits") == "held", 10, "held state")
    finally:
        assert daemon.stop() == 0
    assert site.query("select attempts from files")[0][0] == 1
    assert daemon.output().count("cannot move delivered files to holding") == 1


def test_database_locked_by_another_process(site: Site) -> None:
    site.hdfmgr("initdb", str(site.config_path))
    daemon = site.start()
    try:
        conn = sqlite3.connect(site.db_path, timeout=5, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        try:
            site.write("locked.fits", b"l")
            # The daemon is blocked on the lock (busy timeout), not dead.
            wait_for(lambda: (site.buffer / "locked.fits").exists(), 1)
            time.sleep(0.5)  # hold the lock a while: this is the fault, not a synchronisation
            assert daemon.proc.poll() is None
        finally:
            conn.execute("ROLLBACK")
            conn.close()
        wait_for(lambda: site.held() == {"locked.fits": b"l"}, 20, "delivery after unlock")
    finally:
        assert daemon.stop() == 0


def test_database_lock_held_past_the_timeout_pauses_then_resumes(site: Site) -> None:
    """A lock held longer than database.timeout fails a write: the watcher stays up, says so
    once, and delivers everything once the lock is gone."""
    site.configure(database={"timeout": 0.2})
    daemon = site.start()
    site.write("a/before.fits", b"b" * 100)
    wait_for(lambda: "a/before.fits" in site.held(), 20, "first delivery")
    conn = sqlite3.connect(site.db_path, timeout=5, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        site.write("a/during.fits", b"d" * 100)
        wait_for(lambda: "database is locked; delivery paused" in daemon.output(), 20, "the failure")
        time.sleep(1.0)  # hold the lock through several restarts: this is the fault
        assert daemon.proc.poll() is None
        assert "a/during.fits" not in site.delivered()
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    wait_for(lambda: site.states().get("a/during.fits") == "held", 20, "delivery after the lock")
    assert site.held() == {"a/before.fits": b"b" * 100, "a/during.fits": b"d" * 100}
    output = daemon.output()
    assert output.count("delivery paused") == 1
    assert "writes succeed again" in output
    assert "Traceback" not in output
    assert daemon.stop() == 0


def test_a_database_locked_at_start_up_delays_the_started_line_but_not_forever(site: Site) -> None:
    """The first pipeline fails before it could say 'started:'; the one that starts says it."""
    site.configure(database={"timeout": 0.2})
    site.hdfmgr("initdb", str(site.config_path))
    site.write("early.fits", b"e")
    conn = sqlite3.connect(site.db_path, timeout=5, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        daemon = site.start(wait=False)
        wait_for(lambda: "database is locked; delivery paused" in daemon.output(), 20, "the failure")
        assert daemon.proc.poll() is None
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    try:
        wait_for(lambda: "INFO hdfmgr: started:" in daemon.output(), 20, "the started line, at INFO")
        wait_for(lambda: site.held() == {"early.fits": b"e"}, 20, "delivery")
    finally:
        assert daemon.stop() == 0
    output = daemon.output()
    assert output.count("INFO hdfmgr: started:") == 1 and output.count("delivery paused") == 1, output
    assert "Traceback" not in output


def test_database_disk_full_then_space_freed(site: Site, tmpfs: Path) -> None:
    """A real ENOSPC under the database: nothing is lost or sent twice, one line, and every
    file is delivered and recorded once space is back."""
    site.db_path = tmpfs / "handoff.db"
    site.configure(pause=1)
    daemon = site.start()
    site.write("a/first.fits", b"1" * 1000)
    wait_for(lambda: site.states().get("a/first.fits") == "held", 20, "first delivery")
    filler = fill(tmpfs)
    files = {f"b/{i:03d}-{'x' * 60}.fits": os.urandom(2000) for i in range(100)}
    try:
        site.write_many(files)
        wait_for(lambda: "database or disk is full; delivery paused" in daemon.output(), 20, "the failure")
        assert daemon.proc.poll() is None
    finally:
        filler.unlink()
    expected = {"a/first.fits": b"1" * 1000, **files}
    wait_for(lambda: site.held() == expected, 30, "delivery after space was freed")
    wait_for(lambda: set(site.states().values()) == {"held"} and len(site.states()) == 101, 20, "records")
    assert site.delivered() == expected
    assert not list(site.staging.rglob("*.fits"))
    # Each file went into the endpoint buffer once: one committed attempt per file.
    committed = site.query(
        "select file_id, count(*) from attempts where outcome = 'committed' group by file_id"
    )
    assert sorted(n for _, n in committed) == [1] * 101
    output = daemon.output()
    assert output.count("delivery paused") == 1, output
    assert "Traceback" not in output
    assert daemon.stop() == 0


def test_rescan_with_a_failing_database_says_so_in_one_line(site: Site) -> None:
    site.configure(database={"timeout": 0.2})
    site.write("r.fits", b"r")
    site.hdfmgr("initdb", str(site.config_path))
    conn = sqlite3.connect(site.db_path, timeout=5, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        result = site.hdfmgr("rescan", str(site.config_path))
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert result.returncode == 74, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hdfmgr: database ")
    assert "database is locked" in result.stderr
    assert "Traceback" not in result.stderr
    assert (site.buffer / "r.fits").exists()
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert site.held() == {"r.fits": b"r"}


def test_buffer_removed_and_recreated(site: Site) -> None:
    daemon = site.start()
    try:
        site.write("before.fits", b"b")
        wait_for(lambda: site.delivered() == {"before.fits": b"b"}, 20, "first delivery")
        shutil.rmtree(site.buffer)
        site.buffer.mkdir()
        site.write("after/a.fits", b"a")
        wait_for(lambda: "after/a.fits" in site.delivered(), 20, "delivery into the recreated buffer")
        assert daemon.proc.poll() is None
    finally:
        assert daemon.stop() == 0


def test_sigterm_during_a_slow_transfer_finishes_it_and_resumes(site: Site) -> None:
    site.configure(transfer="sh -c 'sleep 1; cp \"$@\"' sh {batch} {dest}", timeout=10, num_threads=1)
    daemon = site.start()
    site.write("first.fits", b"1")
    wait_for(lambda: site.states().get("first.fits") == "staging", 10, "transfer in flight")
    for i in range(5):
        site.write(f"later{i}.fits", b"later")
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    # The batch in flight was finished and recorded; nothing was left half-way.
    assert site.states()["first.fits"] == "held"
    assert not any(state in ("staging", "committing") for state in site.states().values())
    daemon = site.start()
    try:
        wait_for(lambda: len(site.held()) == 6, 30, "the rest after restart")
    finally:
        daemon.stop()
    assert site.query("select max(attempts) from files")[0][0] == 1


def test_rescan_concurrent_with_watcher_never_sends_twice(site: Site) -> None:
    site.configure(transfer="sh -c 'sleep 0.2; cp \"$@\"' sh {batch} {dest}", chunk_size=5)
    daemon = site.start()
    results: list[subprocess.CompletedProcess[str]] = []
    try:
        for i in range(30):
            site.write(f"c/{i:02d}.fits", bytes([i]) * 100)
        threads = [
            threading.Thread(target=lambda: results.append(site.hdfmgr("rescan", str(site.config_path))))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        wait_for(lambda: len(site.held()) == 30, 30, "all held")
    finally:
        daemon.stop()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert site.query("select count(*) from files")[0][0] == 30
    assert site.query("select max(attempts) from files")[0][0] == 1
    assert site.query("select count(*) from attempts")[0][0] == 30


def test_a_file_that_keeps_failing_verification_is_quarantined_then_retried(
    site: Site, tmp_path: Path
) -> None:
    """Quarantine after quarantine_after attempts; `hdfmgr retry` sends it once fixed."""
    broken = tmp_path / "broken"
    corrupt = write_script(
        tmp_path / "corrupting-cp",
        'cp "$@" || exit 1\n'
        "for last; do :; done\n"
        f'if [ -e {broken} ] && [ -e "$last/bad.fits" ]; then printf X | dd of="$last/bad.fits" '
        "conv=notrunc status=none; fi\n",
    )
    site.configure(transfer=f"{corrupt} {{batch}} {{dest}}", quarantine_after=2, verify="checksum")
    broken.touch()
    daemon = site.start()
    try:
        site.write("bad.fits", b"good content")
        site.write("fine.fits", b"fine")
        wait_for(lambda: site.states().get("bad.fits") == "quarantined", 20, "quarantine")
        assert site.delivered() == {"fine.fits": b"fine"}
        assert (site.buffer / "bad.fits").exists()
        status = site.hdfmgr("status", str(site.config_path))
        assert "quarantined 1" in status.stdout, status.stdout
        broken.unlink()
        retry = site.hdfmgr("retry", str(site.config_path))
        assert retry.returncode == 0, retry.stdout + retry.stderr
        wait_for(lambda: site.states().get("bad.fits") == "held", 20, "delivery after retry")
        assert site.delivered()["bad.fits"] == b"good content"
    finally:
        assert daemon.stop() == 0
    assert daemon.output().count("quarantined after 2 attempts") == 1


def test_files_that_keep_failing_do_not_starve_new_ones(site: Site, tmp_path: Path) -> None:
    """A retried file queues from the moment it is due again, behind files already waiting.

    Ten files whose transfer always fails, retried every 0.05 s, one file per batch and one
    slot: that is enough to keep the slot busy with retries forever if a retry kept its
    original place in the queue. New files must still go out.
    """
    picky = write_script(
        tmp_path / "picky-cp",
        'for a; do case "$a" in *bad*) echo "refusing $a" >&2; exit 1;; esac; done\nexec cp "$@"\n',
    )
    site.configure(
        transfer=f"{picky} {{batch}} {{dest}}",
        chunk_size=1,
        num_threads=1,
        retry_initial=0.05,
        retry_max=0.05,
    )
    daemon = site.start()
    try:
        for i in range(10):
            site.write(f"bad/bad{i}.fits", b"x")
        retried = "select count(*) from files where name like 'bad/%' and attempts >= 2"
        wait_for(lambda: site.query(retried)[0][0] == 10, 20, "every bad file failed and retried")
        good = {f"good/g{i}.fits": f"good {i}".encode() for i in range(5)}
        site.write_many(good)
        wait_for(lambda: set(good) <= set(site.held()), 20, "the new files delivered")
        assert not any(rel.startswith("bad/") for rel in site.held())  # still being retried
    finally:
        assert daemon.stop() == 0


def test_a_hung_staging_sweep_does_not_outlive_the_daemon(site: Site, tmp_path: Path) -> None:
    """The start-up sweep runs on a thread of its own; at shutdown its process group ends."""
    pidfile = tmp_path / "sweep.pid"
    remote = write_script(
        tmp_path / "remote",
        f'case "$1" in *"-not -name"*) echo $$ > {pidfile}; exec sleep 300;; esac\nexec sh -c "$1"\n',
    )
    site.configure(remote=f"{remote} {{command}}")
    daemon = site.start()
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the sweep to hang")
        pid = int(pidfile.read_text())
        assert os.path.exists(f"/proc/{pid}")
    finally:
        assert daemon.stop() == 0
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the hung sweep to be ended")


#: Runs one hold of ``rel`` and dies like kill -9 (``os._exit``, no clean-up) at ``point``:
#: "copy": the copy into holding is written, not yet linked to its name; "link": it has its
#: name in holding, the original is still in the buffer.
CRASHING_HOLD = """
import os, sys
from hdfmgr import holding
buffer, held, rel, point = sys.argv[1:5]
real_link, real_unlink = os.link, os.unlink
linked = []
def link(src, dst, *args, **kwargs):
    copy = ".hdfmgr-tmp" in os.fsdecode(src)
    if copy and point == "copy":
        os._exit(9)
    real_link(src, dst, *args, **kwargs)
    if copy:
        linked.append(dst)
def unlink(path, *args, **kwargs):
    if linked and point == "link":
        os._exit(9)
    real_unlink(path, *args, **kwargs)
os.link, os.unlink = link, unlink
holding.hold(buffer, held, rel)
sys.exit(3)
"""


@pytest.mark.parametrize("point", ["copy", "link"])
def test_a_hold_across_filesystems_killed_midway_leaves_one_copy(site: Site, point: str) -> None:
    """Holding on another filesystem: a kill -9 inside the copy-then-link leaves no temporary
    file behind after the restart, and no second copy under a suffixed name."""
    holding = site.holding
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(holding)], check=True)
    try:
        data = os.urandom(300_000)
        site.configure(pause=1)
        daemon = site.start()
        filler = fill(holding)  # delivered, but it cannot be copied into holding: stays committed
        try:
            site.write("a/x.fits", data)
            wait_for(lambda: site.states().get("a/x.fits") == "committed", 20, "committed state")
        finally:
            assert daemon.stop() == 0
        filler.unlink()
        crash = subprocess.run(
            [sys.executable, "-c", CRASHING_HOLD, str(site.buffer), str(holding), "a/x.fits", point],
            capture_output=True,
            text=True,
        )
        assert crash.returncode == 9, crash.stderr
        result = site.hdfmgr("rescan", str(site.config_path))
        assert result.returncode == 0, result.stderr
        assert site.held() == {"a/x.fits": data}
        assert site.waiting() == {}
        assert site.query("select state, held_as, size from files") == [("held", "a/x.fits", len(data))]
    finally:
        subprocess.run(["umount", "-l", str(holding)], check=False)


class Arrivals(threading.Thread):
    """The endpoint manager: takes each file out of the endpoint buffer, keeping its bytes."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.seen: list[tuple[str, bytes]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            for path in self.root.rglob("*"):
                if path.is_file():
                    self.seen.append((str(path.relative_to(self.root)), path.read_bytes()))
                    path.unlink()
            self.stop_event.wait(0.01)

    def of(self, rel: str) -> list[bytes]:
        return [data for name, data in list(self.seen) if name == rel]


#: A writer that reopens its file after it was delivered: the remote command runs the commit,
#: then (once, when the file has arrived) starts a process that opens the buffer's file for
#: appending, waits until it has it open, and leaves it writing: a second later it appends
#: and closes.
REOPEN_AFTER_DELIVERY = """#!/bin/sh
sh -c "$1"
status=$?
if [ -e "{arm}" ] && [ -e "{arrived}" ]; then
    rm -f "{arm}"
    "{python}" -c '
import os, sys, time
f = open(sys.argv[1], "ab")
open(sys.argv[2], "w").close()
time.sleep(1.0)
f.write(b"HEADER")
f.close()
' "{path}" "{opened}" </dev/null >/dev/null 2>&1 &
    while [ ! -e "{opened}" ]; do sleep 0.01; done
fi
exit $status
"""


def test_a_file_reopened_for_writing_after_delivery_is_not_held_and_goes_again(
    site: Site, tmp_path: Path
) -> None:
    """Holding never moves a file that a writer has open: the writer's last bytes would land
    in holding, never be sent, and the database would record the first version as held."""
    arm, opened = tmp_path / "arm", tmp_path / "opened"
    arm.touch()
    path = site.buffer / "a" / "x.fits"
    arrived = site.ep_buffer / "a" / "x.fits"
    remote = tmp_path / "remote.sh"
    remote.write_text(
        REOPEN_AFTER_DELIVERY.format(
            arm=arm, arrived=arrived, python=sys.executable, path=path, opened=opened
        )
    )
    remote.chmod(0o755)
    site.configure(remote=f'{remote} "{{command}}"', pause=60)
    first = os.urandom(5000)
    daemon = site.start()
    try:
        site.write("a/x.fits", first)
        wait_for(opened.exists, 20, "the writer reopened the delivered file")
        consumer = Arrivals(site.ep_buffer)
        consumer.start()
        final = first + b"HEADER"
        wait_for(lambda: final in consumer.of("a/x.fits"), 20, "the version the writer finished")
        wait_for(lambda: site.held() == {"a/x.fits": final}, 20, "the finished version in holding")
        consumer.stop_event.set()
    finally:
        assert daemon.stop() == 0
    rows = site.query("select size, state, held_as from files order by id")
    assert rows[-1] == (len(final), "held", "a/x.fits")
    assert all(state == "held" for _, state, _ in rows)


#: Writes 1000 bytes every 3 s, six times, into a file it keeps open; says when two are in.
SLOW_WRITER = """
import sys, time
path, flag = sys.argv[1:3]
with open(path, "wb", buffering=0) as f:
    for i in range(6):
        f.write(bytes([65 + i]) * 1000)
        if i == 1:
            open(flag, "w").close()
        time.sleep(3)
"""


@pytest.fixture
def nobody_site() -> Iterator[tuple[Site, Path]]:
    """A site that the user nobody can reach: not under pytest's base directory, which every
    pytest session starting on this machine resets to mode 0700 (a writer running as nobody
    then loses its way mid-test)."""
    top = Path(tempfile.mkdtemp(prefix="hdfmgr-nobody-", dir="/tmp"))
    try:
        top.chmod(0o711)
        yield Site(top / "site"), top
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.mark.parametrize("stable_age", [2.0, 4.0])
def test_a_slow_writer_of_another_user_without_leases(
    nobody_site: tuple[Site, Path], stable_age: float
) -> None:
    """A writer running as nobody, a daemon without CAP_LEASE started in the middle of it: the
    kernel cannot say whether the file is still open. The file never moves to holding while it
    is written; the finished file is delivered and is the version held. With ``stable_age``
    longer than the writer's pauses, no fragment is sent at all."""
    site, tmp_path = nobody_site
    (site.buffer / "a").mkdir()
    os.chown(site.buffer / "a", 65534, 65534)
    flags = tmp_path / "flags"
    flags.mkdir(mode=0o777)
    flags.chmod(0o777)
    site.configure(stable_age=stable_age, settle=0.1, pause=60)
    consumer = Arrivals(site.ep_buffer)
    consumer.start()
    path = site.buffer / "a" / "slow.fits"
    writer = subprocess.Popen(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            SLOW_WRITER,
            str(path),
            str(flags / "two"),
        ]
    )
    try:
        wait_for((flags / "two").exists, 20, "the writer's second write")
        assert path.stat().st_uid == 65534
        daemon = site.start(wrap=["setpriv", "--inh-caps=-lease", "--bounding-set=-lease"])
        try:
            while writer.poll() is None:
                assert path.exists(), "moved to holding while the writer still had it open"
                time.sleep(0.05)
            assert writer.returncode == 0
            final = b"".join(bytes([65 + i]) * 1000 for i in range(6))
            wait_for(lambda: final in consumer.of("a/slow.fits"), 30, "the finished file delivered")
            wait_for(lambda: site.held() == {"a/slow.fits": final}, 30, "the finished file in holding")
        finally:
            consumer.stop_event.set()
            assert daemon.stop() == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    rows = site.query("select size, state, held_as from files order by id")
    assert rows[-1] == (6000, "held", "a/slow.fits")
    assert daemon.output().count("cannot tell whether a writer still has a file open") == 1
    if stable_age > 3:
        assert consumer.of("a/slow.fits") == [final], "a fragment was sent"


#: The transfer command, with an attacker beside it: just before the copy, the buffer's file is
#: moved away and its name made a symbolic link to a file only root may read.
SWAP_BEFORE_COPY = """#!/bin/sh
if [ -e "{arm}" ]; then
    rm -f "{arm}"
    mv "{path}" "{aside}"
    ln -s "{secret}" "{path}"
fi
for dest; do :; done
cp "$@"
if grep -rq TOPSECRET "$dest"; then touch "{leak}"; fi
"""


def test_a_symlink_swapped_in_during_the_transfer_is_never_followed(site: Site, tmp_path: Path) -> None:
    """The file sent is the file that was registered: a link swapped in for it is not followed
    (a root-only file must never reach staging), and the registered version is what arrives."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"TOPSECRET root-only\n")
    secret.chmod(0o600)
    arm, leak, aside = tmp_path / "arm", tmp_path / "leak", tmp_path / "aside"
    arm.touch()
    path = site.buffer / "a" / "x.fits"
    transfer = tmp_path / "transfer.sh"
    transfer.write_text(SWAP_BEFORE_COPY.format(arm=arm, path=path, aside=aside, secret=secret, leak=leak))
    transfer.chmod(0o755)
    site.configure(transfer=f"{transfer} {{batch}} {{dest}}", pause=1)
    data = os.urandom(4000)
    daemon = site.start()
    try:
        site.write("a/x.fits", data)
        wait_for(lambda: not arm.exists(), 20, "the transfer")
        finished = "select count(*) from batches where finished_at is not null"
        wait_for(lambda: site.query(finished)[0][0] >= 1, 20, "the batch's outcome")
        assert not leak.exists(), "the secret was copied into staging"
        wait_for(lambda: site.delivered() == {"a/x.fits": data}, 20, "the registered version delivered")
    finally:
        assert daemon.stop() == 0
    assert b"TOPSECRET" not in b"".join(site.files_under(site.root / "endpoint").values())
    # Delivered; the name in the buffer is now the link, which is never moved nor followed.
    assert site.query("select state, held_as from files") == [("held", None)]
    assert path.is_symlink() and site.held() == {}


#: The FITS pattern: write the file and close it, then half a second later reopen it (without
#: creating it) and rewrite its header in place.
HEADER_REWRITER = """
import os, sys, time
path, data = sys.argv[1], bytes.fromhex(sys.argv[2])
with open(path, "wb") as f:
    f.write(b"DRAFT---" + data)
time.sleep(0.5)
fd = os.open(path, os.O_WRONLY)  # fails if the file was moved away meanwhile
os.write(fd, b"FINAL---")
os.close(fd)
"""


def test_a_header_rewritten_after_the_close_with_the_recommended_settle(site: Site) -> None:
    """With ``settle`` longer than the writer's reopen gap (README, Settle): the draft is
    never sent, the writer's reopen finds its file, and the final version is sent once."""
    site.configure(settle=1.0)
    consumer = Arrivals(site.ep_buffer)
    consumer.start()
    daemon = site.start()
    data = os.urandom(3000)
    try:
        (site.buffer / "a").mkdir()
        writer = subprocess.run(
            [sys.executable, "-c", HEADER_REWRITER, str(site.buffer / "a" / "h.fits"), data.hex()],
            capture_output=True,
            text=True,
        )
        assert writer.returncode == 0, writer.stderr
        final = b"FINAL---" + data
        wait_for(lambda: site.held() == {"a/h.fits": final}, 20, "the final version in holding")
        wait_for(lambda: consumer.of("a/h.fits"), 10, "the delivery")
    finally:
        consumer.stop_event.set()
        assert daemon.stop() == 0
    assert consumer.of("a/h.fits") == [final]
    assert site.query("select size, state from files") == [(len(final), "held")]


PURGE_A_PIN = """#!/bin/sh
# Copies every file, then (once) removes the pin of victim.fits, as a purge of holding would.
n=$#; eval "dest=\\${{$n}}"; i=0
for f in "$@"; do
  i=$((i+1)); [ "$i" -eq "$n" ] && break
  cp -- "$f" "$dest"/ || exit 1
  case $f in */victim.fits) if [ -e {arm} ]; then rm -f -- "$f" {arm}; fi ;; esac
done
"""


def test_a_file_whose_pin_vanished_during_the_transfer_is_retried(site: Site, tmp_path: Path) -> None:
    """The transfer reports the file changed (its pin is gone), yet the buffer holds the very
    version that was registered: settling it again finds nothing new, so it must be retried
    (before, it stayed ``failed`` until the next start)."""
    arm = tmp_path / "arm"
    arm.touch()
    transfer = tmp_path / "transfer.sh"
    transfer.write_text(PURGE_A_PIN.format(arm=arm))
    transfer.chmod(0o755)
    site.configure(transfer=f"{transfer} {{batch}} {{dest}}", retry_initial=0.2, retry_max=1, pause=60)
    files = {"victim.fits": os.urandom(100), "other.fits": os.urandom(100)}
    daemon = site.start()
    try:
        site.write_many(files)
        wait_for(lambda: not arm.exists(), 20, "the pin removed")
        wait_for(lambda: site.delivered() == files, 20, "both delivered")
        wait_for(lambda: set(site.states().values()) == {"held"}, 20, "both held")
    finally:
        assert daemon.stop() == 0


#: A writer that appends in several open/close rounds: creates its file, then reopens it
#: (without creating it: it fails if the file was moved away meanwhile) four more times, 0.3 s
#: apart, appending a block each time.
ROUNDS_APPENDER = """
import os, sys, time
path = sys.argv[1]
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
for i in range(5):
    if i:
        time.sleep(0.3)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, bytes([65 + i]) * 1000)
    os.close(fd)
"""


def test_a_file_appended_in_several_open_close_rounds_with_the_recommended_settle(site: Site) -> None:
    """With ``settle`` above the writer's gap between a close and its next open (README,
    Settle): holding never moves the file from under the writer (every reopen finds it), only
    the finished file is sent, once, and it is the version held."""
    site.configure(settle=1.0, pause=60)
    consumer = Arrivals(site.ep_buffer)
    consumer.start()
    daemon = site.start()
    try:
        (site.buffer / "a").mkdir()
        writer = subprocess.run(
            [sys.executable, "-c", ROUNDS_APPENDER, str(site.buffer / "a" / "r.fits")],
            capture_output=True,
            text=True,
        )
        assert writer.returncode == 0, f"a reopen did not find its file: {writer.stderr}"
        final = b"".join(bytes([65 + i]) * 1000 for i in range(5))
        wait_for(lambda: site.held() == {"a/r.fits": final}, 20, "the finished file in holding")
        wait_for(lambda: consumer.of("a/r.fits"), 10, "the delivery")
    finally:
        consumer.stop_event.set()
        assert daemon.stop() == 0
    assert consumer.of("a/r.fits") == [final], [len(a) for a in consumer.of("a/r.fits")]
    assert site.query("select size, state, held_as from files") == [(len(final), "held", "a/r.fits")]


def test_a_file_appended_in_rounds_with_a_settle_shorter_than_the_gap(site: Site) -> None:
    """The trade-off README (Settle) documents: with ``settle`` shorter than the writer's gap,
    a round's version counts as finished, is sent, and moves to holding while the writer has
    it closed; the writer's next open then finds no file. What is held is always exactly a
    version that was sent (a prefix of what the writer meant to write), never a file moved
    while it was open or changed since it was sent."""
    site.configure(settle=0.05, pause=60)
    consumer = Arrivals(site.ep_buffer)
    consumer.start()
    daemon = site.start()
    try:
        (site.buffer / "a").mkdir()
        writer = subprocess.run(
            [sys.executable, "-c", ROUNDS_APPENDER, str(site.buffer / "a" / "r.fits")],
            capture_output=True,
            text=True,
        )
        assert writer.returncode == 0 or "FileNotFoundError" in writer.stderr, writer.stderr
        wait_for(lambda: site.held(), 20, "a version in holding")
        wait_for(lambda: site.waiting() == {}, 20, "the buffer emptied")
        wait_for(lambda: consumer.of("a/r.fits"), 10, "the delivery")
    finally:
        consumer.stop_event.set()
        assert daemon.stop() == 0
    final = b"".join(bytes([65 + i]) * 1000 for i in range(5))
    arrivals = consumer.of("a/r.fits")
    assert all(final.startswith(a) for a in arrivals), [len(a) for a in arrivals]
    assert site.held() == {"a/r.fits": arrivals[-1]}, "held something other than what was sent"
    assert site.query("select size, state, held_as from files order by id")[-1] == (
        len(arrivals[-1]),
        "held",
        "a/r.fits",
    )
