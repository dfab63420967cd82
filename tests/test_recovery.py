"""Deterministic kills at the two instants that matter most, then the restart's reconciliation.

The remote command is wrapped so that it parks (sleeps) right before or right after the real
verify-and-mv script, only while a flag file exists; the test kills the daemon's whole session
there, removes the flag and restarts.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.site import Consumer, Site, content, slow_mv, wait_for


def parked_remote(tmp_path: Path, when: str) -> tuple[str, Path, Path]:
    """A remote command that parks before or after the commit script while ``flag`` exists."""
    flag = tmp_path / "park"
    parked = tmp_path / "parked"
    script = tmp_path / "remote"
    run = 'sh -c "$1"; rc=$?'
    park = f'if [ -e {flag} ] && echo "$1" | grep -q "hdfmgr-commit"; then touch {parked}; sleep 60; fi'
    body = f"{park}\n{run}\nexit $rc\n" if when == "before" else f"{run}\n{park}\nexit $rc\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return f"{script} {{command}}", flag, parked


@pytest.mark.parametrize("when", ["before", "after"])
def test_kill_during_commit_is_reconciled_without_loss_or_duplicate(tmp_path: Path, when: str) -> None:
    site = Site(tmp_path / "site")
    remote, flag, parked = parked_remote(tmp_path, when)
    site.configure(remote=remote, num_threads=1)
    names = [f"d/f{i}.fits" for i in range(5)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    try:
        flag.touch()
        daemon = site.start()
        for rel in names:
            site.write(rel, content(rel))
        wait_for(parked.exists, 20, "the commit to park")
        states = set(site.states().values())
        assert "committing" in states, states  # recorded before the remote mv could run
        daemon.kill()
        flag.unlink()
        if when == "after":
            # The mv happened: the endpoint has them although the database says committing.
            wait_for(lambda: len(consumer.arrivals) >= 1, 10, "the first copies at the endpoint")
        daemon = site.start()
        try:
            wait_for(lambda: set(site.held()) == set(names), 30, "everything held after restart")
            wait_for(lambda: len(set(consumer.arrivals)) == len(names), 10, "consumer")
        finally:
            assert daemon.stop() == 0
    finally:
        consumer.stop_event.set()
        consumer.join(5)
    assert sorted(consumer.arrivals) == sorted(names), "each file must arrive exactly once"
    assert not consumer.bad
    log = daemon.output()
    assert "recovered" in log and "interrupted while committing" in log
    attempts = dict(site.query("select name, attempts from files"))
    if when == "after":
        # Recognised as delivered from the slot directory: never sent again.
        assert "had been delivered" in log
        assert set(attempts.values()) == {1}, attempts


def test_committing_files_wait_while_the_endpoint_cannot_be_asked(tmp_path: Path) -> None:
    """No guessing: with the endpoint unreachable at restart, in-doubt files are not resent."""
    site = Site(tmp_path / "site")
    remote, flag, parked = parked_remote(tmp_path, "after")
    down = tmp_path / "down"
    wrapper = tmp_path / "maybe-down"
    wrapper.write_text(
        f'#!/bin/sh\nif [ -e {down} ]; then echo "ssh: unreachable" >&2; exit 255; fi\nexec "$@"\n'
    )
    wrapper.chmod(0o755)
    site.configure(remote=f"{wrapper} {remote}", num_threads=1, retry_initial=0.2)
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    try:
        flag.touch()
        daemon = site.start()
        site.write("x.fits", content("x.fits"))
        wait_for(parked.exists, 20, "the commit to park")
        daemon.kill()
        flag.unlink()
        down.touch()
        daemon = site.start()
        try:

            def said() -> list[str]:
                return [line for line in daemon.output().splitlines() if "cannot check staging" in line]

            # Asked again and again (with backoff), said once at WARNING.
            wait_for(lambda: len(said()) >= 3, 20, "a deferred recovery, retried")
            assert sum(" WARNING " in line for line in said()) == 1, said()
            assert site.states()["x.fits"] == "committing"
            down.unlink()
            wait_for(lambda: site.states().get("x.fits") == "held", 20, "recovery once reachable")
        finally:
            assert daemon.stop() == 0
    finally:
        consumer.stop_event.set()
        consumer.join(5)
    assert consumer.arrivals == ["x.fits"]
    assert site.query("select attempts from files")[0][0] == 1
    assert os.listdir(site.buffer) == []


def test_a_file_held_but_not_recorded_is_found_in_holding(tmp_path: Path) -> None:
    """Killed between the move to holding and its record: the restart finds it by inode.

    The database is put back to that moment by hand (COMMITTED, no held_as) after a normal
    delivery; the restart must record HELD with the holding name, not 'vanished'.
    """
    site = Site(tmp_path / "site")
    site.configure()
    site.write("d/a.fits", content("d/a.fits"))
    site.write("d/b.fits", content("d/b.fits"))
    # A file already in holding under the same name: the delivered one went to a.fits.1.
    (site.holding / "d").mkdir(parents=True)
    (site.holding / "d" / "a.fits").write_bytes(b"an older version")
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert site.held() == {
        "d/a.fits": b"an older version",
        "d/a.fits.1": content("d/a.fits"),
        "d/b.fits": content("d/b.fits"),
    }
    site.query("update files set state = 'committed', held_as = null, held_at = null")
    assert set(site.states().values()) == {"committed"}
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    rows = site.query("select name, state, held_as, last_error from files order by name")
    assert rows == [
        ("d/a.fits", "held", "d/a.fits.1", None),
        ("d/b.fits", "held", "d/b.fits", None),
    ]
    assert "vanished" not in result.stderr


def replying_remote(tmp_path: Path, mode: str) -> tuple[str, Path]:
    """A remote command whose commit reply goes wrong once, while ``flag`` exists.

    ``after``: the script runs, then the connection drops (exit 255, as ssh) and the reply is
    lost. ``before``: the connection drops before the script runs. ``cut``: the reply stops
    after a few bytes. ``chatty``: every command's login shell prints text around the reply.
    """
    flag = tmp_path / "fault"
    run = 'sh -c "$1"'
    fault = {
        "after": f"{run} >/dev/null; exit 255",
        "before": "exit 255",
        "cut": f"{run} | head -c 24; exit 0",
    }
    script = tmp_path / "remote"
    if mode == "chatty":
        body = f'echo "Welcome to the facility"; {run}; rc=$?; echo "logout"; exit $rc\n'
    else:
        commit = 'echo "$1" | grep -q "hdfmgr-commit"'
        body = f"if [ -e {flag} ] && {commit}; then rm -f {flag}; {fault[mode]}; fi\nexec {run}\n"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return f"{script} {{command}}", flag


@pytest.mark.parametrize("mode", ["after", "before", "cut", "chatty"])
def test_a_lost_or_garbled_commit_reply_never_delivers_twice(tmp_path: Path, mode: str) -> None:
    """What the commit did is read from its framed reply or, if that is lost, from a listing of
    the slot directory: each file reaches the consumer exactly once, and only the files the
    script did not move are sent again."""
    site = Site(tmp_path / "site")
    remote, flag = replying_remote(tmp_path, mode)
    site.configure(remote=remote, num_threads=1)
    names = [f"d/f{i}.fits" for i in range(5)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    flag.touch()
    for rel in names:  # before the start: one batch, so that the fault hits all of them
        site.write(rel, content(rel))
    daemon = site.start()
    try:
        wait_for(lambda: set(site.held()) == set(names), 30, "everything held")
        wait_for(lambda: set(site.states().values()) == {"held"}, 10, "recorded as held")
        wait_for(lambda: len(consumer.arrivals) >= len(names), 10, "the consumer")
    finally:
        assert daemon.stop() == 0
        consumer.stop_event.set()
        consumer.join(5)
    assert sorted(consumer.arrivals) == sorted(names) and not consumer.bad
    assert not flag.exists() or mode == "chatty"
    assert f"stopped: {len(names)} files delivered" in daemon.output()  # however it was learnt
    attempts = {n for (n,) in site.query("select attempts from files")}
    output = daemon.output()
    if mode == "before":
        assert attempts == {2}  # nothing was moved: sent again
    else:
        assert attempts == {1}  # moved by the first commit: never sent again
    if mode == "chatty":
        assert "reply was lost" not in output and "failed" not in output
    else:
        assert output.count("the commit's reply was lost") == 1, output
        # The lost reply stays on record; the outcome is what the listing proved.
        lost = site.query("select outcome from attempts where error like 'commit reply lost%'")
        assert len(lost) == len(names)
        expected = "interrupted" if mode == "before" else "committed"
        assert {outcome for (outcome,) in lost} == {expected}
        assert not site.query("select id from attempts where outcome in ('unknown', 'running')")
    assert "Traceback" not in output


def test_a_copy_that_failed_verification_is_not_taken_for_delivered_when_the_reply_is_lost(
    tmp_path: Path,
) -> None:
    """Two faults at once: one staged copy arrives corrupt (the script sets it aside instead of
    moving it) and the commit's reply is lost. The listing that follows must not read the
    corrupt copy's absence from the slot as a delivery: it is sent again and arrives once."""
    site = Site(tmp_path / "site")
    remote, flag = replying_remote(tmp_path, "after")
    corrupt = tmp_path / "corrupt-once"
    transfer = tmp_path / "transfer"
    transfer.write_text(
        "#!/bin/sh\n"
        "for dest; do :; done\n"  # the last argument
        'cp "$@" || exit\n'
        f'if [ -e {corrupt} ]; then rm -f {corrupt}; printf extra >> "$dest/f2.fits"; fi\n'
    )
    transfer.chmod(0o755)
    site.configure(transfer=f"{transfer} {{batch}} {{dest}}", remote=remote, num_threads=1)
    names = [f"d/f{i}.fits" for i in range(5)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    flag.touch()
    corrupt.touch()
    for rel in names:
        site.write(rel, content(rel))
    daemon = site.start()
    try:
        wait_for(lambda: set(site.states().values()) == {"held"} and len(site.states()) == 5, 30, "all held")
        wait_for(lambda: len(consumer.arrivals) >= len(names), 10, "the consumer")
    finally:
        assert daemon.stop() == 0
        consumer.stop_event.set()
        consumer.join(5)
    assert not corrupt.exists() and not flag.exists()
    assert sorted(consumer.arrivals) == sorted(names) and not consumer.bad
    attempts = dict(site.query("select name, attempts from files"))
    assert attempts == {**{rel: 1 for rel in names}, "d/f2.fits": 2}


def test_a_hung_listing_after_a_lost_reply_does_not_hold_up_the_daemon(tmp_path: Path) -> None:
    """The listing runs off the loop: while it hangs, new files still go out through the other
    slot, SIGTERM still stops the daemon at once, and nothing is sent twice."""
    site = Site(tmp_path / "site")
    lost, hang, hanging = tmp_path / "lose-reply", tmp_path / "hang-listing", tmp_path / "hanging"
    script = tmp_path / "remote"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ -e {lost} ] && echo "$1" | grep -q "hdfmgr-commit"; then rm -f {lost}; sh -c "$1" >/dev/null; '
        "exit 255; fi\n"
        f'if [ -e {hang} ] && echo "$1" | grep -q "%h/%f"; then touch {hanging}; sleep 60; fi\n'
        'exec sh -c "$1"\n'
    )
    script.chmod(0o755)
    site.configure(remote=f"{script} {{command}}", num_threads=2)
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    lost.touch()
    hang.touch()
    site.write("a/first.fits", content("a/first.fits"))
    daemon = site.start()
    try:
        wait_for(lambda: "the commit's reply was lost" in daemon.output(), 20, "the lost reply")
        wait_for(lambda: "a/first.fits" in consumer.arrivals, 10, "the first copy at the endpoint")
        wait_for(hanging.exists, 10, "the listing to hang")
        site.write("b/second.fits", content("b/second.fits"))
        wait_for(lambda: site.states().get("b/second.fits") == "held", 20, "delivery meanwhile")
        assert site.states()["a/first.fits"] == "committing"
        started = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - started < 10
        hang.unlink()
        daemon = site.start()
        wait_for(lambda: site.states().get("a/first.fits") == "held", 20, "resolved after restart")
        assert daemon.stop() == 0
    finally:
        consumer.stop_event.set()
        consumer.join(5)
    assert sorted(consumer.arrivals) == ["a/first.fits", "b/second.fits"] and not consumer.bad
    assert site.held() == {"a/first.fits": content("a/first.fits"), "b/second.fits": content("b/second.fits")}


