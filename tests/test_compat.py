"""A site coming from the original handoff manager: its config file, its database, the switch.

The original's etc/config.yaml is kept verbatim but for paths and commands
(tests/data/original-config.yaml); its database is built from its DDL
(tests/data/schemas/original-*.sql) with a few rows of history; hdfmgr's own earlier schemas
are the DDL each shipped version created (tests/data/schemas/hdfmgr-N.sql on SQLite,
tests/data/schemas/postgresql/hdfmgr-N.sql on PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from hdfmgr import cli
from hdfmgr.schema import ORIGINAL_TABLES, SCHEMA_VERSION
from tests.pg_fixture import PostgresServer
from tests.site import STARTED, Daemon, Site, content, wait_for
from tests.test_systemd import UNITS, unit

DATA = Path(__file__).parent / "data"
SCHEMAS = DATA / "schemas"
EARLIER = sorted(SCHEMAS.glob("hdfmgr-*.sql"))
EARLIER_PG = sorted((SCHEMAS / "postgresql").glob("hdfmgr-*.sql"))


def original_site(root: Path, *, engine: str | None = None) -> Site:
    """A site whose config file is the original manager's, verbatim but for paths and commands."""
    site = Site(root, engine=engine)
    text = (DATA / "original-config.yaml").read_text().replace("@ROOT@", str(root))
    if engine is not None:
        text = text.replace(f'"sqlite:///{root}/handoff.db"', f'"{engine}"')
    site.config_path.write_text(text)
    return site


