"""The original handoff manager's history, imported into hdfmgr's tables at the take-over.

The original recorded each file (``relpath`` is its directory relative to the buffer, with
``filename`` beside it; ``created_on`` its mtime; ``held_on`` when it was moved to holding),
each transfer batch (start and duration of its three phases, its size and rate in MiB/s, a
status: 0 ok, 121 a command exited non-zero, 62 a command timed out, and the error text), and
which batch carried which file. Its times are naive local times (``datetime.fromtimestamp``),
read here in the local time zone of the host running ``initdb``; its durations are SQLAlchemy
Intervals, which SQLite stores as a DATETIME offset from 1970-01-01.

Rows keep their ids (hdfmgr's tables are new and empty), so attempts link as they did. A file
the original moved to holding is ``held``. A file it did not is looked for in the buffer: the
same file (its size, and its mtime to the microsecond the original stored) is ``ready``, with
its inode, and hdfmgr delivers it as the next try of this same record; its checksum is left to
hdfmgr (the original's digest is kept in its own table). Otherwise the original's version is
gone (deleted, or replaced: hdfmgr sends a replacement as a new version) and the record is
``quarantined`` with a note saying which: an operator should know.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import peewee as pw

from .db import Attempt, FileRecord, State, TransferBatch, display, to_blob

#: Rows per INSERT: under SQLite's limit on bound parameters at 20 columns a row.
CHUNK = 500

_EPOCH = dt.datetime(1970, 1, 1)

#: The original's status codes (errno values it used for outcomes) and hdfmgr's error classes.
_ERROR_CLASSES = {62: "timeout", 121: "remote"}

GONE = "the original manager never delivered it, and it was not in the buffer at the take-over"
REPLACED = (
    "the original manager never delivered this version; the buffer held another one at the "
    "take-over (hdfmgr sends that one)"
)


def timestamp(value: Any) -> float | None:
    """A naive local DATETIME (a string on SQLite, a datetime on PostgreSQL) as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return float(value)


def seconds(value: Any) -> float | None:
    """An SQLAlchemy Interval: a timedelta, or on SQLite a DATETIME offset from 1970-01-01."""
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        return (dt.datetime.fromisoformat(value) - _EPOCH).total_seconds()
    if isinstance(value, dt.datetime):
        return (value.replace(tzinfo=None) - _EPOCH).total_seconds()
    return float(value)


def _ended(*phases: tuple[float | None, float | None]) -> float | None:
    ends = [start + (length or 0.0) for start, length in phases if start is not None]
    return max(ends) if ends else None


def batch_row(row: tuple[Any, ...], *, source: str, files: int) -> dict[str, Any]:
    """One original batch as hdfmgr's ``batches`` row (pure, for tests)."""
    (bid, pre_start, pre_len, trans_start, trans_len, post_start, post_len, size, rate, status, err) = row
    pre_start, trans_start, post_start = timestamp(pre_start), timestamp(trans_start), timestamp(post_start)
    pre_len, trans_len, post_len = seconds(pre_len), seconds(trans_len), seconds(post_len)
    started = next((t for t in (pre_start, trans_start, post_start) if t is not None), 0.0)
    ok = status == 0
    return {
        "id": bid,
        "source": source,
        "staging_dir": "(original manager)",
        "started_at": started,
        "finished_at": _ended((pre_start, pre_len), (trans_start, trans_len), (post_start, post_len)),
        "files": files,
        "bytes": int(size or 0),
        "hash_seconds": 0.0,
        "prepare_seconds": pre_len,
        "transfer_started": trans_start,
        "transfer_seconds": trans_len,
        "commit_started": post_start,
        "commit_seconds": post_len,
        # MiB/s (the original divided by 1024**2) to bytes/s.
        "rate": float(rate) * 1024 * 1024 if isinstance(rate, int | float | Decimal) else None,
        "status": "committed" if ok else "failed",
        "error_class": None if ok else _ERROR_CLASSES.get(status, "remote"),
        "returncode": None,
        "stderr": err,
        "command": f"(imported from the original manager: batch {bid}, status {status})",
        "committed": files if ok else 0,
    }


