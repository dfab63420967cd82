"""The audit trail: peewee models, the database behind a URL, the schema.

Paths are stored as raw bytes (``relpath``), because Linux filenames need not be UTF-8 and
SQLite text must be; ``name`` holds a readable rendering for people and queries.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from enum import StrEnum
from pathlib import Path

import peewee as pw
from playhouse.db_url import connect as connect_url

from .config import Config, sqlite_path

proxy = pw.DatabaseProxy()


class State(StrEnum):
    """Per-file states; each is committed to the database before the side effect after it."""

    READY = "ready"  # settled in the buffer, waiting for a slot (or for next_try after a failure)
    STAGING = "staging"  # a batch is transferring it into endpoint staging
    COMMITTING = "committing"  # verified-and-mv is running: it may already be in the endpoint buffer
    COMMITTED = "committed"  # in the endpoint buffer, verified; the local file is still in the buffer
    HELD = "held"  # done: delivered and moved to holding
    FAILED = "failed"  # the last attempt failed; retried at next_try
    QUARANTINED = "quarantined"  # needs an operator (``hdfmgr retry`` re-queues it)


#: The backlog: files waiting to be delivered (``status``, metrics).
WAITING_STATES = (State.READY.value, State.FAILED.value, State.STAGING.value, State.COMMITTING.value)


class BaseModel(pw.Model):
    class Meta:
        database = proxy
        legacy_table_names = False


class FileRecord(BaseModel):
    """One version of one file: a new size or mtime at the same path is a new row."""

    source = pw.CharField(max_length=128)
    relpath = pw.BlobField()
    name = pw.TextField()
    size = pw.BigIntegerField()
    mtime_ns = pw.BigIntegerField()
    inode = pw.BigIntegerField()
    checksum = pw.CharField(max_length=128, null=True)
    state = pw.CharField(max_length=16, default=State.READY.value)
    attempts = pw.IntegerField(default=0)
    next_try = pw.DoubleField(default=0.0)
    error_class = pw.CharField(max_length=16, null=True)
    last_error = pw.TextField(null=True)
    held_as = pw.TextField(null=True)
    detected_at = pw.DoubleField()
    ready_at = pw.DoubleField(null=True)
    committed_at = pw.DoubleField(null=True)
    held_at = pw.DoubleField(null=True)
    updated_at = pw.DoubleField()
    last_batch = pw.IntegerField(null=True)

    class Meta:
        table_name = "files"
        indexes = (
            # Counts by state, and the backlog: its rows, and its oldest file with one seek per
            # waiting state. Every write of a file's state rewrites its entries in each index
            # below that holds "state", so there is only this one.
            (("source", "state", "detected_at"), False),
            (("source", "relpath"), False),
            # status, metrics and `hdfmgr files`: last commit, throughput windows, arrivals.
            (("source", "committed_at"), False),
            (("committed_at",), False),
            (("source", "detected_at"), False),
            (("detected_at",), False),
        )


#: Indexes of earlier versions, dropped when the schema is opened: each cost every state write
#: a second index update (a partial index on the waiting states, and (state, updated_at)).
RETIRED_INDEXES = ("files_waiting", "files_state_updated_at", "files_source_state")


class TransferBatch(BaseModel):
    """One batch: the commands it ran, per phase start and duration, and how it ended."""

    source = pw.CharField(max_length=128)
    staging_dir = pw.TextField()
    started_at = pw.DoubleField()
    finished_at = pw.DoubleField(null=True)
    files = pw.IntegerField()
    bytes = pw.BigIntegerField()
    hash_seconds = pw.DoubleField(default=0.0)
    prepare_seconds = pw.DoubleField(null=True)
    transfer_started = pw.DoubleField(null=True)
    transfer_seconds = pw.DoubleField(null=True)
    commit_started = pw.DoubleField(null=True)
    commit_seconds = pw.DoubleField(null=True)
    rate = pw.DoubleField(null=True)
    status = pw.CharField(max_length=16, default="running")
    error_class = pw.CharField(max_length=16, null=True)
    returncode = pw.IntegerField(null=True)
    stderr = pw.TextField(null=True)
    command = pw.TextField(null=True)
    committed = pw.IntegerField(default=0)

    class Meta:
        table_name = "batches"
        indexes = (
            (("source", "started_at"), False),
            (("status",), False),
            (("source", "finished_at"), False),
        )


class Attempt(BaseModel):
    """The link between a batch and each file it carried, with that file's outcome."""

    batch = pw.ForeignKeyField(TransferBatch, backref="attempts", on_delete="CASCADE")
    file = pw.ForeignKeyField(FileRecord, backref="tries", on_delete="CASCADE")
    outcome = pw.CharField(max_length=16, default="running")
    error = pw.TextField(null=True)

    class Meta:
        table_name = "attempts"


MODELS = (FileRecord, TransferBatch, Attempt)


class DatabaseFailure(Exception):
    """A statement failed while running: a full disk, a lost connection, a lock held too long."""


class DatabaseUnresponsive(DatabaseFailure):
    """The server did not answer in time: a statement ran past ``database.timeout`` (a lock
    held by another session, an overloaded server) or the connection died without a reset
    (found by TCP keepalives). The supervisor reconnects, as after any failure."""


