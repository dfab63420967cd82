"""End to end with the local transport (``cp {batch} {dest}``, ``sh -c "{command}"``).

Each test runs the real daemon or the real rescan command against a throwaway site and asserts
what an operator would check: bytes in the endpoint buffer, files in holding, rows in the
database, exit statuses.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from tests.site import HOSTILE_NAMES, Site, session_members, wait_for


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def mixed_set() -> dict[str, bytes]:
    files = {
        "a/b/c/deep.fits": b"deep" * 1000,
        "a/sibling.fits": b"sibling",
        "empty.fits": b"",
        "big.fits": os.urandom(5 * 1024 * 1024),
    }
    for i, name in enumerate(HOSTILE_NAMES):
        files[name] = f"hostile {i}".encode()
        files[f"dir with space/{name}"] = f"nested hostile {i}".encode()
    files[os.fsdecode(b"odd\xffdir") + "/x.fits"] = b"x"
    return files


def assert_no_command_ran(site: Site) -> None:
    pwned = [p for p in site.root.rglob("*PWNED*") if "PWNED" in p.name and not p.name.endswith(".fits")]
    assert not pwned, f"a filename was executed: {pwned}"


def test_rescan_delivers_mixed_set_verified_and_held(site: Site) -> None:
    site.configure(verify="checksum")
    files = mixed_set()
    site.write_many(files)

    result = site.hdfmgr("rescan", str(site.config_path))

    assert result.returncode == 0, result.stderr
    assert "0 undelivered" in result.stdout
    assert site.delivered() == files
    assert site.held() == files
    assert site.waiting() == {}
    assert_no_command_ran(site)
    rows = site.query("select relpath, state, checksum, size, held_as, committed_at from files")
    assert len(rows) == len(files)
    for relpath, state, checksum, size, held_as, committed_at in rows:
        rel = os.fsdecode(bytes(relpath))
        assert state == "held"
        assert checksum == hashlib.blake2b(files[rel]).hexdigest()
        assert size == len(files[rel])
        assert held_as is not None and committed_at is not None
    batches = site.query("select status, files, committed, command, transfer_seconds, rate from batches")
    assert batches and all(b[0] == "committed" for b in batches)
    assert sum(b[2] for b in batches) == len(files)
    assert all("cp " in b[3] for b in batches)
    # Staging holds nothing but our (empty) slot directories.
    assert not [p for p in site.staging.rglob("*") if p.is_file() and not p.name.endswith(".receipt")]


def test_watch_delivers_new_files_and_stops_on_sigterm(site: Site) -> None:
    daemon = site.start()
    try:
        files = {f"night1/img{i:03d}.fits": os.urandom(2000 + i) for i in range(30)}
        site.write_many(files)
        wait_for(lambda: site.delivered() == files, 20, "delivery")
        wait_for(lambda: site.held() == files, 10, "holding")
        assert site.waiting() == {}
    finally:
        rc = daemon.stop()
    assert rc == 0, daemon.output()
    assert "stopped:" in daemon.output()
    assert set(site.states().values()) == {"held"}


def test_consumer_never_sees_a_partial_file(site: Site) -> None:
    """An endpoint manager that ingests each file the instant it appears gets only whole files."""
    expected = {f"img{i:02d}.fits": os.urandom(256 * 1024 + i) for i in range(40)}
    seen: dict[str, bytes] = {}
    bad: list[str] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set():
            for entry in os.scandir(site.ep_buffer):
                if entry.is_file():
                    data = Path(entry.path).read_bytes()
                    if data != expected.get(entry.name):
                        bad.append(entry.name)
                    seen[entry.name] = data
                    os.unlink(entry.path)  # ingested and removed, as the endpoint manager does

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    daemon = site.start()
    try:
        for rel, data in expected.items():
            # A camera that writes in several chunks through one open file.
            with open(site.buffer / rel, "wb") as f:
                for i in range(0, len(data), 64 * 1024):
                    f.write(data[i : i + 64 * 1024])
                    f.flush()
        try:
            wait_for(lambda: len(seen) == len(expected), 30, "consumer to ingest everything")
        except AssertionError:
            raise AssertionError(
                f"seen {len(seen)}/{len(expected)}; states {site.states()}\n{daemon.output()}"
            ) from None
        wait_for(lambda: site.held() == expected, 10, "holding")
    finally:
        done.set()
        consumer.join(5)
        daemon.stop()
    assert not bad, f"consumer saw partial or wrong files: {bad}"
    assert seen == expected


def test_slow_writer_is_not_shipped_half_written(site: Site) -> None:
    daemon = site.start()
    try:
        path = site.buffer / "slow.fits"
        with open(path, "wb") as f:
            for _ in range(6):
                f.write(b"x" * 1000)
                f.flush()
                # Longer than settle: only the close says the writer is done.
                time.sleep(0.15)
        wait_for(lambda: (site.ep_buffer / "slow.fits").exists(), 10, "delivery")
        assert (site.ep_buffer / "slow.fits").read_bytes() == b"x" * 6000
        assert site.query("select count(*) from files")[0][0] == 1
    finally:
        daemon.stop()


def test_directory_moved_in_and_created_directories_are_scanned(site: Site, tmp_path: Path) -> None:
    daemon = site.start()
    try:
        outside = tmp_path / "outside" / "run42"
        outside.mkdir(parents=True)
        moved = {f"run42/f{i}.fits": os.urandom(100) for i in range(20)}
        for rel, data in moved.items():
            (outside.parent / rel).write_bytes(data)
        os.rename(outside, site.buffer / "run42")
        # Files written quickly into a brand-new nested directory.
        fresh = {f"new/sub/dir/f{i}.fits": os.urandom(50) for i in range(20)}
        for rel, data in fresh.items():
            p = site.buffer / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        wait_for(lambda: site.delivered() == {**moved, **fresh}, 20, "delivery of moved-in and new dirs")
    finally:
        daemon.stop()


def test_exclude_list_and_symlinks_are_skipped(site: Site, tmp_path: Path) -> None:
    site.configure(exclude_list=[r"\.tmp$", r"^scratch/"])
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the buffer")
    site.write_many({"keep.fits": b"k", "partial.tmp": b"p", "scratch/x.fits": b"s"})
    os.symlink(secret, site.buffer / "link.fits")
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert site.delivered() == {"keep.fits": b"k"}
    assert "symbolic link" in result.stderr
    assert (site.buffer / "partial.tmp").exists() and (site.buffer / "scratch/x.fits").exists()


def test_holding_never_overwritten(site: Site) -> None:
    (site.holding / "d").mkdir()
    (site.holding / "d" / "same.fits").write_bytes(b"old")
    site.write("d/same.fits", b"new")
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert (site.holding / "d" / "same.fits").read_bytes() == b"old"
    assert (site.holding / "d" / "same.fits.1").read_bytes() == b"new"
    assert site.query("select held_as from files")[0][0] == "d/same.fits.1"


def test_failed_transfer_is_retried_and_recorded(site: Site) -> None:
    marker = site.root / "failed-once"
    site.configure(
        transfer='sh -c \'if [ ! -e "$0" ]; then touch "$0"; echo boom >&2; exit 3; fi; cp "$@"\' '
        "{marker} {batch} {dest}",
        params={"marker": str(marker)},
    )
    daemon = site.start()
    try:
        site.write("r.fits", b"retry me")
        wait_for(lambda: site.delivered() == {"r.fits": b"retry me"}, 20, "delivery after retry")
        wait_for(lambda: site.states().get("r.fits") == "held", 10, "held")
    finally:
        daemon.stop()
    batches = site.query("select status, returncode, stderr, error_class from batches order by id")
    assert batches[0][0] == "failed" and batches[0][1] == 3 and "boom" in batches[0][2]
    assert batches[0][3] == "remote"
    assert batches[-1][0] == "committed"
    assert site.query("select attempts from files")[0][0] == 2
    outcomes = site.query("select outcome from attempts order by id")
    assert [o[0] for o in outcomes] == ["failed", "committed"]


def test_hung_transfer_is_killed_whole_at_timeout(site: Site) -> None:
    site.configure(
        transfer="sh -c 'sleep 300 & sleep 300; cp \"$@\"' sh {batch} {dest}",
        timeout=1,
    )
    daemon = site.start()
    try:
        site.write("hang.fits", b"h")
        wait_for(
            lambda: site.query("select count(*) from batches where status = 'failed'")[0][0] >= 1,
            20,
            "a timed-out batch",
        )
        row = site.query("select returncode, error_class from batches order by id limit 1")[0]
        assert row == (124, "timeout")
    finally:
        # SIGTERM: the retry in flight is bounded by the same timeout, then the daemon exits.
        assert daemon.stop() == 0
    # Nothing of the killed groups is left behind (the backgrounded sleep included).
    wait_for(lambda: session_members(daemon.proc.pid) == [], 10, "children to be gone")
    assert site.states()["hang.fits"] == "failed"


def test_seed_walkthrough_help_initdb_run_and_kill15(site: Site) -> None:
    help_ = site.hdfmgr("--help")
    assert help_.returncode == 0 and "hdfmgr initdb CONFIG" in help_.stdout
    init = site.hdfmgr("initdb", "config.yaml")
    assert init.returncode == 0, init.stderr
    assert site.db_path.exists()
    daemon = site.start()
    site.write("seed.fits", b"seed")
    wait_for(lambda: site.held() == {"seed.fits": b"seed"}, 20, "seed file held")
    assert daemon.stop() == 0


def test_a_second_watcher_is_refused_and_rescan_delegates(site: Site) -> None:
    daemon = site.start()
    try:
        second = site.hdfmgr("run", str(site.config_path), timeout=30)
        assert second.returncode == 75
        assert "already running" in second.stderr
        # Files that appear while the watcher cannot see them (events are not lost here, but
        # the rescan must wait for whatever is waiting either way).
        site.write_many({f"r{i}.fits": b"r" for i in range(5)})
        rescan = site.hdfmgr("rescan", str(site.config_path), timeout=60)
        assert rescan.returncode == 0, rescan.stderr + rescan.stdout
        assert "asked it to rescan" in rescan.stdout
        assert site.waiting() == {}
    finally:
        daemon.stop()
    # Each file was sent once: one attempt per file.
    assert site.query("select max(attempts) from files")[0][0] == 1


def test_configuration_errors_exit_78_with_one_line(site: Site) -> None:
    missing = site.hdfmgr("run", "nope.yaml")
    assert missing.returncode == 78
    assert missing.stderr.strip().count("\n") == 0 and "nope.yaml" in missing.stderr
    site.configure(chunk_sise=3)
    typo = site.hdfmgr("run", str(site.config_path))
    assert typo.returncode == 78 and "general.chunk_sise" in typo.stderr
    assert "Traceback" not in typo.stderr


def test_restart_delivers_what_was_left(site: Site) -> None:
    site.write_many({f"x{i}.fits": b"x" * i for i in range(10)})
    result = site.hdfmgr("initdb", str(site.config_path))
    assert result.returncode == 0
    daemon = site.start()
    wait_for(lambda: len(site.delivered()) == 10, 20, "first ten")
    daemon.stop()
    site.write_many({f"y{i}.fits": b"y" * i for i in range(10)})
    daemon = site.start()
    try:
        wait_for(lambda: len(site.delivered()) == 20, 20, "all twenty")
    finally:
        daemon.stop()
    assert site.query("select max(attempts) from files")[0][0] == 1


def test_polling_observer_for_network_filesystems(site: Site) -> None:
    """general.observer: polling (NFS, GPFS): no close events, the stat rules decide."""
    site.configure(observer="polling")
    daemon = site.start()
    try:
        assert "polling observer" in daemon.output()
        files = {f"p/{i}.fits": os.urandom(300) for i in range(5)}
        site.write_many(files)
        wait_for(lambda: site.held() == files, 20, "delivery with the polling observer")
    finally:
        assert daemon.stop() == 0