def file_row(
    row: tuple[Any, ...],
    *,
    source: str,
    tries: int,
    last_batch: int | None,
    delivered: float | None,
    present: os.stat_result | None = None,
) -> dict[str, Any]:
    """One original file as hdfmgr's ``files`` row (pure, for tests).

    ``present``: the stat of the file now at its path in the buffer, if any.
    """
    fid, relpath, filename, checksum, size, created_on, held_on, _deleted_on = row
    # Versions of the original kept a top-level file's directory as "" or as "." (relpath).
    rel = os.path.normpath(os.path.join(relpath or "", filename))
    mtime = timestamp(created_on) or 0.0
    held = timestamp(held_on)
    held_state = held is not None
    same = (
        not held_state
        and present is not None
        and present.st_size == size
        and abs(present.st_mtime_ns / 1e9 - mtime) < 2e-6
    )
    if held_state:
        state, note = State.HELD, None
    elif same and delivered is not None:
        # The original delivered it and stopped before moving it to holding: the restart
        # holds it without sending it again.
        state, note = State.COMMITTED, None
    elif same:
        state, note = State.READY, None
    else:
        state, note = State.QUARANTINED, (REPLACED if present is not None else GONE)
    return {
        "id": fid,
        "source": source,
        "relpath": to_blob(rel),
        "name": display(rel),
        "size": int(size),
        "mtime_ns": present.st_mtime_ns if same and present else round(mtime * 1e9),
        "inode": present.st_ino if same and present else 0,
        "checksum": None if same else (checksum or None),
        "state": state.value,
        "attempts": tries,
        "next_try": 0.0,
        "error_class": None if note is None else "original",
        "last_error": note,
        "held_as": display(rel) if held_state else None,
        "detected_at": mtime,
        "ready_at": mtime,
        "committed_at": delivered if delivered is not None else held,
        "held_at": held,
        "updated_at": max(t for t in (mtime, delivered, held) if t is not None),
        "last_batch": last_batch,
    }


def _chunks(cursor: Any) -> Iterator[list[tuple[Any, ...]]]:
    while True:
        rows = cursor.fetchmany(CHUNK)
        if not rows:
            return
        yield rows


def _stat(buffer: str, relpath: str, filename: str) -> os.stat_result | None:
    """The regular file at the original's path in the buffer now, if there is one."""
    try:
        st = os.lstat(os.path.join(buffer, relpath or "", filename))
    except (OSError, ValueError):
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def import_history(db: pw.Database, *, source: str, tables: dict[str, str], buffer: str) -> dict[str, int]:
    """Copy the original's rows into hdfmgr's (empty) tables; the caller holds the transaction."""
    files_t, batches_t, links_t = (tables[n] for n in ("files", "transfer_batches", "file_transfer_attempts"))
    links = db.execute_sql(f'SELECT "files_id", "batch_id" FROM "{links_t}" ORDER BY "batch_id"').fetchall()
    per_batch: dict[int, int] = {}
    for _, bid in links:
        per_batch[bid] = per_batch.get(bid, 0) + 1

    ended: dict[int, tuple[bool, float | None]] = {}
    batch_columns = ", ".join(
        f'"{c}"'
        for c in (
            "id",
            "pre_start_time",
            "pre_duration",
            "trans_start_time",
            "trans_duration",
            "post_start_time",
            "post_duration",
            "size_bytes",
            "rate_mbytes_per_sec",
            "status",
            "err_msg",
        )
    )
    nbatches = 0
    cursor = db.execute_sql(f'SELECT {batch_columns} FROM "{batches_t}" ORDER BY "id"')
    for rows in _chunks(cursor):
        batch_rows = [batch_row(r, source=source, files=per_batch.get(r[0], 0)) for r in rows]
        for b in batch_rows:
            ended[b["id"]] = (b["status"] == "committed", b["finished_at"])
        TransferBatch.insert_many(batch_rows).execute()
        nbatches += len(batch_rows)

    tried: dict[int, list[int]] = {}
    for fid, bid in links:
        tried.setdefault(fid, []).append(bid)
    imported: set[int] = set()
    file_states: list[str] = []
    file_columns = (
        '"id", "relpath", "filename", "checksum", "size_bytes", "created_on", "held_on", "deleted_on"'
    )
    cursor = db.execute_sql(f'SELECT {file_columns} FROM "{files_t}" ORDER BY "id"')
    for rows in _chunks(cursor):
        file_rows = []
        for r in rows:
            bids = [b for b in tried.get(r[0], ()) if b in ended]
            good = [ended[b][1] for b in bids if ended[b][0] and ended[b][1] is not None]
            present = None if r[6] is not None else _stat(buffer, r[1], r[2])
            file_rows.append(
                file_row(
                    r,
                    source=source,
                    tries=len(bids),
                    last_batch=max(bids) if bids else None,
                    delivered=max(good) if good else None,
                    present=present,
                )
            )
        FileRecord.insert_many(file_rows).execute()
        imported.update(f["id"] for f in file_rows)
        file_states.extend(f["state"] for f in file_rows)

    attempts = [
        {"batch": bid, "file": fid, "outcome": "committed" if ended[bid][0] else "failed"}
        for fid, bid in links
        if bid in ended and fid in imported
    ]
    for start in range(0, len(attempts), CHUNK):
        Attempt.insert_many(attempts[start : start + CHUNK]).execute()
    if isinstance(db, pw.PostgresqlDatabase):
        # Rows kept their ids: move each sequence past them, or the next insert collides.
        for model in (FileRecord, TransferBatch):
            table = model._meta.table_name
            db.execute_sql(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f'COALESCE((SELECT MAX("id") FROM "{table}"), 0) + 1, false)'
            )
    resumed = sum(1 for f in file_states if f == State.READY.value)
    return {"resumed": resumed, "files": len(imported), "batches": nbatches, "attempts": len(attempts)}
