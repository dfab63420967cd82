"""``hdfmgr files``, ``show`` and ``retry``: the audit trail for people.

Queries run against SQLite and a real PostgreSQL (the ``engine`` fixture); the end-to-end tests
run the real daemon with the local transport.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hdfmgr import audit
from hdfmgr import db as dbm
from hdfmgr.db import FileRecord
from tests.audit_data import attempt, batch, file_row, insert_files, recording_site
from tests.site import HOSTILE_NAMES, Site, wait_for

FAILING = "sh -c 'echo nope: disk on fire >&2; exit 3' sh {batch} {dest}"


@pytest.fixture
def site(tmp_path: Path, engine: str | None) -> Iterator[Site]:
    with recording_site(tmp_path, engine) as made:
        yield made


@pytest.fixture
def local(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    site.configure(name="cam1")
    return site


# ---------------------------------------------------------------------------- pure helpers


def test_parse_since() -> None:
    now = 1_000_000.0
    assert audit.parse_since("90s", now=now) == now - 90
    assert audit.parse_since("30m", now=now) == now - 1800
    assert audit.parse_since("24h", now=now) == now - 86400
    assert audit.parse_since("2d", now=now) == now - 2 * 86400
    assert audit.parse_since("1w", now=now) == now - 604800
    assert audit.parse_since("15", now=now) == now - 15
    assert audit.parse_since("1.5h", now=now) == now - 5400
    assert audit.parse_since("2026-11-27") == dt.datetime(2026, 11, 27).timestamp()
    assert (
        audit.parse_since("2026-11-27T18:30:00+00:00")
        == dt.datetime(2026, 11, 27, 18, 30, tzinfo=dt.UTC).timestamp()
    )
    with pytest.raises(ValueError, match="neither an age"):
        audit.parse_since("yesterday")


NAMES = [
    "night1/img001.fits",
    "night1/img002.fits",
    "night1/imgA.fits",
    "night2/sub/img001.fits",
    "a.txt",
    "x[1].fits",
    "per%cent_under.fits",
    *HOSTILE_NAMES,
]
PATTERNS = [
    "*.fits",
    "night1/*",
    "night?/img00[12].fits",
    "*img[!0-9]*",
    "*/sub/*",
    "a.txt",
    "x[[]1].fits",
    "per%cent_*",
    "*\n*",
    "-*",
    "*$(*",
    "{dest}*",
    "*[*]*",
    "[",
    "*ünï*",
    "night1/img00?.fits",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_glob_to_regex_agrees_with_fnmatch(pattern: str) -> None:
    import re

    regex = re.compile(audit.glob_to_regex(pattern), re.DOTALL)
    for name in NAMES:
        assert bool(regex.search(name)) == fnmatch.fnmatchcase(name, pattern), (pattern, name)


def test_resolve_paths(tmp_path: Path) -> None:
    buffer, holding = tmp_path / "buffer", tmp_path / "holding"
    assert audit.resolve("a/b.fits", buffer=buffer, holding=holding) == ("a/b.fits", False)
    assert audit.resolve(str(buffer / "a/b.fits"), buffer=buffer, holding=holding) == ("a/b.fits", False)
    assert audit.resolve(str(holding / "a/b.fits.1"), buffer=buffer, holding=holding) == ("a/b.fits.1", True)
    with pytest.raises(ValueError, match="not inside"):
        audit.resolve("/elsewhere/x", buffer=buffer, holding=holding)


# ---------------------------------------------------------------------------- files (both engines)


def test_files_filters(site: Site) -> None:
    now = time.time()
    rows = [file_row("cam1", n, detected=now - 100 - i, committed=now - 50) for i, n in enumerate(NAMES)]
    rows.append(
        file_row(
            "cam1", "late.fits", state="failed", detected=now - 5, error_class="remote", last_error="boom"
        )
    )
    rows.append(file_row("cam1", "ancient.fits", detected=now - 10 * 86400, committed=now - 10 * 86400))
    rows.append(file_row("cam2", "night1/other.fits", state="ready", detected=now - 1))
    insert_files(rows)

    everything = audit.files("cam1", limit=1000)
    assert len(everything) == len(NAMES) + 2
    assert everything[0]["name"] == "late.fits"  # newest detection first
    assert [r["name"] for r in audit.files("cam1", state="failed")] == ["late.fits"]
    assert {r["name"] for r in audit.files("cam1", since=now - 3600, limit=1000)} == {
        *(dbm.display(n) for n in NAMES),
        "late.fits",
    }
    for pattern in PATTERNS:
        got = {r["name"] for r in audit.files("cam1", name=pattern, limit=1000)}
        candidates = [*NAMES, "late.fits", "ancient.fits"]
        want = {dbm.display(n) for n in candidates if fnmatch.fnmatchcase(n, pattern)}
        assert got == want, pattern
    assert len(audit.files("cam1", name="*.fits", limit=3)) == 3
    assert [r["source"] for r in audit.files(None, name="night1/o*")] == ["cam2"]
    one = audit.files("cam1", name="night1/img001.fits")[0]
    assert one["latency_seconds"] == pytest.approx(50 + NAMES.index("night1/img001.fits"), abs=0.01)

    table = audit.render_files(audit.files("cam1", limit=1000))
    assert table.splitlines()[0].split() == ["detected", "state", "size", "tries", "latency", "error", "name"]
    assert "new\\nline.fits" in table  # a newline in a name never splits the table
    assert len(table.splitlines()) == len(NAMES) + 3


def test_files_and_show_commands(site: Site) -> None:
    now = time.time()
    insert_files([file_row("cam1", "n/a.fits", detected=now - 20, committed=now - 18, held_as="n/a.fits.1")])
    row = FileRecord.get(FileRecord.name == "n/a.fits")
    b1 = batch(
        "cam1",
        started=now - 19.5,
        status="failed",
        error_class="transport",
        returncode=255,
        stderr="ssh: connect to host example.edu port 22: Connection refused",
    )
    attempt(b1, row.id, "failed", "transfer: exit 255")
    b2 = batch("cam1", started=now - 18.8, files=3, nbytes=3_000_000, seconds=0.8)
    attempt(b2, row.id)

    listed = site.hdfmgr("files", "--json", "--state=held", "--since=1h", "--name=n/*", str(site.config_path))
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "n/a.fits" and entry["held_as"] == "n/a.fits.1"
    bad = site.hdfmgr("files", "--since=soon", str(site.config_path))
    assert bad.returncode == 64 and "neither an age" in bad.stderr
    bad_state = site.hdfmgr("files", "--state=lost", str(site.config_path))
    assert bad_state.returncode == 64

    shown = site.hdfmgr("show", "--json", str(site.config_path), "n/a.fits")
    assert shown.returncode == 0, shown.stderr
    [version] = json.loads(shown.stdout)
    assert [t["outcome"] for t in version["tries"]] == ["failed", "committed"]
    assert version["tries"][1]["rate_bytes_per_s"] == pytest.approx(3_000_000 / 0.4)
    assert version["tries"][0]["error_class"] == "transport"
    # By its name in holding (it was held as n/a.fits.1).
    held = site.hdfmgr("show", str(site.config_path), str(site.holding / "n/a.fits.1"))
    assert held.returncode == 0, held.stderr
    assert "try 1: batch" in held.stdout and "[transport, exit 255] transfer: exit 255" in held.stdout
    assert "7.5 MB/s" in held.stdout and "(+2.000 s)" in held.stdout
    missing = site.hdfmgr("show", str(site.config_path), "nope.fits")
    assert missing.returncode == 65 and "no record" in missing.stdout


def test_retry_requeues_only_what_can_be_sent(site: Site) -> None:
    now = time.time()
    site.write("back.fits", b"b")
    site.write("failed.fits", b"f")
    site.write("twice.fits", b"t")
    insert_files(
        [
            file_row("cam1", "back.fits", state="quarantined", detected=now - 9, error_class="local"),
            file_row("cam1", "gone.fits", state="quarantined", detected=now - 8),
            file_row("cam1", "failed.fits", state="failed", detected=now - 7, next_try=now + 500),
            file_row("cam1", "twice.fits", state="quarantined", detected=now - 6),
            file_row("cam1", "twice.fits", state="held", detected=now - 5, committed=now - 4),
            file_row("cam1", "done.fits", state="held", detected=now - 3, committed=now - 2),
            file_row("cam2", "back.fits", state="quarantined", detected=now - 9),
        ]
    )
    named = site.hdfmgr("retry", str(site.config_path), "done.fits", "unknown.fits")
    assert named.returncode == 65
    assert "'done.fits': neither quarantined nor failed" in named.stdout
    assert "'unknown.fits': no record" in named.stdout

    result = site.hdfmgr("retry", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert "retry: 2 file(s) re-queued" in result.stdout
    assert "'gone.fits': not in the buffer" in result.stdout
    assert "'twice.fits': an older version" in result.stdout
    assert "no watcher is running" in result.stdout
    states = {(r.source, r.name, r.state) for r in FileRecord.select()}
    assert ("cam1", "back.fits", "ready") in states and ("cam1", "failed.fits", "ready") in states
    assert ("cam1", "gone.fits", "quarantined") in states and ("cam2", "back.fits", "quarantined") in states
    assert FileRecord.get(FileRecord.name == "failed.fits").next_try == 0


# ---------------------------------------------------------------------------- end to end (SQLite)


def test_show_tells_a_real_files_story(local: Site) -> None:
    marker = local.root / "failed-once"
    local.configure(
        name="cam1",
        transfer='sh -c \'if [ ! -e "$0" ]; then touch "$0"; echo boom >&2; exit 3; fi; cp "$@"\' '
        "{marker} {batch} {dest}",
        params={"marker": str(marker)},
    )
    daemon = local.start()
    try:
        local.write("night/r.fits", b"retry me" * 1000)
        wait_for(lambda: local.states().get("night/r.fits") == "held", 20, "held")
    finally:
        daemon.stop()
    shown = local.hdfmgr("show", str(local.config_path), "night/r.fits")
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert "night/r.fits  version 1 of 1" in text and "held, 8.0 kB, blake2b" in text
    assert "try 1: batch" in text and ": failed in" in text and "[remote, exit 3]" in text
    assert "try 2: batch" in text and ": committed in" in text and "MB/s" in text
    assert "attempts   2" in text
    listed = local.hdfmgr("files", str(local.config_path))
    assert "night/r.fits" in listed.stdout and " 2 " in listed.stdout.splitlines()[1]


def test_retry_after_quarantine_delivers_on_next_start(local: Site) -> None:
    local.configure(name="cam1", transfer=FAILING)
    daemon = local.start()
    try:
        local.write("q.fits", b"quarantine me")
        wait_for(lambda: local.states().get("q.fits") == "failed", 20, "failed")
        os.rename(local.buffer / "q.fits", local.root / "q.fits")
        daemon.proc.send_signal(signal.SIGUSR1)  # rescan now: it vanished
        wait_for(lambda: local.states().get("q.fits") == "quarantined", 20, "quarantined")
    finally:
        assert daemon.stop() == 0
    os.rename(local.root / "q.fits", local.buffer / "q.fits")
    local.configure(name="cam1")  # the endpoint works again
    result = local.hdfmgr("retry", str(local.config_path), "q.fits")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 file(s) re-queued" in result.stdout and "no watcher" in result.stdout
    assert local.states() == {"q.fits": "ready"}
    daemon = local.start()
    try:
        wait_for(lambda: local.held() == {"q.fits": b"quarantine me"}, 20, "held")
        wait_for(lambda: local.states() == {"q.fits": "held"}, 10, "recorded")
    finally:
        daemon.stop()
    assert local.query("select count(*) from files")[0][0] == 1  # the same row, not a new one


def test_retry_signals_a_running_watcher_which_sends_at_once(local: Site) -> None:
    flag = local.root / "endpoint-down"
    flag.touch()
    local.configure(
        name="cam1",
        transfer='sh -c \'if [ -e "$0" ]; then echo down >&2; exit 3; fi; cp "$@"\' {flag} {batch} {dest}',
        params={"flag": str(flag)},
        retry_initial=600,  # without the retry, the next try would be minutes away
        retry_max=600,
    )
    daemon = local.start()
    try:
        local.write("f.fits", b"fail then work")
        wait_for(lambda: local.states().get("f.fits") == "failed", 20, "failed")
        flag.unlink()
        result = local.hdfmgr("retry", str(local.config_path))
        assert result.returncode == 0, result.stderr
        assert f"asked the running watcher (pid {daemon.proc.pid})" in result.stdout
        wait_for(lambda: local.held() == {"f.fits": b"fail then work"}, 20, "delivery after retry")
    finally:
        daemon.stop()
