"""The audit trail for people: ``hdfmgr files``, ``hdfmgr show`` and ``hdfmgr retry``.

"When did this file arrive, after how many attempts, at what rate?" ``files`` lists file
versions with filters, ``show`` tells one file's whole story (each version, each attempt with
its batch's timings and rate), ``retry`` re-queues quarantined and failed files.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import peewee as pw

from . import db as dbm
from .db import Attempt, FileRecord, State, TransferBatch

log = logging.getLogger("hdfmgr")

#: States ``hdfmgr retry`` re-queues.
RETRYABLE = (State.QUARANTINED.value, State.FAILED.value)

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def parse_since(text: str, *, now: float | None = None) -> float:
    """``--since``: an age (``90s``, ``30m``, ``24h``, ``2d``, ``1w``; a bare number is seconds)
    or a local date/time (``2026-11-27``, ``2026-11-27T18:30``, with an optional UTC offset).
    Returns a Unix time."""
    now = time.time() if now is None else now
    text = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text, re.IGNORECASE)
    if match:
        return now - float(match.group(1)) * _UNITS[(match.group(2) or "s").lower()]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"--since: {text!r} is neither an age (90s, 30m, 24h, 2d, 1w) nor a date (2026-11-27T18:30)"
        ) from None
    return when.timestamp()  # naive: local time


def glob_to_regex(pattern: str) -> str:
    """A shell glob (``*``, ``?``, ``[a-z]``, ``[!x]``) as an anchored POSIX regular expression.

    As with :func:`fnmatch.fnmatchcase`, ``*`` also matches ``/``.
    """
    out = ["^"]
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:
                out.append("\\[")
                continue
            body = pattern[i:j]
            i = j + 1
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            # As in fnmatch, '^' is a literal; escape it and '[' and '\' for the regex engine.
            body = re.sub(r"([\\\[^])", r"\\\1", body)
            out.append(f"[{'^' if negate else ''}{body}]")
        elif c.isalnum() or c == "_" or ord(c) > 127:
            out.append(c)
        else:
            out.append("\\" + c)
    out.append("$")
    return "".join(out)


def _fnmatch(pattern: str, name: str) -> int:
    return int(fnmatch.fnmatchcase(name, pattern))


def _is_postgres() -> bool:
    return isinstance(dbm.proxy.obj, pw.PostgresqlDatabase)


def _name_matches(pattern: str) -> pw.Expression:
    """SQL for "name matches the glob": a regular expression on PostgreSQL, fnmatch on SQLite."""
    if _is_postgres():
        return pw.Expression(FileRecord.name, "~", glob_to_regex(pattern))
    database = dbm.proxy.obj
    if "hdfmgr_fnmatch" not in database._functions:
        database.register_function(_fnmatch, "hdfmgr_fnmatch", 2)
    return pw.fn.hdfmgr_fnmatch(pattern, FileRecord.name) == 1


# ---------------------------------------------------------------------------------- files


def files(
    source: str | None,
    *,
    state: str | None = None,
    since: float | None = None,
    name: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """File versions, newest detection first, filtered by state, detection time and name."""
    query = FileRecord.select()
    if source is not None:
        query = query.where(FileRecord.source == source)
    if state is not None:
        query = query.where(FileRecord.state == state)
    if since is not None:
        query = query.where(FileRecord.detected_at >= since)
    if name:
        query = query.where(_name_matches(name))
    query = query.order_by(FileRecord.detected_at.desc(), FileRecord.id.desc()).limit(limit)
    return [_file_dict(row) for row in query]


def _file_dict(row: FileRecord) -> dict[str, Any]:
    latency = row.committed_at - row.detected_at if row.committed_at is not None else None
    return {
        "id": row.id,
        "source": row.source,
        "name": row.name,
        "state": row.state,
        "size": row.size,
        "mtime": row.mtime_ns / 1e9,
        "checksum": row.checksum,
        "attempts": row.attempts,
        "detected_at": row.detected_at,
        "ready_at": row.ready_at,
        "committed_at": row.committed_at,
        "held_at": row.held_at,
        "latency_seconds": round(latency, 3) if latency is not None else None,
        "held_as": row.held_as,
        "error_class": row.error_class,
        "last_error": row.last_error,
        "next_try": row.next_try or None,
    }


def render_files(rows: list[dict[str, Any]], *, with_source: bool = False) -> str:
    """A table, one file version per line (newest first)."""
    header = ["detected", "state", "size", "tries", "latency", "error", "name"]
    if with_source:
        header.insert(0, "source")
    table = [header]
    for r in rows:
        line = [
            _when(r["detected_at"]),
            r["state"],
            _size(r["size"]),
            str(r["attempts"]),
            f"{r['latency_seconds']:.2f} s" if r["latency_seconds"] is not None else "-",
            r["error_class"] or "-",
            _printable(r["name"]),
        ]
        if with_source:
            line.insert(0, r["source"])
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in table
    ]
    if len(rows) == 0:
        lines.append("(no file matches)")
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------------------- show


def resolve(path: str, *, buffer: Path, holding: Path) -> tuple[str, bool]:
    """The relative path a PATH argument means, and whether it names a file in holding.

    Accepted: a path relative to the buffer, or an absolute path in the buffer or in holding.
    """
    if not os.path.isabs(path):
        return os.path.normpath(path), False
    absolute = os.path.normpath(path)
    for top, in_holding in ((os.fspath(buffer), False), (os.fspath(holding), True)):
        if absolute.startswith(top.rstrip("/") + "/"):
            return absolute[len(top.rstrip("/")) + 1 :], in_holding
    raise ValueError(f"{path}: not inside the buffer ({buffer}) or holding ({holding})")


def show(source: str | None, rel: str, *, in_holding: bool = False) -> list[dict[str, Any]]:
    """Every version recorded for ``rel`` (oldest first), each with its attempts and batches.

    A path in holding is also found by the name it was held as (``x.fits.1``).
    """
    match = FileRecord.relpath == dbm.to_blob(rel)
    if in_holding:
        match = match | (FileRecord.held_as == dbm.display(rel))
    query = FileRecord.select().where(match)
    if source is not None:
        query = query.where(FileRecord.source == source)
    versions = []
    for row in query.order_by(FileRecord.detected_at, FileRecord.id):
        info = _file_dict(row)
        tries = (
            Attempt.select(Attempt, TransferBatch)
            .join(TransferBatch)
            .where(Attempt.file == row.id)
            .order_by(TransferBatch.started_at, TransferBatch.id)
        )
        info["tries"] = [_attempt_dict(a, a.batch) for a in tries]
        versions.append(info)
    return versions


def _attempt_dict(attempt: Attempt, b: TransferBatch) -> dict[str, Any]:
    return {
        "batch": b.id,
        "outcome": attempt.outcome,
        "error": attempt.error,
        "started_at": b.started_at,
        "finished_at": b.finished_at,
        "seconds": round(b.finished_at - b.started_at, 3) if b.finished_at else None,
        "batch_files": b.files,
        "batch_bytes": b.bytes,
        "batch_status": b.status,
        "hash_seconds": b.hash_seconds,
        "prepare_seconds": b.prepare_seconds,
        "transfer_seconds": b.transfer_seconds,
        "commit_seconds": b.commit_seconds,
        "rate_bytes_per_s": b.rate,
        "error_class": b.error_class,
        "returncode": b.returncode,
        "stderr": b.stderr,
        "staging_dir": b.staging_dir,
    }


def render_show(rel: str, versions: list[dict[str, Any]]) -> str:
    if not versions:
        return f"{_printable(rel)}: no record"
    lines = []
    for n, v in enumerate(versions, 1):
        checksum = f", blake2b {v['checksum'][:16]}..." if v["checksum"] else ""
        lines.append(
            f"{_printable(v['name'])}  version {n} of {len(versions)} (row {v['id']}, source {v['source']}): "
            f"{v['state']}, {_size(v['size'])}{checksum}"
        )
        t0 = v["detected_at"]
        lines.append(f"  detected   {_when(t0, precise=True)}")
        for label, key in (("ready", "ready_at"), ("committed", "committed_at"), ("held", "held_at")):
            if v[key] is not None:
                extra = f" as {_printable(v['held_as'])}" if key == "held_at" and v["held_as"] else ""
                lines.append(f"  {label:<10} {_when(v[key], precise=True)}  (+{v[key] - t0:.3f} s){extra}")
        lines.append(f"  attempts   {v['attempts']}")
        if v["state"] != State.HELD.value and v["last_error"]:
            lines.append(f"  last error [{v['error_class']}] {_printable(v['last_error'].splitlines()[-1])}")
        for i, t in enumerate(v["tries"], 1):
            phases = ", ".join(
                f"{label} {t[key]:.3f} s"
                for label, key in (
                    ("hash", "hash_seconds"),
                    ("mkdir", "prepare_seconds"),
                    ("transfer", "transfer_seconds"),
                    ("commit", "commit_seconds"),
                )
                if t[key]
            )
            delivered = t["batch_status"] in ("committed", "partial")  # a failed copy has no rate
            rate = f", {t['rate_bytes_per_s'] / 1e6:.1f} MB/s" if t["rate_bytes_per_s"] and delivered else ""
            took = f" in {t['seconds']:.3f} s" if t["seconds"] is not None else ""
            lines.append(
                f"  try {i}: batch {t['batch']} at {_when(t['started_at'], precise=True)}: "
                f"{t['outcome']}{took}"
                f" ({t['batch_files']} files, {_size(t['batch_bytes'])}{rate}; {phases or 'no phase ran'})"
            )
            if t["outcome"] != "committed" and (t["error"] or t["stderr"]):
                detail = (t["error"] or "").strip() or (t["stderr"] or "").strip().splitlines()[-1]
                code = f", exit {t['returncode']}" if t["returncode"] is not None else ""
                lines.append(f"         [{t['error_class']}{code}] {_printable(detail)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- retry


def retry(
    source: str, rels: list[str] | None, *, buffer: Path, now: float | None = None
) -> dict[str, list[str]]:
    """Re-queue quarantined and failed files (state ready, next try now).

    Only versions still in the buffer are re-queued (a missing file would be quarantined again
    at the next rescan), and only the newest version of a path: an older one whose path was
    registered again since is ``superseded``. ``rels`` None means every retryable file.
    Returns the names per outcome: requeued, missing, superseded, and (for named paths)
    unknown (no record) or not_retryable (in another state).
    """
    now = time.time() if now is None else now
    result: dict[str, list[str]] = {
        "requeued": [],
        "missing": [],
        "superseded": [],
        "unknown": [],
        "not_retryable": [],
    }
    query = FileRecord.select(FileRecord.id, FileRecord.relpath, FileRecord.name, FileRecord.state).where(
        FileRecord.source == source
    )
    if rels is not None:
        blobs = [dbm.to_blob(rel) for rel in rels]
        rows = list(query.where(FileRecord.relpath.in_(blobs)).order_by(FileRecord.id).tuples())
        seen = {dbm.from_blob(r[1]) for r in rows}
        result["unknown"] = [dbm.display(rel) for rel in rels if rel not in seen]
    else:
        # One index seek per state (an IN list over states can make SQLite scan the table).
        rows = sorted(row for state in RETRYABLE for row in query.where(FileRecord.state == state).tuples())
    newest: dict[bytes, int] = {}
    if rows:
        for relpath, top in (
            FileRecord.select(FileRecord.relpath, pw.fn.MAX(FileRecord.id))
            .where((FileRecord.source == source) & FileRecord.relpath.in_(list({bytes(r[1]) for r in rows})))
            .group_by(FileRecord.relpath)
            .tuples()
        ):
            newest[bytes(relpath)] = top
    ids = []
    for row_id, relpath, name, state in rows:
        rel = dbm.from_blob(relpath)
        if newest.get(bytes(relpath)) != row_id:
            if rels is None or state in RETRYABLE:
                result["superseded"].append(name)
            continue
        if state not in RETRYABLE:
            result["not_retryable"].append(name)
            continue
        if not os.path.lexists(os.path.join(os.fsencode(buffer), os.fsencode(rel))):
            result["missing"].append(name)
            continue
        ids.append(row_id)
        result["requeued"].append(name)
    database = FileRecord._meta.database
    with database.atomic():
        for i in range(0, len(ids), 500):
            FileRecord.update(state=State.READY.value, next_try=0.0, updated_at=now).where(
                FileRecord.id.in_(ids[i : i + 500]) & FileRecord.state.in_(RETRYABLE)
            ).execute()
    return result


def watcher_pid(buffer: Path) -> int | None:
    """The pid of the hdfmgr process holding this buffer's lock, or None when none runs."""
    from .lock import holder

    return holder(buffer)


# ---------------------------------------------------------------------------------- helpers


def _when(t: float | None, *, precise: bool = False) -> str:
    if t is None:
        return "-"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{stamp}.{int(t * 1000) % 1000:03d}" if precise else stamp


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _printable(text: str | None) -> str:
    """Names may hold newlines and control characters: never let them break a table line."""
    if text is None:
        return "-"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
