"""Synthetic audit trails for the status, audit and metrics tests (written with insert_many)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hdfmgr import config as config_mod
from hdfmgr import db as dbm
from hdfmgr.db import Attempt, FileRecord, TransferBatch
from tests.site import Site


@contextmanager
def recording_site(tmp_path: Path, engine: str | None) -> Iterator[Site]:
    """A site named cam1 whose database (SQLite or the test PostgreSQL) has the schema."""
    site = Site(tmp_path, engine=engine)
    site.configure(name="cam1")
    database = dbm.connect(config_mod.load(site.config_path))
    dbm.create_schema(database)
    try:
        yield site
    finally:
        database.close()


def file_row(
    source: str,
    rel: str,
    *,
    state: str = "held",
    size: int = 1000,
    detected: float,
    committed: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    row = {
        "source": source,
        "relpath": dbm.to_blob(rel),
        "name": dbm.display(rel),
        "size": size,
        "mtime_ns": int(detected * 1e9),
        "inode": abs(hash(rel)) % (1 << 40),
        "state": state,
        "attempts": 1 if committed is not None else 0,
        "detected_at": detected,
        "ready_at": detected,
        "committed_at": committed,
        "held_at": committed if state == "held" else None,
        "updated_at": committed or detected,
        # Every row has every key: insert_files sends tuples in the first row's column order.
        "checksum": None,
        "next_try": 0.0,
        "error_class": None,
        "last_error": None,
        "held_as": None,
    }
    row.update(extra)
    return row


def insert_files(rows: Iterable[dict[str, Any]], chunk: int = 1000) -> int:
    """Insert rows with ``insert_many`` (one transaction per chunk); returns how many.

    Rows go in as tuples in a fixed column order: peewee builds the query much faster so.
    """
    database = FileRecord._meta.database
    fields: list[Any] | None = None
    n = 0
    pending: list[tuple[Any, ...]] = []

    def flush() -> None:
        with database.atomic():
            FileRecord.insert_many(pending, fields=fields).execute()

    for row in rows:
        if fields is None:
            names = list(row)
            fields = [getattr(FileRecord, name) for name in names]
        pending.append(tuple(row[name] for name in names))
        if len(pending) == chunk:
            flush()
            n += len(pending)
            pending = []
    if pending:
        flush()
        n += len(pending)
    return n


def batch(
    source: str,
    *,
    started: float,
    status: str = "committed",
    files: int = 1,
    committed: int | None = None,
    error_class: str | None = None,
    stderr: str | None = None,
    returncode: int | None = 0,
    seconds: float = 0.5,
    nbytes: int = 1000,
) -> TransferBatch:
    return TransferBatch.create(
        source=source,
        staging_dir=f"/staging/hdfmgr.{source}.x.0",
        started_at=started,
        finished_at=started + seconds,
        files=files,
        bytes=nbytes,
        transfer_seconds=seconds / 2,
        commit_seconds=seconds / 4,
        rate=nbytes / (seconds / 2),
        status=status,
        error_class=error_class,
        returncode=returncode,
        stderr=stderr,
        committed=files if committed is None else committed,
    )


def attempt(
    batch_row: TransferBatch, file_id: int, outcome: str = "committed", error: str | None = None
) -> None:
    Attempt.create(batch=batch_row.id, file=file_id, outcome=outcome, error=error)


def rel_of(row: FileRecord) -> str:
    return os.fsdecode(bytes(row.relpath))