def local(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


# Five files: one delivered and held; one never delivered (a timeout, then a failed scp) and
# still in the buffer; one held and later deleted from holding; one never tried and gone from
# the buffer; one never tried whose path holds another version now. Four batches.
ORIGINAL_FILES = [
    (1, "2023/05/04", "a.fits", "aa" * 64, 10, "2023-05-04 10:00:00", "2023-05-04 10:00:05", None),
    (2, "2023/05/04", "b.fits", "bb" * 64, 20, "2023-05-04 10:01:00", None, None),
    (3, "", "top.fits", "cc" * 64, 30, "2023-05-04 10:02:00", "2023-05-04 10:02:09", "2023-05-05 10:00:00"),
    (4, "2023/05/04", "gone.fits", "dd" * 64, 40, "2023-05-04 10:03:00", None, None),
    (5, "2023/05/04", "changed.fits", "ee" * 64, 50, "2023-05-04 10:04:00", None, None),
]
# id, pre start, pre s, transfer start, transfer s, post start, post s, bytes, MiB/s, status, error
ORIGINAL_BATCHES = [
    (
        1,
        "2023-05-04 10:00:01",
        0.25,
        "2023-05-04 10:00:01.25",
        2.0,
        "2023-05-04 10:00:03.25",
        0.5,
        10,
        1.5,
        0,
        None,
    ),
    (2, "2023-05-04 10:01:01", 0.25, "2023-05-04 10:01:01.25", 600.0, None, None, 20, None, 62, "timed out"),
    (3, "2023-05-04 10:11:02", 0.25, "2023-05-04 10:11:02.25", 1.0, None, None, 20, None, 121, "scp: lost"),
    (
        4,
        "2023-05-04 10:02:01",
        0.5,
        "2023-05-04 10:02:01.5",
        3.0,
        "2023-05-04 10:02:04.5",
        1.0,
        30,
        2.0,
        0,
        None,
    ),
]
ORIGINAL_LINKS = [(1, 1), (2, 2), (2, 3), (3, 4)]


def _interval(seconds: float | None, postgres: bool) -> str | None:
    if seconds is None:
        return None
    if postgres:
        return f"{seconds} seconds"
    return (dt.datetime(1970, 1, 1) + dt.timedelta(seconds=seconds)).isoformat(" ", "microseconds")


def original_rows(postgres: bool) -> list[tuple[str, tuple[object, ...]]]:
    mark = "%s" if postgres else "?"
    rows: list[tuple[str, tuple[object, ...]]] = []
    for f in ORIGINAL_FILES:
        rows.append((f"INSERT INTO files VALUES ({', '.join([mark] * 8)})", f))
    for b in ORIGINAL_BATCHES:
        values = (*b[:2], _interval(b[2], postgres), b[3], _interval(b[4], postgres), b[5])
        values += (_interval(b[6], postgres), *b[7:])
        rows.append((f"INSERT INTO transfer_batches VALUES ({', '.join([mark] * 11)})", values))
    for link in ORIGINAL_LINKS:
        rows.append((f"INSERT INTO file_transfer_attempts VALUES ({mark}, {mark})", link))
    return rows


def make_original_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.executescript((SCHEMAS / "original-sqlite.sql").read_text())
        for sql, values in original_rows(postgres=False):
            conn.execute(sql, values)


def assert_one_line(result, status: int) -> None:  # type: ignore[no-untyped-def]
    assert "Traceback" not in result.stderr + result.stdout
    assert result.returncode == status, (result.returncode, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ------------------------------------------------------------------------------ config


def test_the_originals_config_validates_and_notes_its_own_keys(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    result = site.hdfmgr("validate", str(site.config_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "original  database.echo:" in out
    assert "original  database.pool_type: the original's key: accepted, no effect" in out
    assert "original  logging.rotate: null" in out and "never rotated" in out
    assert "original  general.timeout: null" in out
    assert "original  general.exclude_list: null" in out
    assert "chunk_size=1 num_threads=1 timeout=3600s pause=1s" in out


def test_the_originals_config_runs(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    site.write_many({"2023/05/04/x.fits": content("x"), "y.fits": content("y")})
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert site.delivered() == {"2023/05/04/x.fits": content("x"), "y.fits": content("y")}
    assert set(site.held()) == {"2023/05/04/x.fits", "y.fits"}


def _original_database(
    request: pytest.FixtureRequest, root: Path, dialect: str
) -> tuple[Site, Callable[[str], list[tuple[object, ...]]], Callable[[], None]]:
    """A site with the original's config and a database of the original's with its rows, on
    SQLite or on the test PostgreSQL server; returns the site, a query and the clean-up."""
    if dialect == "sqlite":
        site = original_site(root)
        make_original_sqlite(site.db_path)
        return site, site.query, lambda: None
    import psycopg2

    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = postgres.create_database("original")
    url = postgres.url(name)
    conn = postgres.connect(name)
    with conn.cursor() as cur:
        cur.execute((SCHEMAS / "original-postgresql.sql").read_text())
        for sql, values in original_rows(postgres=True):
            cur.execute(sql, values)
    conn.close()

    def query(sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.commit()
            conn.close()

    return original_site(root, engine=url), query, lambda: postgres.drop_database(name)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_originals_config_and_database_under_the_watcher(
    tmp_path: Path, request: pytest.FixtureRequest, dialect: str
) -> None:
    """The switch-over as a site does it: the original's file and database, initdb, then the
    watcher (``hdfmgr run``, not a one-shot rescan) sends what the original left undelivered
    and what arrives while it runs; SIGTERM ends it with status 0."""
    site, query, drop = _original_database(request, tmp_path, dialect)
    try:
        mark = "%s" if dialect == "postgresql" else "?"
        # One more: the original delivered sent.fits (batch 5 succeeded) and stopped before
        # moving it to holding; it is still in the buffer, unchanged.
        query(
            "INSERT INTO files VALUES "
            f"(6, '2023/05/04', 'sent.fits', {mark}, 7, '2023-05-04 10:05:00', NULL, NULL)",
            ("ff" * 64,),
        )
        query(
            "INSERT INTO transfer_batches VALUES (5, '2023-05-04 10:05:01', "
            f"{mark}, '2023-05-04 10:05:01.25', {mark}, '2023-05-04 10:05:02.25', {mark}, 7, 1.0, 0, NULL)",
            tuple(_interval(t, dialect == "postgresql") for t in (0.25, 1.0, 0.5)),
        )
        query("INSERT INTO file_transfer_attempts VALUES (6, 5)")
        for rel, data, when in (
            ("2023/05/04/b.fits", b"B" * 20, "2023-05-04 10:01:00"),
            ("2023/05/04/sent.fits", b"S" * 7, "2023-05-04 10:05:00"),
        ):
            os.utime(site.write(rel, data), (local(when), local(when)))
        config = str(site.config_path)
        init = site.hdfmgr("initdb", config)
        assert init.returncode == 0, init.stderr
        daemon = site.start()
        try:
            site.write("2023/05/05/live.fits", content("live"))
            everything = {"2023/05/04/b.fits", "2023/05/04/sent.fits", "2023/05/05/live.fits"}
            wait_for(lambda: site.held().keys() >= everything, 30, "all three held")
        finally:
            assert daemon.stop() == 0
        assert "Traceback" not in daemon.output()
        # sent.fits was held without a second delivery.
        assert site.delivered() == {"2023/05/04/b.fits": b"B" * 20, "2023/05/05/live.fits": content("live")}
        assert query("SELECT state, attempts FROM files WHERE id = 6") == [("held", 1)]
        assert query("SELECT state, attempts FROM files WHERE id = 2") == [("held", 3)]
        show = site.hdfmgr("show", config, "2023/05/04/b.fits")
        assert show.returncode == 0 and "try 3: batch" in show.stdout and "[timeout] timed out" in show.stdout
        assert "Traceback" not in init.stderr + show.stderr
    finally:
        drop()


@pytest.mark.parametrize("command", ["run", "initdb", "dropdb"])
def test_the_originals_validate_option_validates_and_exits(tmp_path: Path, command: str) -> None:
    site = original_site(tmp_path)
    extra = ["--yes"] if command == "dropdb" else []
    result = site.hdfmgr(command, "--validate", *extra, str(site.config_path), timeout=30)
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout and not site.db_path.exists()


def test_dropdb_with_no_validate_still_needs_yes(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    make_original_sqlite(site.db_path)
    result = site.hdfmgr("dropdb", "--no-validate", str(site.config_path))
    assert_one_line(result, cli.EX_USAGE)
    assert "add --yes" in result.stderr


def test_echo_logs_sql_and_rotate_null_never_rotates(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    data = yaml.safe_load(site.config_path.read_text())
    data["database"]["echo"] = True
    data["logging"].update(file=str(tmp_path / "hdfmgr.log"), maxbytes=100)
    site.config_path.write_text(yaml.safe_dump(data))
    site.write("z.fits", content("z"))
    result = site.hdfmgr("rescan", str(site.config_path))
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "hdfmgr.log").read_text()
    assert 'INSERT INTO "batches"' in log and "SELECT" in log
    assert len(log) > 100 and not list(tmp_path.glob("hdfmgr.log.*"))  # no rotation
    data["database"]["echo"] = "yes please"
    site.config_path.write_text(yaml.safe_dump(data))
    bad = site.hdfmgr("validate", str(site.config_path))
    assert bad.returncode == 78 and "database.echo: must be true or false" in bad.stderr


# ------------------------------------------------------------------- the original's database


def check_takeover(site: Site, query) -> None:  # type: ignore[no-untyped-def]
    """initdb, then run (rescan) and show, files, metrics on the original's database."""
    config = str(site.config_path)
    # The original left b.fits in its buffer and a partial copy in its staging area; the
    # archiver wrote changed.fits again since.
    b = site.write("2023/05/04/b.fits", b"B" * 20)
    os.utime(b, (local("2023-05-04 10:01:00"), local("2023-05-04 10:01:00")))
    site.write("2023/05/04/changed.fits", b"newer")
    leftover = site.staging / "2023" / "05" / "04" / "b.fits"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")

    before = site.hdfmgr("status", config)
    assert_one_line(before, 78)
    assert "original handoff manager's" in before.stderr and "hdfmgr initdb" in before.stderr

    init = site.hdfmgr("initdb", config)
    assert init.returncode == 0, init.stderr
    assert "imported 5 files, 4 batches and 4 attempts" in init.stdout
    assert "(1 undelivered files still in the buffer: hdfmgr sends them)" in init.stdout
    assert "original_files, original_transfer_batches, original_file_transfer_attempts" in init.stdout
    assert query("SELECT COUNT(*) FROM original_files")[0][0] == 5
    assert query("SELECT COUNT(*) FROM original_transfer_batches")[0][0] == 4
    assert query("SELECT COUNT(*) FROM original_file_transfer_attempts")[0][0] == 4
    assert query("SELECT version FROM hdfmgr_schema") == [(SCHEMA_VERSION,)]

    rows = query(
        "SELECT id, name, size, checksum, state, attempts, detected_at, held_at FROM files ORDER BY id"
    )
    assert [r[:6] for r in rows] == [
        (1, "2023/05/04/a.fits", 10, "aa" * 64, "held", 1),
        (2, "2023/05/04/b.fits", 20, None, "ready", 2),
        (3, "top.fits", 30, "cc" * 64, "held", 1),
        (4, "2023/05/04/gone.fits", 40, "dd" * 64, "quarantined", 0),
        (5, "2023/05/04/changed.fits", 50, "ee" * 64, "quarantined", 0),
    ]
    assert rows[0][6] == pytest.approx(local("2023-05-04 10:00:00"))
    assert rows[0][7] == pytest.approx(local("2023-05-04 10:00:05"))
    batches = query(
        "SELECT id, status, error_class, started_at, prepare_seconds, transfer_seconds, commit_seconds, "
        "rate, finished_at, stderr FROM batches ORDER BY id"
    )
    assert [b[:3] for b in batches] == [
        (1, "committed", None),
        (2, "failed", "timeout"),
        (3, "failed", "remote"),
        (4, "committed", None),
    ]
    first = batches[0]
    assert first[3] == pytest.approx(local("2023-05-04 10:00:01"))
    assert first[4:7] == pytest.approx((0.25, 2.0, 0.5))
    assert first[7] == pytest.approx(1.5 * 1024 * 1024)
    assert first[8] == pytest.approx(local("2023-05-04 10:00:03.75"))
    assert batches[2][9] == "scp: lost"

    show = site.hdfmgr("show", config, "2023/05/04/a.fits")
    assert show.returncode == 0, show.stderr
    assert "held" in show.stdout and "mkdir 0.250 s, transfer 2.000 s, commit 0.500 s" in show.stdout
    failed = site.hdfmgr("show", config, "2023/05/04/b.fits")
    assert "[timeout] timed out" in failed.stdout and "[remote] scp: lost" in failed.stdout
    gone = site.hdfmgr("show", config, "2023/05/04/gone.fits")
    assert "quarantined" in gone.stdout and "not in the buffer at the take-over" in gone.stdout
    listed = site.hdfmgr("files", config, "--all", "--limit=10")
    assert listed.returncode == 0 and "top.fits" in listed.stdout
    report = site.hdfmgr("report", config, "--since=2023-05-01", f"--output={site.root / 'r.png'}")
    assert report.returncode == 0, report.stderr
    assert ": 2 files, 0.00 GB committed since 2023-05-01" in report.stdout
    assert (site.root / "r.png").read_bytes().startswith(b"\x89PNG")
    metrics = site.hdfmgr("metrics", config)
    assert metrics.returncode == 0, metrics.stderr
    # The imported history counts: a.fits and top.fits committed; batches 1 and 4 committed,
    # 2 and 3 failed.
    lines = metrics.stdout.splitlines()

    def sample(name: str, *labels: str) -> float:
        found = [
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(name + "{") and all(label in line for label in labels)
        ]
        assert len(found) == 1, (name, labels, metrics.stdout)
        return found[0]

    assert sample("hdfmgr_files_committed_total") == 2
    assert sample("hdfmgr_batches_total", 'status="committed"') == 2
    assert sample("hdfmgr_batches_total", 'status="failed"') == 2

    # Run: b.fits goes out as the third try of its record, changed.fits as a new version; the
    # leftover stays where the original left it.
    site.write("new.fits", content("new"))
    run = site.hdfmgr("rescan", config)
    assert run.returncode == 0, run.stderr
    assert site.delivered() == {
        "2023/05/04/b.fits": b"B" * 20,
        "2023/05/04/changed.fits": b"newer",
        "new.fits": content("new"),
    }
    assert leftover.read_bytes() == b"partial"
    again = site.hdfmgr("show", config, "2023/05/04/b.fits")
    assert "version 1 of 1" in again.stdout and "held" in again.stdout and "try 3: batch" in again.stdout
    assert query("SELECT state, attempts FROM files WHERE id = 2") == [("held", 3)]
    changed = site.hdfmgr("show", config, "2023/05/04/changed.fits")
    assert "version 2 of 2" in changed.stdout and "Traceback" not in changed.stderr
    status = site.hdfmgr("status", config)
    assert status.returncode == 0 and "Traceback" not in status.stderr
    assert "held 5" in status.stdout and "quarantined 2" in status.stdout
    assert "failed [timeout]: timed out" in status.stdout
    reinit = site.hdfmgr("initdb", config)
    assert reinit.returncode == 0 and f"schema version {SCHEMA_VERSION}" in reinit.stdout


def test_initdb_takes_over_the_originals_sqlite_database(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    make_original_sqlite(site.db_path)
    check_takeover(site, site.query)


def test_initdb_takes_over_the_originals_postgresql_database(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    import psycopg2

    name = postgres.create_database("original")
    url = postgres.url(name)

    def query(sql: str) -> list[tuple[object, ...]]:
        conn = psycopg2.connect(url)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.commit()
            conn.close()

    try:
        conn = postgres.connect(name)
        with conn.cursor() as cur:
            cur.execute((SCHEMAS / "original-postgresql.sql").read_text())
            for sql, values in original_rows(postgres=True):
                cur.execute(sql, values)
        conn.close()
        site = original_site(tmp_path, engine=url)
        check_takeover(site, query)
        # New rows get ids past the imported ones (the sequences moved with the import).
        assert min(r[0] for r in query("SELECT id FROM files WHERE name = 'new.fits'")) > 5
    finally:
        postgres.drop_database(name)


def test_a_row_that_cannot_be_imported_changes_nothing(tmp_path: Path) -> None:
    site = original_site(tmp_path)
    make_original_sqlite(site.db_path)
    with sqlite3.connect(site.db_path) as conn:
        conn.execute("INSERT INTO files VALUES (9, '', 'odd.fits', 'ff', 1, 'yesterday-ish', NULL, NULL)")
    schema = "SELECT type, name, sql FROM sqlite_master ORDER BY name"
    before = site.query(schema)
    result = site.hdfmgr("initdb", str(site.config_path))
    assert_one_line(result, cli.EX_CONFIG)
    assert "cannot import the original manager's history" in result.stderr
    assert "'yesterday-ish'" in result.stderr and "nothing was changed" in result.stderr
    assert site.query(schema) == before


def test_import_reads_each_dialects_times_and_either_top_level_directory() -> None:
    from hdfmgr import importer

    assert importer.seconds("1970-01-01 00:00:02.500000") == 2.5  # SQLite's Interval
    assert importer.seconds(dt.timedelta(minutes=10)) == 600.0  # PostgreSQL's
    assert importer.timestamp(dt.datetime(2023, 5, 4, 10)) == local("2023-05-04 10:00:00")
    for top in ("", "."):
        row = (7, top, "top.fits", "ab", 3, "2023-05-04 10:00:00", "2023-05-04 10:00:01", None)
        made = importer.file_row(row, source="s", tries=1, last_batch=None, delivered=None)
        assert made["relpath"] == b"top.fits" and made["state"] == "held"
        assert made["held_as"] == "top.fits" and made["committed_at"] == local("2023-05-04 10:00:01")


# ------------------------------------------------------------------ earlier hdfmgr schemas


@pytest.mark.parametrize("ddl", EARLIER, ids=[p.stem for p in EARLIER])
def test_initdb_migrates_each_earlier_schema_in_place(tmp_path: Path, ddl: Path) -> None:
    site = Site(tmp_path)
    site.configure(name="east")
    with sqlite3.connect(site.db_path) as conn:
        conn.executescript(ddl.read_text())
        conn.execute(
            "INSERT INTO batches (id, source, staging_dir, started_at, finished_at, files, bytes, "
            "hash_seconds, status, committed) VALUES (1, 'east', 's', 100.0, 101.0, 1, 5, 0, 'committed', 1)"
        )
        conn.execute(
            "INSERT INTO files (id, source, relpath, name, size, mtime_ns, inode, state, attempts, "
            "next_try, detected_at, committed_at, held_at, updated_at, held_as, last_batch) VALUES "
            "(1, 'east', CAST('old.fits' AS BLOB), 'old.fits', 5, 1, 2, 'held', 1, 0, 99.0, 101.0, "
            "101.0, 101.0, 'old.fits', 1)"
        )
        conn.execute("INSERT INTO attempts (batch_id, file_id, outcome) VALUES (1, 1, 'committed')")
    config = str(site.config_path)
    before = site.hdfmgr("status", config)
    assert_one_line(before, 78)
    assert "older hdfmgr schema; run 'hdfmgr initdb'" in before.stderr

    init = site.hdfmgr("initdb", config)
    assert init.returncode == 0, init.stderr
    assert (
        f"migrated from an unversioned hdfmgr schema (1-4) to schema version {SCHEMA_VERSION}" in init.stdout
    )
    fresh = Site(tmp_path / "fresh")
    assert fresh.hdfmgr("initdb", str(fresh.config_path)).returncode == 0
    schema = "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
    assert site.query(schema) == fresh.query(schema)
    assert site.query("SELECT version FROM hdfmgr_schema") == [(SCHEMA_VERSION,)]

    show = site.hdfmgr("show", config, "old.fits")
    assert show.returncode == 0 and "held" in show.stdout and "try 1: batch 1" in show.stdout
    site.write("new.fits", content("new"))
    run = site.hdfmgr("rescan", config)
    assert run.returncode == 0, run.stderr
    assert site.delivered() == {"new.fits": content("new")}


def test_run_migrates_an_earlier_schema_itself(tmp_path: Path) -> None:
    """An upgrade restarts the daemon: it migrates its own older schema without initdb."""
    site = Site(tmp_path)
    with sqlite3.connect(site.db_path) as conn:
        conn.executescript(EARLIER[0].read_text())
    site.write("a.fits", content("a"))
    run = site.hdfmgr("rescan", str(site.config_path))
    assert run.returncode == 0, run.stderr
    assert (
        f"migrated from an unversioned hdfmgr schema (1-4) to schema version {SCHEMA_VERSION}" in run.stderr
    )
    assert site.query("SELECT version FROM hdfmgr_schema") == [(SCHEMA_VERSION,)]
    assert site.delivered() == {"a.fits": content("a")}


PG_SCHEMA = (
    "SELECT 'column', table_name || '.' || column_name, data_type || ' ' || is_nullable || ' ' || "
    "COALESCE(column_default, '') FROM information_schema.columns WHERE table_schema = 'public' "
    "UNION ALL SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
    "ORDER BY 1, 2"
)


@pytest.mark.parametrize("ddl", EARLIER_PG, ids=[f"postgresql-{p.stem}" for p in EARLIER_PG])
def test_initdb_migrates_each_earlier_postgresql_schema_in_place(
    tmp_path: Path, postgres: PostgresServer, ddl: Path
) -> None:
    """The same migrations on a central PostgreSQL database (schema 3's partial index and the
    indexes schema 4 retired are PostgreSQL indexes too)."""
    import psycopg2

    old, fresh = postgres.create_database("earlier"), postgres.create_database("fresh")
    try:
        conn = postgres.connect(old)
        with conn.cursor() as cur:
            cur.execute(ddl.read_text())
            # Ids from the sequences, as the shipped version wrote them.
            cur.execute(
                "INSERT INTO batches (source, staging_dir, started_at, finished_at, files, bytes, "
                "hash_seconds, status, committed) VALUES ('east', 's', 100, 101, 1, 5, 0, 'committed', 1) "
                "RETURNING id"
            )
            (batch,) = cur.fetchone()
            cur.execute(
                "INSERT INTO files (source, relpath, name, size, mtime_ns, inode, state, attempts, "
                "next_try, detected_at, committed_at, held_at, updated_at, held_as, last_batch) VALUES "
                "('east', %s, 'old.fits', 5, 1, 2, 'held', 1, 0, 99, 101, 101, 101, 'old.fits', %s) "
                "RETURNING id",
                (psycopg2.Binary(b"old.fits"), batch),
            )
            (file,) = cur.fetchone()
            cur.execute(
                "INSERT INTO attempts (batch_id, file_id, outcome) VALUES (%s, %s, 'committed')",
                (batch, file),
            )
        conn.close()
        site = Site(tmp_path, engine=postgres.url(old))
        site.configure(name="east")
        config = str(site.config_path)
        before = site.hdfmgr("status", config)
        assert_one_line(before, 78)
        assert "older hdfmgr schema; run 'hdfmgr initdb'" in before.stderr

        init = site.hdfmgr("initdb", config)
        assert init.returncode == 0, init.stderr
        assert (
            f"migrated from an unversioned hdfmgr schema (1-4) to schema version {SCHEMA_VERSION}"
            in init.stdout
        )
        other = Site(tmp_path / "fresh", engine=postgres.url(fresh))
        assert other.hdfmgr("initdb", str(other.config_path)).returncode == 0

        def schema(name: str) -> list[tuple[object, ...]]:
            c = postgres.connect(name)
            try:
                with c.cursor() as cur:
                    cur.execute(PG_SCHEMA)
                    return cur.fetchall()
            finally:
                c.close()

        assert schema(old) == schema(fresh)
        show = site.hdfmgr("show", config, "old.fits")
        assert show.returncode == 0 and "held" in show.stdout and f"try 1: batch {batch}" in show.stdout
        site.write("new.fits", content("new"))
        run = site.hdfmgr("rescan", config)
        assert run.returncode == 0, run.stderr
        assert site.delivered() == {"new.fits": content("new")}
        assert "Traceback" not in before.stderr + init.stderr + show.stderr + run.stderr
    finally:
        postgres.drop_database(old)
        postgres.drop_database(fresh)


# --------------------------------------------------------------- databases hdfmgr cannot use

COMMANDS = [
    ("initdb",),
    ("run",),
    ("rescan",),
    ("status",),
    ("files",),
    ("show", "x.fits"),
    ("retry",),
    ("metrics",),
    ("report", "--output=r.png"),
    ("dropdb", "--yes"),
]


def _unknown(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE files (id INTEGER PRIMARY KEY, path TEXT, owner TEXT)")


def _newer(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE hdfmgr_schema (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO hdfmgr_schema VALUES (99)")


def _original_half(conn: sqlite3.Connection) -> None:
    conn.executescript((SCHEMAS / "original-sqlite.sql").read_text())
    conn.execute("DROP TABLE file_transfer_attempts")


def _original(conn: sqlite3.Connection) -> None:
    conn.executescript((SCHEMAS / "original-sqlite.sql").read_text())


UNUSABLE = {
    "unknown": (_unknown, "is not an hdfmgr database nor the original manager's (table files"),
    "newer": (_newer, "hdfmgr schema version 99, newer than this hdfmgr's"),
    "original-incomplete": (_original_half, "table file_transfer_attempts is missing"),
    "original": (_original, "stop the original manager, then run 'hdfmgr initdb'"),
}


@pytest.mark.parametrize("kind", list(UNUSABLE))
def test_every_command_refuses_a_database_it_cannot_use_with_one_line(tmp_path: Path, kind: str) -> None:
    make, message = UNUSABLE[kind]
    site = Site(tmp_path)
    with sqlite3.connect(site.db_path) as conn:
        make(conn)
    before = site.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")
    for command, *rest in COMMANDS:
        if kind == "original" and command == "initdb":
            continue  # initdb takes it over (tests above)
        result = site.hdfmgr(command, str(site.config_path), *rest, timeout=30)
        assert_one_line(result, cli.EX_CONFIG)
        assert message in result.stderr, (command, result.stderr)
        assert result.stderr.startswith("hdfmgr: database "), result.stderr
    assert site.query("SELECT type, name, sql FROM sqlite_master ORDER BY name") == before


#: Not an SQLite file at all (another program's file at database.engine's path).
NOT_A_DATABASE = b"not a database: " + bytes(range(256)) * 16


def test_every_command_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    """Retrying cannot help: 78 (before, 73, which systemd restarts every 10 s for ever)."""
    site = Site(tmp_path)
    site.db_path.write_bytes(NOT_A_DATABASE)
    for command, *rest in COMMANDS:
        result = site.hdfmgr(command, str(site.config_path), *rest, timeout=30)
        assert_one_line(result, cli.EX_CONFIG)
        assert "is not a database (the file holds something else)" in result.stderr, (command, result.stderr)
    assert site.db_path.read_bytes() == NOT_A_DATABASE


def test_every_command_refuses_a_foreign_postgresql_database(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    name = postgres.create_database("foreign")
    try:
        conn = postgres.connect(name)
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE batches (id SERIAL PRIMARY KEY, label TEXT)")
        conn.close()
        site = Site(tmp_path, engine=postgres.url(name))
        for command, *rest in COMMANDS:
            result = site.hdfmgr(command, str(site.config_path), *rest, timeout=30)
            assert_one_line(result, cli.EX_CONFIG)
            found = "table batches without columns bytes, command, commit_seconds and 16 more"
            assert f"({found} and with unknown column label)" in result.stderr
    finally:
        postgres.drop_database(name)


def test_the_refusal_status_stops_systemds_restart_loop() -> None:
    for name in UNITS:
        assert str(cli.EX_CONFIG) in unit(name)["Service"]["RestartPreventExitStatus"].split()


#: What the systemd units run (ExecStart=.../hdfmgr-watch): the console script's entry point.
WATCH = "import sys; from hdfmgr.cli import watch_main; sys.exit(watch_main())"


@pytest.mark.parametrize("kind", ["newer", "original", "unknown", "not-a-database"])
def test_hdfmgr_watch_refuses_an_unusable_database_at_once(tmp_path: Path, kind: str) -> None:
    """hdfmgr-watch, as the units start it: one line and 78 (RestartPreventExitStatus), at
    once; never a traceback nor a pause-and-retry loop."""
    site = Site(tmp_path)
    if kind == "not-a-database":
        site.db_path.write_bytes(NOT_A_DATABASE)
        message = "is not a database"
    else:
        make, message = UNUSABLE[kind]
        with sqlite3.connect(site.db_path) as conn:
            make(conn)
    log = open(site.root / "watch.log", "w+b")  # noqa: SIM115  (Daemon closes it)
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCH, str(site.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=site.root,
        start_new_session=True,
    )
    daemon = Daemon(proc, log)
    STARTED.append(daemon)
    try:
        status = proc.wait(30)
    finally:
        daemon.close()
    assert status == cli.EX_CONFIG
    output = daemon.output()
    assert "Traceback" not in output and message in output
    assert len(output.strip().splitlines()) == 1, output


def test_dropdb_never_drops_the_originals_tables(tmp_path: Path) -> None:
    """With a config in hdfmgr's own words, so that the refusal is the database's (with the
    original's file an hdfmgr that did not know its keys refused the file instead)."""
    site = Site(tmp_path)
    make_original_sqlite(site.db_path)
    result = site.hdfmgr("dropdb", "--yes", str(site.config_path))
    assert_one_line(result, cli.EX_CONFIG)
    assert "original handoff manager's" in result.stderr
    counts = [site.query(f"SELECT COUNT(*) FROM {t}")[0][0] for t in ORIGINAL_TABLES]
    assert counts == [5, 4, 4]


def test_a_file_the_original_delivered_but_did_not_hold_is_held_not_sent_again(tmp_path: Path) -> None:
    """The original delivered it (its batch succeeded) and stopped before moving it to holding:
    the file is still in the buffer, unchanged. It is taken over as committed, so the first
    start holds it without sending it again (before: ready, a second delivery)."""
    from hdfmgr.importer import file_row

    path = tmp_path / "a.fits"
    path.write_bytes(b"x" * 10)
    st = path.stat()
    created = dt.datetime.fromtimestamp(st.st_mtime_ns / 1e9).isoformat(sep=" ")
    row = (7, "night1", "a.fits", "0" * 128, 10, created, None, None)
    taken = file_row(row, source="s", tries=1, last_batch=3, delivered=st.st_mtime + 5, present=st)
    assert taken["state"] == "committed"
    undelivered = file_row(row, source="s", tries=1, last_batch=3, delivered=None, present=st)
    assert undelivered["state"] == "ready"