def failure(exc: BaseException) -> DatabaseFailure:
    """The :class:`DatabaseFailure` (or its :class:`DatabaseUnresponsive` kind) for ``exc``."""
    message = describe_error(exc)
    lowered = message.lower()
    if any(sign in lowered for sign in UNRESPONSIVE_SIGNS):
        return DatabaseUnresponsive(message)
    return DatabaseFailure(message)


#: How PostgreSQL and libpq word "did not answer in time".
UNRESPONSIVE_SIGNS = (
    "statement timeout",
    "lock timeout",
    "timeout expired",
    "connection timed out",
    "server closed the connection unexpectedly",
)


def errors() -> tuple[type[BaseException], ...]:
    """What a failed statement raises: peewee's wrapper, or the driver's own error from a raw
    cursor (the bulk writes use ``executemany`` directly)."""
    found: list[type[BaseException]] = [pw.PeeweeException, sqlite3.Error]
    psycopg2 = sys.modules.get("psycopg2")
    if psycopg2 is not None:
        found.append(psycopg2.Error)
    return tuple(found)


def not_a_database(exc: BaseException) -> bool:
    """Whether opening the database failed because the SQLite file holds something else.

    Retrying cannot help (unlike a server that is away): the CLI treats it as a database
    hdfmgr cannot use, exit status 78, which stops systemd's restart loop.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if (
            isinstance(seen, sqlite3.DatabaseError)
            and getattr(seen, "sqlite_errorname", "") == "SQLITE_NOTADB"
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """The first line of the error that started it.

    On a full disk SQLite ends the transaction itself, so the ROLLBACK after the failed
    statement fails too ("no transaction is active") and would hide the real cause.
    """
    known = errors()
    while isinstance(exc.__context__, known):
        exc = exc.__context__
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def connect(config: Config, *, daemon: bool = False) -> pw.Database:
    """Open the configured database and bind the models to it (schema created if missing).

    With ``daemon`` a PostgreSQL session also gets a statement timeout of ``database.timeout``
    (a statement blocked by another session's lock, or a server that stops answering, fails
    instead of holding the loop and SIGTERM for ever) and TCP keepalives plus a TCP user
    timeout (a connection that died without a reset is found within about a minute). The
    commands an operator runs (status, report) keep no statement timeout: a long report is
    not a failure.
    """
    url = config.database
    if url.startswith("sqlite:"):
        path = sqlite_path(url, config.path.parent)
        db: pw.Database = pw.SqliteDatabase(
            os.fspath(path),
            timeout=config.database_timeout,
            # Every transaction takes the write lock at BEGIN: a transaction that reads first
            # and writes later fails at once ("database is locked", no busy wait) when another
            # process wrote in between.
            lock_type="IMMEDIATE",
            pragmas={
                "journal_mode": "wal",
                # FULL: every commit syncs the log. With NORMAL a power cut may roll back the
                # COMMITTING checkpoint written just before the remote mv (or the COMMITTED
                # written before a slot directory is swept), and the restart would send a
                # delivered file again. Measured (scripts/durability_cost.py): 2.6 ms more per
                # batch, 2.3x the database time of a one-file batch, 1.5x at 100 files.
                "synchronous": "full",
                "foreign_keys": 1,
                # SQLite's default 2 MB page cache. The pages stay in the OS page cache anyway;
                # 16 MB here cost the daemon 16 MB of RSS with 100,000 files waiting
                # (scripts/bench, scale) and no measurable time at start-up or in a drain.
                "cache_size": -2000,
            },
        )
    else:
        # psycopg2 gives up connecting after connect_timeout seconds (it waits forever without).
        options: dict[str, object] = {"connect_timeout": max(1, round(config.database_timeout))}
        if daemon:
            milliseconds = max(1, round(config.database_timeout * 1000))
            options.update(
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
                tcp_user_timeout=max(milliseconds, 30000),
                options=f"-c statement_timeout={milliseconds}",
            )
        db = connect_url(url, **options)
    proxy.initialize(db)
    db.connect(reuse_if_open=True)
    return db


def create_schema(db: pw.Database) -> None:
    """Create or migrate hdfmgr's schema; raise ``schema.SchemaError`` on a foreign one."""
    from .schema import ensure

    ensure(db, source="", location=str(db.database))


def drop_schema(db: pw.Database) -> None:
    from .schema import VERSION_TABLE

    with db.atomic():
        db.drop_tables(MODELS, safe=True)
        db.execute_sql(f'DROP TABLE IF EXISTS "{VERSION_TABLE}"')


def schema_exists(db: pw.Database) -> bool:
    return all(db.table_exists(model._meta.table_name) for model in MODELS)


def display(rel: str) -> str:
    """A readable, lossless-enough rendering of a path for people and LIKE queries."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def to_blob(rel: str) -> bytes:
    return os.fsencode(rel)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def from_blob(value: bytes | memoryview) -> str:
    """``os.fsdecode``, spelled out: a restart decodes every unfinished file's path."""
    return bytes(value).decode(_FS_ENCODING, _FS_ERRORS)


def database_location(config: Config) -> str:
    """Where the database is, for messages (never prints a password)."""
    if config.database.startswith("sqlite:"):
        return os.fspath(sqlite_path(config.database, Path(config.path).parent))
    return config.database.split("@")[-1]
