"""A real PostgreSQL server on loopback for the database tests, one per test session.

The server comes from Debian's ``postgresql`` package (``scripts/test`` installs it when
``/usr/lib/postgresql/*/bin/initdb`` is missing). ``initdb`` runs into a temporary directory;
the server listens on 127.0.0.1 at a free port, with its unix socket in the same directory,
and stops when the session ends. PostgreSQL refuses to run as root, so as root the server runs
as the ``postgres`` system user (which the Debian package creates) via ``runuser``.

These tests are never skipped: a missing server is an error.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    root: Path

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg2

        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, dbname=database)
        conn.autocommit = True
        return conn

    def create_database(self, prefix: str = "hdfmgr") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return name

    def drop_database(self, name: str) -> None:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            conn.close()


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb is missing): "
            "run scripts/test, which installs Debian's postgresql package"
        )
    return Path(found[-1]).parent


def _version(path: str) -> tuple[int, ...]:
    part = path.split("/")[4]
    return tuple(int(p) for p in part.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_as() -> tuple[list[str], int | None, int | None]:
    """The command prefix that runs the server's tools, and the uid/gid owning its files."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root needs the 'postgres' system user (created by Debian's postgresql package)"
        ) from None
    return ["runuser", "-u", "postgres", "--"], account.pw_uid, account.pw_gid


def start_server() -> PostgresServer:
    bindir = postgres_bin()
    prefix, uid, gid = _run_as()
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as
    # another user.
    root = Path(tempfile.mkdtemp(prefix="hdfmgr-pg-"))
    if uid is not None:
        os.chown(root, uid, gid or -1)
    data = root / "data"
    user = "hdfmgr"
    subprocess.run(
        [
            *prefix,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            user,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
            "--locale=C",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    port = free_port()
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=50"
    )
    started = subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        log = (root / "server.log").read_text(errors="replace") if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start: {started.stderr}\n{log}")
    return PostgresServer("127.0.0.1", port, user, root)


def stop_server(server: PostgresServer) -> None:
    prefix, _, _ = _run_as()
    subprocess.run(
        [
            *prefix,
            str(postgres_bin() / "pg_ctl"),
            "-D",
            str(server.root / "data"),
            "-m",
            "fast",
            "-w",
            "stop",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = start_server()
    try:
        yield server
    finally:
        stop_server(server)


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str | None:
    """database.engine for a Site: None (a SQLite file in the site) or a fresh PostgreSQL database.

    Tests that take this fixture run once against each; the PostgreSQL server starts on first
    use.
    """
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres_url")