def run_with_a_cut_off_commit(
    tmp_path: Path, detached: str, until: Callable[[], bool] | None = None, **settings: Any
) -> tuple[Site, str]:
    """Five files, shared by the free slots (one batch each), the first commit losing its
    connection (exit 255, as ssh) while the remote script runs on by itself: ``detached`` is
    the shell line that starts it, with the remote command in "$1" and its input in a file,
    ``{saved}``. Returns once all are held (and ``until`` holds) and the daemon has stopped."""
    site = Site(tmp_path / "site")
    flag, saved = tmp_path / "cut-off", tmp_path / "stdin"
    script = tmp_path / "remote"
    script.write_text(
        "#!/bin/sh\n"
        # One commit is cut off: of two slots committing at once, the one that renames the flag.
        f'if echo "$1" | grep -q "hdfmgr-commit" && mv {flag} {flag}.taken 2>/dev/null; then cat > {saved}\n'
        f"  {detached.format(saved=saved)} &\n"
        '  echo "Connection to endpoint closed by remote host." >&2; exit 255; fi\n'
        'exec sh -c "$1"\n'
    )
    script.chmod(0o755)
    site.configure(remote=f"{script} {{command}}", retry_initial=0.2, **settings)
    names = [f"d/f{i}.fits" for i in range(5)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    flag.touch()
    for rel in names:  # before the start: one batch
        site.write(rel, content(rel))
    daemon = site.start()
    try:
        wait_for(lambda: set(site.states().values()) == {"held"}, 30, "all held")
        if until is not None:
            wait_for(until, 20, "the detached commit script to end")
        wait_for(lambda: len(consumer.arrivals) >= len(names), 10, "the consumer")
    finally:
        assert daemon.stop() == 0
        consumer.stop_event.set()
        consumer.join(5)
    assert not flag.exists(), "the commit was never cut off"
    assert sorted(consumer.arrivals) == sorted(names) and not consumer.bad
    return site, daemon.output()


def test_a_commit_cut_off_from_the_daemon_is_waited_for_before_its_slot_is_listed(tmp_path: Path) -> None:
    """Over ssh a commit can outlive its client: the connection drops (exit 255, no reply)
    while the script goes on moving files on the endpoint. Here it runs on, detached and
    slowed down (each ``mv`` waits a second), while the daemon lists the slot to learn what was
    moved. The listing waits for the slot's lock, so it sees every file moved: none is sent
    again, each arrives once."""
    shims = slow_mv(tmp_path / "shims", 1)
    detached = f'PATH={shims}:$PATH setsid sh -c "$1" < {{saved}} > /dev/null 2>&1'
    site, output = run_with_a_cut_off_commit(tmp_path, detached, num_threads=2)
    assert {n for (n,) in site.query("select attempts from files")} == {1}
    # Two free slots share the five files (3 + 2): the cut-off batch is one of them.
    cut_off = re.search(r"(\d+) had been delivered, 0 will be sent again", output)
    assert cut_off is not None and int(cut_off.group(1)) >= 1, output[-3000:]


def test_a_staged_copy_deleted_while_the_reply_is_lost_is_sent_again_never_held_undelivered(
    tmp_path: Path,
) -> None:
    """The commit's connection drops before its script runs (so it never does, and the
    listing fences it off), and a tmp cleaner deletes one staged copy meanwhile. Gone from
    staging is not delivered: with no receipt of its move, that file is sent again (a warning
    names it), and it arrives at the endpoint like the four left in the slot."""
    cleaner = f"find {tmp_path / 'site' / 'endpoint' / 'staging'} -name f2.fits -type f -delete; true"
    site, output = run_with_a_cut_off_commit(tmp_path, cleaner, num_threads=1)
    assert {n for (n,) in site.query("select attempts from files")} == {2}
    assert "0 had been delivered, 5 will be sent again" in output, output[-3000:]
    assert "'d/f2.fits' left staging with no receipt of its move" in output
    assert site.held() == {f"d/f{i}.fits": content(f"d/f{i}.fits") for i in range(5)}


def test_a_commit_that_starts_after_its_slot_was_listed_moves_nothing(tmp_path: Path) -> None:
    """The lock cannot wait for a commit whose remote shell has not started yet. Here the
    connection drops (exit 255) and the script starts only once the daemon has listed the slot
    and sent all five files again (they are in holding): the listing's fence stops it before
    it touches anything."""
    status, held = tmp_path / "late-status", tmp_path / "site" / "holding" / "d"
    wait = (
        f"i=0; until [ $(ls {held} 2>/dev/null | wc -l) -ge 5 ] || [ $i -ge 600 ]; "
        "do sleep 0.05; i=$((i+1)); done"
    )
    detached = (
        f'setsid sh -c \'{wait}; sh -c "$1" < "$2" > /dev/null 2> "$3.err"; echo $? > "$3"\' '
        f'late "$1" {{saved}} {status} < /dev/null > /dev/null 2>&1'
    )
    site, output = run_with_a_cut_off_commit(tmp_path, detached, status.exists, num_threads=1)
    late = (tmp_path / "late-status.err").read_text()
    assert status.read_text().strip() != "0" and "batch 1: too late" in late, late
    assert {n for (n,) in site.query("select attempts from files")} == {2}
    assert "0 had been delivered, 5 will be sent again" in output
