"""Keep flowing under faults: a flaky link, a file that breaks every batch it rides in, a slow
large file, an unreadable file. Each with a real daemon and small wrapper transfer commands."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
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


def counting_transfer(tmp_path: Path, *, fail: str, status: int = 255) -> tuple[str, Path]:
    """A ``cp`` that counts its calls in a file and fails with ``status`` when ``fail`` (a sh
    condition on the call number ``$n`` and the arguments) holds; 255 is a dropped connection."""
    count = tmp_path / "calls"
    count.write_text("0")
    script = write_script(
        tmp_path / "counting-cp",
        f"exec 9>>{count}.lock; flock 9\n"
        f"n=$(($(cat {count}) + 1)); echo $n > {count}; flock -u 9\n"
        f'if {fail}; then echo "connection reset by peer (call $n)" >&2; exit {status}; fi\n'
        'exec cp "$@"\n',
    )
    return script, count


def test_a_flaky_link_retries_batches_whole_and_a_visit_arrives_in_30_s(site: Site, tmp_path: Path) -> None:
    """2 of every 3 transfer calls fail: the failure is the link's, not the files'."""
    script, count = counting_transfer(tmp_path, fail="[ $((n % 3)) -ne 0 ]")
    site.configure(
        transfer=f"{script} {{batch}} {{dest}}",
        chunk_size=10,
        retry_initial=1.0,
        retry_max=600.0,
        quarantine_after=2,
    )
    daemon = site.start()
    names = {f"visit/img{i:04d}.fits": os.urandom(256 * 1024) for i in range(189)}  # 48 MB
    try:
        t0 = time.monotonic()
        site.write_many(names)
        wait_for(lambda: len(site.delivered()) == len(names), 30, "the whole visit at the endpoint")
        elapsed = time.monotonic() - t0
    finally:
        assert daemon.stop() == 0
    assert site.delivered() == names
    rows = site.query("select state, count(*) from files group by state")
    assert rows == [("held", 189)]
    calls = int(count.read_text())
    print(f"189 files over a link failing 2 calls in 3: {elapsed:.1f} s, {calls} transfer calls")
    # Batches were retried whole: nowhere near one call per file.
    assert calls < 100
    # No file was pinned: the link explained every failure.
    assert not site.query("select count(*) from files where last_error like '%on its own%'")[0][0]


def test_a_file_that_breaks_every_batch_is_isolated_by_bisection(site: Site, tmp_path: Path) -> None:
    """A healthy link, one file the transfer always fails on: the others go, it is pinned."""
    poisoned = 'case "$*" in *poison*) true ;; *) false ;; esac'
    script, _ = counting_transfer(tmp_path, fail=poisoned, status=23)
    site.configure(
        transfer=f"{script} {{batch}} {{dest}}", chunk_size=32, retry_initial=0.2, quarantine_after=3
    )
    daemon = site.start()
    names = {f"n{i:03d}.fits": f"{i}".encode() for i in range(64)}
    stop = threading.Event()

    def camera() -> None:
        """Other files keep arriving and getting through: the evidence against the culprit."""
        i = 0
        while not stop.wait(0.2):
            site.write(f"later{i:03d}.fits", b"l")
            i += 1

    writer = threading.Thread(target=camera, daemon=True)
    try:
        site.write_many({**names, "poison.fits": b"p"})
        writer.start()
        wait_for(lambda: names.items() <= site.delivered().items(), 30, "every other file delivered")
        wait_for(lambda: site.states().get("poison.fits") == "quarantined", 30, "the culprit pinned")
    finally:
        stop.set()
        assert daemon.stop() == 0
    error = site.query("select last_error from files where name = 'poison.fits'")[0][0]
    assert "alone" in error, error
    # Bisection, not singletons: the culprit rode in a handful of batches, not one per file.
    assert site.query("select attempts from files where name = 'poison.fits'")[0][0] < 15


def test_a_large_file_gets_time_in_proportion_to_its_bytes(site: Site, tmp_path: Path) -> None:
    """A transfer at 2 MB/s of an 8 MB file against a 2 s timeout: the deadline grows with
    its bytes (general.min_rate, MB/s)."""
    slow = write_script(
        tmp_path / "slow-cp",
        "for last; do :; done\nbytes=0\n"
        'for f; do [ "$f" = "$last" ] || bytes=$((bytes + $(stat -c %s "$f"))); done\n'
        'sleep $((bytes / 2000000)).$((bytes % 2000000 / 200000))\nexec cp "$@"\n',
    )
    site.configure(transfer=f"{slow} {{batch}} {{dest}}", timeout=2, min_rate=1.0, retry_initial=0.2)
    daemon = site.start()
    big = os.urandom(8 * 1000 * 1000)
    try:
        site.write("big.fits", big)
        wait_for(lambda: site.states().get("big.fits") == "held", 40, "the large file delivered")
    finally:
        assert daemon.stop() == 0
    assert site.query("select count(*) from batches where error_class = 'timeout'")[0][0] == 0


def test_a_file_that_keeps_timing_out_alone_is_reported(site: Site, tmp_path: Path) -> None:
    """Too slow even for the grown deadline, while small files flow: reported as such."""
    slow = write_script(
        tmp_path / "slow-cp",
        'case "$*" in *huge*) sleep 60 ;; esac\nexec cp "$@"\n',
    )
    site.configure(transfer=f"{slow} {{batch}} {{dest}}", timeout=1, min_rate=100.0, retry_initial=0.2)
    daemon = site.start()
    stop = threading.Event()
    try:
        site.write("huge.fits", b"h" * 1000)
        for i in range(8):  # the flow around it, one file every 0.3 s
            site.write(f"small{i}.fits", b"s")
            stop.wait(0.3)
        wait_for(lambda: "times out on its own" in daemon.output(), 40, "the report")
        smalls = {f"small{i}.fits": b"s" for i in range(8)}
        wait_for(lambda: smalls.items() <= site.delivered().items(), 20, "the small files delivered")
    finally:
        assert daemon.stop() == 0
    state, error_class, error = site.query(
        "select state, error_class, last_error from files where name = 'huge.fits'"
    )[0]
    assert "times out on its own" in error and error_class == "timeout", (state, error_class, error)
    assert "huge.fits" not in site.delivered()


def test_an_unreadable_file_is_quarantined_at_once_and_never_takes_a_batch_down(site: Site) -> None:
    """Mode 000; the daemon runs without the capabilities that let root read anything. One
    slot, room for all six files in one batch, and no file the daemon may take a lease on
    (owned by another user, no CAP_LEASE), so that all six settle by the same rule at the same
    moment: the unreadable one rides in the same batch as the others."""
    site.configure(quarantine_after=10, num_threads=1, chunk_size=10)
    files = {f"ok{i}.fits": f"{i}".encode() for i in range(5)}
    site.write_many(files)
    site.write("secret.fits", b"s")
    for name in [*files, "secret.fits"]:
        os.chown(site.buffer / name, 65534, 65534)
    os.chmod(site.buffer / "secret.fits", 0)
    rescan = subprocess.run(
        [
            *("setpriv", "--bounding-set", "-dac_override,-dac_read_search,-lease"),
            *(sys.executable, "-m", "hdfmgr", "rescan", str(site.config_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=site.root,
    )
    assert site.delivered() == files, rescan.stderr
    state, attempts, error = site.query(
        "select state, attempts, last_error from files where name = 'secret.fits'"
    )[0]
    assert (state, attempts) == ("quarantined", 1)
    assert "Permission denied" in error
    assert (site.buffer / "secret.fits").exists()
    # It shared the batch of the others and was left out of its transfer: that batch committed
    # every other file ("partial": 5 of its 6), and its attempt says why this one was not sent.
    rows = site.query(
        "select a.batch_id, f.name, a.outcome from attempts a join files f on f.id = a.file_id "
        "order by f.name"
    )
    assert [r[1:] for r in rows] == [
        *((f"ok{i}.fits", "committed") for i in range(5)),
        ("secret.fits", "unreadable"),
    ], rows
    assert site.query("select id, status, files, committed from batches") == [(rows[0][0], "partial", 6, 5)]


def test_batches_of_unreadable_files_are_no_evidence_that_the_link_works(site: Site, tmp_path: Path) -> None:
    """Every transfer fails for a reason that names no file (the link carries no data), while
    unreadable files keep arriving. Their batches never run a transfer, so they say nothing of
    the link: the waiting files must be retried whole, never split nor pinned on their own."""
    broken = tmp_path / "link-broken"
    broken.touch()
    script, _ = counting_transfer(tmp_path, fail=f"[ -e {broken} ]", status=12)
    site.configure(
        transfer=f"{script} {{batch}} {{dest}}",
        chunk_size=32,
        num_threads=1,
        retry_initial=0.2,
        retry_max=1.0,
    )
    names = {f"n{i:02d}.fits": f"{i}".encode() for i in range(8)}
    site.write_many(names)  # found by the start-up scan together: one batch of 8
    daemon = site.start(wrap=("setpriv", "--bounding-set", "-dac_override,-dac_read_search"))
    stop = threading.Event()

    def unreadable() -> None:
        i = 0
        while not stop.wait(0.2):
            os.chmod(site.write(f"secret{i:03d}.fits", b"s"), 0)
            i += 1

    def tries() -> int:
        return site.query("select max(attempts) from files where name like 'n%'")[0][0] or 0

    def pinned() -> list[tuple[str]]:
        return site.query("select name from files where name like 'n%' and last_error like '%on its own%'")

    writer = threading.Thread(target=unreadable, daemon=True)
    try:
        writer.start()
        # A dozen tries of the group, each failing: ample time for a split or a pin.
        wait_for(lambda: tries() >= 12 or pinned(), 60, "a dozen tries")
        stop.set()
        writer.join(5)
        assert not pinned()
        sizes = site.query(
            "select distinct b.files from batches b join attempts a on a.batch_id = b.id "
            "join files f on f.id = a.file_id where f.name like 'n%'"
        )
        assert sizes == [(len(names),)], sizes
        broken.unlink()
        wait_for(lambda: names.items() <= site.delivered().items(), 30, "every file once the link works")
    finally:
        stop.set()
        assert daemon.stop() == 0
