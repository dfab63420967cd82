"""PostgreSQL as the central database of a fleet: the real daemon records into a real server.

The server is tests/pg_fixture.py's (127.0.0.1, its own port, a fresh database per test). The
status, audit and metrics tests run against it too, through the ``engine`` fixture.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psycopg2

from tests.pg_fixture import PostgresServer
from tests.site import HOSTILE_NAMES, Site, wait_for


def pg_rows(url: str, sql: str) -> list[tuple]:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


def pg_states(url: str, source: str) -> dict[str, str]:
    rows = pg_rows(url, f"select relpath, state from files where source = '{source}' order by id")
    return {os.fsdecode(bytes(r[0])): r[1] for r in rows}


def test_two_hosts_deliver_and_record_into_one_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    name = postgres.create_database("fleet")
    url = postgres.url(name)
    try:
        east = Site(tmp_path / "east", engine=url)
        west = Site(tmp_path / "west", engine=url)
        east.configure(name="east", verify="checksum")
        west.configure(name="west")
        init = east.hdfmgr("initdb", str(east.config_path))
        assert init.returncode == 0, init.stderr
        files = {f"night/{n}": os.fsencode(n) for n in HOSTILE_NAMES}
        files["night/" + os.fsdecode(b"raw-\xff.fits")] = b"not utf-8"
        files["big.fits"] = os.urandom(3 * 1024 * 1024)
        daemons = [east.start(), west.start()]
        try:
            east.write_many(files)
            west.write_many({"w1.fits": b"w1", "w2.fits": b"w2"})
            wait_for(lambda: east.held() == files, 30, "east delivered and held")
            wait_for(lambda: west.held() == {"w1.fits": b"w1", "w2.fits": b"w2"}, 30, "west held")
            wait_for(lambda: set(pg_states(url, "east").values()) == {"held"}, 10, "east recorded")
            wait_for(lambda: set(pg_states(url, "west").values()) == {"held"}, 10, "west recorded")
        finally:
            for daemon in daemons:
                assert daemon.stop() == 0, daemon.output()
        assert east.delivered() == files
        # Paths survive byte for byte (bytea), each row says where it came from.
        assert set(pg_states(url, "east")) == set(files)
        assert pg_rows(url, "select distinct source from batches order by 1") == [("east",), ("west",)]
        checks = pg_rows(url, "select count(*) from files where source = 'east' and checksum is not null")
        assert checks == [(len(files),)]
        attempts = pg_rows(url, "select count(*), min(outcome), max(outcome) from attempts")
        assert attempts == [(len(files) + 2, "committed", "committed")]

        mine = json.loads(east.hdfmgr("status", "--json", str(east.config_path)).stdout)
        assert mine["source"] == "east" and mine["states"]["held"] == len(files)
        fleet = json.loads(east.hdfmgr("status", "--json", "--all", str(east.config_path)).stdout)
        assert fleet["states"]["held"] == len(files) + 2
        assert [s["source"] for s in fleet["sources"]] == ["east", "west"]
        listed = json.loads(west.hdfmgr("files", "--json", str(west.config_path)).stdout)
        assert {r["name"] for r in listed} == {"w1.fits", "w2.fits"}
        shown = east.hdfmgr("show", str(east.config_path), "big.fits")
        assert shown.returncode == 0 and "committed in" in shown.stdout, shown.stdout + shown.stderr

        # A rescan pass records into the same database.
        west.write("late.fits", b"late")
        rescan = west.hdfmgr("rescan", str(west.config_path))
        assert rescan.returncode == 0, rescan.stderr
        assert pg_states(url, "west")["late.fits"] == "held"
    finally:
        postgres.drop_database(name)


def test_unreachable_postgresql_exits_73(tmp_path: Path, postgres: PostgresServer) -> None:
    from tests.pg_fixture import free_port

    site = Site(tmp_path, engine=f"postgresql://hdfmgr@127.0.0.1:{free_port()}/nothing")
    result = site.hdfmgr("status", str(site.config_path))
    assert result.returncode == 73
    assert "cannot open database 127.0.0.1" in result.stderr and "Traceback" not in result.stderr


def test_a_dropped_connection_pauses_then_delivery_resumes(tmp_path: Path, postgres: PostgresServer) -> None:
    """The server ends the daemon's session (a restart or failover does): one line, a fresh
    connection, and nothing lost or sent twice."""
    name = postgres.create_database("dropped")
    url = postgres.url(name)
    try:
        site = Site(tmp_path / "site", engine=url)
        site.configure(name="east")
        assert site.hdfmgr("initdb", str(site.config_path)).returncode == 0
        daemon = site.start()
        try:
            site.write("a/one.fits", b"1")
            wait_for(lambda: pg_states(url, "east").get("a/one.fits") == "held", 20, "first delivery")
            ended = pg_rows(
                url,
                "select pg_terminate_backend(pid) from pg_stat_activity "
                f"where datname = '{name}' and pid <> pg_backend_pid()",
            )
            assert ended and all(ok for (ok,) in ended)
            site.write("a/two.fits", b"2")
            wait_for(lambda: pg_states(url, "east").get("a/two.fits") == "held", 30, "delivery after")
        finally:
            assert daemon.stop() == 0, daemon.output()
        assert site.held() == {"a/one.fits": b"1", "a/two.fits": b"2"}
        assert site.delivered() == {"a/one.fits": b"1", "a/two.fits": b"2"}
        output = daemon.output()
        assert output.count("delivery paused") == 1, output
        assert "writes succeed again" in output and "Traceback" not in output
        committed = pg_rows(url, "select count(*) from attempts where outcome = 'committed'")
        assert committed == [(2,)]
    finally:
        postgres.drop_database(name)


def test_a_statement_blocked_by_another_session_times_out_and_the_daemon_reconnects(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    """PostgreSQL stops answering the daemon (here: a lock another session holds): the
    statement times out (database.timeout), the supervisor reconnects, SIGTERM is not stuck."""
    name = postgres.create_database("blocked")
    url = postgres.url(name)
    try:
        site = Site(tmp_path / "site", engine=url)
        site.configure(name="east", database={"timeout": 2})
        assert site.hdfmgr("initdb", str(site.config_path)).returncode == 0
        daemon = site.start()
        blocker = psycopg2.connect(url)
        try:
            site.write("one.fits", b"1")
            wait_for(lambda: pg_states(url, "east").get("one.fits") == "held", 20, "first delivery")
            with blocker.cursor() as cur:
                cur.execute("LOCK TABLE files IN ACCESS EXCLUSIVE MODE")
            site.write("two.fits", b"2")
            wait_for(lambda: "delivery paused" in daemon.output(), 20, "the blocked statement to time out")
            assert "statement timeout" in daemon.output()
            blocker.rollback()
            wait_for(lambda: pg_states(url, "east").get("two.fits") == "held", 30, "delivery after")
            with blocker.cursor() as cur:
                cur.execute("LOCK TABLE files IN ACCESS EXCLUSIVE MODE")
            site.write("three.fits", b"3")
            wait_for(lambda: daemon.output().count("statement timeout") >= 2, 20, "blocked again")
            t0 = time.monotonic()
            daemon.stop(timeout=20)
            assert time.monotonic() - t0 < 10
        finally:
            blocker.close()
            if daemon.proc.poll() is None:
                daemon.kill()
        output = daemon.output()
        # Two episodes, each one line; the class of failure is named.
        assert output.count("did not answer in time: canceling statement due to statement timeout") == 2
        assert output.count("delivery paused") == 2, output
        assert "writes succeed again" in output and "Traceback" not in output
    finally:
        postgres.drop_database(name)


def test_the_daemons_session_has_keepalives_and_a_statement_timeout(
    tmp_path: Path, postgres_url: str
) -> None:
    """A server that stops answering without a reset is found by TCP keepalives and a TCP
    user timeout, a statement that hangs ends at database.timeout; the operator's commands
    keep no statement timeout (a long report is no failure)."""
    from hdfmgr import config as config_mod
    from hdfmgr import db as dbm

    site = Site(tmp_path / "site", engine=postgres_url)
    site.configure(database={"timeout": 2.5})
    cfg = config_mod.load(str(site.config_path))
    daemon = dbm.connect(cfg, daemon=True)
    try:
        params = daemon.connection().info.dsn_parameters
        assert (params["keepalives"], params["keepalives_idle"]) == ("1", "30")
        assert (params["keepalives_interval"], params["keepalives_count"]) == ("10", "3")
        assert params["tcp_user_timeout"] == "30000"
        assert daemon.execute_sql("SHOW statement_timeout").fetchone() == ("2500ms",)
        try:
            daemon.execute_sql("SELECT pg_sleep(10)")
        except dbm.errors() as exc:
            failure = dbm.failure(exc)
        else:
            raise AssertionError("pg_sleep(10) outlived a 2.5 s statement timeout")
        assert isinstance(failure, dbm.DatabaseUnresponsive), failure
    finally:
        daemon.close()
    operator = dbm.connect(cfg)
    try:
        assert operator.execute_sql("SHOW statement_timeout").fetchone() == ("0",)
        assert "keepalives" not in operator.connection().info.dsn_parameters
    finally:
        operator.close()
