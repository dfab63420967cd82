"""``hdfmgr status``: the one-screen summary, its JSON, the source filter, and its speed.

Every test runs against SQLite and against a real PostgreSQL server (tests/pg_fixture.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hdfmgr import config as config_mod
from hdfmgr import db as dbm
from hdfmgr import status
from hdfmgr.record import Recorder
from tests.audit_data import batch, file_row, insert_files
from tests.site import Site


@pytest.fixture
def site(tmp_path: Path, engine: str | None) -> Iterator[Site]:
    site = Site(tmp_path, engine=engine)
    site.configure(name="cam1")
    cfg = config_mod.load(site.config_path)
    database = dbm.connect(cfg)
    dbm.create_schema(database)
    try:
        yield site
    finally:
        database.close()


def test_empty_database(site: Site) -> None:
    info = status.summary("cam1")
    assert info["states"] == {s.value: 0 for s in dbm.State}
    assert info["backlog"] == {"files": 0, "bytes": 0, "oldest": None, "oldest_age_seconds": None}
    assert info["last_commit"] is None
    assert info["throughput"]["1m"]["files"] == 0
    assert info["breaker"]["state"] == "closed"
    text = status.render(info)
    assert "backlog:  none" in text and "last ok:  never" in text and "endpoint: ok" in text


def test_summary_counts_backlog_throughput_and_failures(site: Site) -> None:
    now = time.time()
    rows = [
        # 30 committed in the last minute, 1 MB each; 60 more between 1 min and 1 h ago.
        *(
            file_row("cam1", f"n/a{i}.fits", size=1_000_000, detected=now - 50, committed=now - 30)
            for i in range(30)
        ),
        *(
            file_row("cam1", f"n/b{i}.fits", size=2_000_000, detected=now - 1900, committed=now - 1800)
            for i in range(60)
        ),
        # Older than an hour: counted as held, not in any window.
        *(file_row("cam1", f"old{i}.fits", detected=now - 90000, committed=now - 86400) for i in range(5)),
        # The backlog: waiting in several states, the oldest detected 600 s ago.
        file_row("cam1", "wait/oldest.fits", state="failed", size=500, detected=now - 600),
        file_row("cam1", "wait/r.fits", state="ready", size=700, detected=now - 10),
        file_row("cam1", "wait/s.fits", state="staging", size=800, detected=now - 5),
        file_row("cam1", "gone.fits", state="quarantined", detected=now - 700),
        # Another source: never counted without --all.
        *(file_row("cam2", f"x{i}.fits", state="ready", detected=now - 5000) for i in range(7)),
    ]
    insert_files(rows)
    batch("cam1", started=now - 40)
    batch(
        "cam1",
        started=now - 20,
        status="failed",
        error_class="remote",
        returncode=3,
        stderr="first line\nscp: /staging/x: No space left on device\n\n",
    )
    batch(
        "cam2",
        started=now - 10,
        status="failed",
        error_class="transport",
        returncode=255,
        stderr="ssh: connect to host example.edu port 22: Connection refused",
    )

    info = status.summary("cam1", now=now)

    assert info["states"]["held"] == 95
    assert info["states"]["ready"] == 1 and info["states"]["failed"] == 1
    assert info["states"]["staging"] == 1 and info["states"]["quarantined"] == 1
    assert info["backlog"]["files"] == 3
    assert info["backlog"]["bytes"] == 2000
    assert info["backlog"]["oldest"] == "wait/oldest.fits"
    assert info["backlog"]["oldest_age_seconds"] == pytest.approx(600, abs=1)
    assert info["last_commit"]["age_seconds"] == pytest.approx(30, abs=1)
    minute, hour = info["throughput"]["1m"], info["throughput"]["1h"]
    assert minute["files"] == 30 and minute["bytes"] == 30_000_000
    assert minute["files_per_s"] == pytest.approx(0.5) and minute["mb_per_s"] == pytest.approx(0.5)
    assert hour["files"] == 90 and hour["bytes"] == 150_000_000
    assert hour["mb_per_s"] == pytest.approx(150 / 3600, abs=1e-3)
    assert info["breaker"]["state"] == "closed"  # the latest failure was not a transport one
    [failure] = info["recent_failures"]
    assert failure["error_class"] == "remote" and failure["returncode"] == 3
    assert failure["stderr"] == "scp: /staging/x: No space left on device"

    text = status.render(info)
    assert "backlog:  3 files" in text and "wait/oldest.fits (10 min ago)" in text
    assert "last minute 30 files (0.50 files/s, 0.50 MB/s); last hour 90 files" in text
    assert "[remote, exit 3]: scp: /staging/x: No space left on device" in text
    json.dumps(info)  # serialisable as it is

    everything = status.summary(None, now=now)
    assert everything["states"]["ready"] == 8
    assert [s["source"] for s in everything["sources"]] == ["cam1", "cam2"]
    cam2 = everything["sources"][1]
    assert cam2["backlog"]["files"] == 7
    assert cam2["breaker"]["state"] == "failing"
    assert {f["source"] for f in everything["recent_failures"]} == {"cam1", "cam2"}


def test_breaker_derived_from_latest_batches(site: Site) -> None:
    now = time.time()
    batch("cam1", started=now - 100)
    for i in range(3):
        batch(
            "cam1",
            started=now - 50 + i,
            status="failed",
            error_class="timeout" if i else "transport",
            returncode=255,
            stderr=f"ssh: connect to host example.edu port 22: Connection timed out {i}",
        )
    info = status.summary("cam1", breaker_threshold=3, now=now)
    b = info["breaker"]
    assert b["state"] == "open" and b["transport_failures_in_a_row"] == 3
    assert b["since"] == pytest.approx(now - 50)
    assert b["error"].endswith("timed out 2")
    assert "derived" in b["basis"]
    assert "FAILING, breaker open: 3 transport/timeout failure(s)" in status.render(info)
    assert status.summary("cam1", breaker_threshold=5, now=now)["breaker"]["state"] == "failing"
    # A batch that reached the endpoint closes it.
    batch("cam1", started=now - 10)
    assert status.summary("cam1", now=now)["breaker"]["state"] == "closed"


def test_an_endpoint_that_answers_but_cannot_commit_is_not_ok(site: Site) -> None:
    """Issue 16, hole 8: flock failing on staging fails every commit on the endpoint (error
    class ``endpoint``) while every connection succeeds; status must not say "ok"."""
    now = time.time()
    batch("cam1", started=now - 100)
    for i in range(2):
        batch(
            "cam1",
            started=now - 50 + i,
            status="failed",
            error_class="endpoint",
            returncode=92,
            stderr="hdfmgr commit: flock fails on staging: flock: failed to lock: Function not implemented",
        )
    info = status.summary("cam1", now=now)
    b = info["breaker"]
    assert b["state"] == "closed" and b["commit_failures_in_a_row"] == 2
    assert b["commit_failures_since"] == pytest.approx(now - 50)
    assert b["commit_error"].endswith("Function not implemented")
    text = status.render(info)
    assert "endpoint: ok" not in text
    assert "endpoint: reachable, but its commits FAIL: the last 2 stopped before renaming" in text
    assert "flock fails on staging" in text
    batch("cam1", started=now - 10)  # a commit that got through
    assert "endpoint: ok (closed)" in status.render(status.summary("cam1", now=now))


def test_status_command_json_and_all(site: Site) -> None:
    now = time.time()
    insert_files(
        [
            file_row("cam1", "a.fits", detected=now - 5, committed=now - 1),
            file_row("cam2", "b.fits", state="ready", detected=now - 5),
            file_row("cam2", "c.fits", detected=now - 9, committed=now - 2),
            file_row("cam3", "d.fits", state="failed", detected=now - 7),
        ]
    )
    result = site.hdfmgr("status", "--json", str(site.config_path))
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["source"] == "cam1" and info["states"]["held"] == 1 and info["backlog"]["files"] == 0
    everything = json.loads(site.hdfmgr("status", "--json", "--all", str(site.config_path)).stdout)
    assert everything["source"] is None and everything["backlog"]["files"] == 2
    assert everything["states"]["held"] == 2 and everything["states"]["ready"] == 1
    assert everything["states"]["failed"] == 1 and everything["backlog"]["oldest"] == "d.fits"
    text = site.hdfmgr("status", str(site.config_path))
    assert text.returncode == 0 and "last ok:  a.fits" in text.stdout and "source:   cam1" in text.stdout


def test_status_answers_on_a_large_database(site: Site) -> None:
    """200k files (most of them held, a backlog of 2000): every query stays on an index.

    The time is printed for the benchmark (pytest -s); nothing here asserts a duration.
    """
    now = time.time()
    n = 200_000

    def rows():
        for i in range(n):
            t = now - 86400 + i * 86400 / n
            if i % 100 == 0:
                yield file_row("cam1", f"night/{i:07d}.fits", state="ready", size=4096, detected=t)
            else:
                yield file_row("cam1", f"night/{i:07d}.fits", size=4096, detected=t - 2, committed=t)

    t0 = time.perf_counter()
    insert_files(rows(), chunk=2000)
    inserted = time.perf_counter() - t0
    t0 = time.perf_counter()
    info = status.summary("cam1", now=now)
    elapsed = time.perf_counter() - t0
    print(
        f"\nstatus on {n} files ({site.engine or 'sqlite'}): {elapsed * 1000:.0f} ms "
        f"(insert {inserted:.1f} s)"
    )
    assert info["backlog"]["files"] == n // 100
    assert info["states"]["held"] == n - n // 100
    assert info["throughput"]["1h"]["files"] > 0


def test_backlog_seeks_the_state_index_after_analyze_and_old_indexes_go(tmp_path: Path) -> None:
    """SQLite: with ANALYZE's statistics an IN list over the states scans the whole table; the
    backlog's and the restart's per-state queries must still seek the (source, state,
    detected_at) index. An index of an earlier schema (each one an extra write per state
    change) is dropped on open.
    """
    site = Site(tmp_path)
    site.configure(name="cam1")
    database = dbm.connect(config_mod.load(site.config_path))
    try:
        dbm.create_schema(database)
        database.execute_sql('CREATE INDEX "files_state_updated_at" ON "files" ("state", "updated_at")')
        dbm.create_schema(database)
        names = {
            row[0] for row in database.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert not names & set(dbm.RETIRED_INDEXES)
        now = time.time()
        insert_files(
            file_row("cam1", f"n/{i:05d}.fits", state="ready" if i % 50 == 0 else "held", detected=now - i)
            for i in range(5000)
        )
        database.execute_sql("ANALYZE")
        statements: list[tuple[str, Any]] = []
        real = database.execute_sql

        def spy(sql: str, params: Any = None, *args: Any, **kwargs: Any) -> Any:
            statements.append((sql, params))
            return real(sql, params, *args, **kwargs)

        database.execute_sql = spy  # type: ignore[method-assign]
        try:
            backlog = status.backlog("cam1", now=now)
            # What a restart resumes: the same index, not a walk of the source's history.
            resumed = list(Recorder(database, "cam1").active())
        finally:
            del database.execute_sql
        assert backlog["files"] == 100 and backlog["oldest"] == "n/04950.fits"
        assert len(resumed) == 100 and {row.state for row in resumed} == {"ready"}
        assert statements
        for sql, params in statements:
            plan = " ".join(str(row[-1]) for row in real(f"EXPLAIN QUERY PLAN {sql}", params))
            assert "files_source_state_detected_at (source=? AND state=?)" in plan, (sql, plan)
    finally:
        database.close()


def test_a_restart_reads_every_unfinished_file_back_as_recorded(site: Site) -> None:
    """A restart reads the driver's rows as they come, without peewee's per-column conversion:
    on either engine the values must still be the types the daemon works with, hostile and
    non-UTF-8 paths included, and finished files must not come back."""
    now = time.time()
    names = {
        "ready": "plain.fits",
        "failed": "sp ace/$(x) 'q'\n.fits",
        "committing": "bad-\udcff.fits",
        "staging": "-dash.fits",
    }
    rows = [
        file_row("cam1", rel, state=state, detected=now - i, last_batch=None)
        for i, (state, rel) in enumerate(names.items())
    ]
    rows[1].update(next_try=now + 5.5, checksum="ab" * 64, attempts=2)
    rows[2].update(last_batch=7)
    rows.append(file_row("cam1", "done.fits", detected=now, committed=now, last_batch=3))
    insert_files(rows)
    database = dbm.connect(config_mod.load(site.config_path))
    try:
        resumed = {row.rel: row for row in Recorder(database, "cam1").active()}
    finally:
        database.close()
    assert set(resumed) == set(names.values())
    for state, rel in names.items():
        row = resumed[rel]
        assert row.state == state
        assert all(type(v) is int for v in (row.id, row.size, row.mtime_ns, row.inode, row.attempts))
        assert type(row.hashed) is bool and type(row.next_try) is float
        assert row.mtime_ns == int((now - list(names).index(state)) * 1e9)
    assert resumed[names["failed"]].hashed and resumed[names["failed"]].attempts == 2
    assert resumed[names["failed"]].next_try == pytest.approx(now + 5.5)
    assert not resumed[names["ready"]].hashed
    assert resumed[names["committing"]].last_batch == 7
    assert resumed[names["staging"]].last_batch is None
