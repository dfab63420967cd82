"""Read-only queries over the audit trail for ``hdfmgr status``."""

from __future__ import annotations

import time
from typing import Any

import peewee as pw

from .db import FileRecord, State, TransferBatch

WAITING = (State.READY.value, State.FAILED.value, State.STAGING.value, State.COMMITTING.value)


def summary(source: str | None = None, *, failures: int = 5) -> dict[str, Any]:
    """Counts by state, the backlog, the last success and the latest failures."""

    def scoped(query: pw.ModelSelect, model: type[pw.Model] = FileRecord) -> pw.ModelSelect:
        return query.where(model.source == source) if source else query

    counts = {state.value: 0 for state in State}
    for state, n in (
        scoped(FileRecord.select(FileRecord.state, pw.fn.COUNT(FileRecord.id)))
        .group_by(FileRecord.state)
        .tuples()
    ):
        counts[state] = n
    backlog = (
        scoped(
            FileRecord.select(
                pw.fn.COUNT(FileRecord.id), pw.fn.SUM(FileRecord.size), pw.fn.MIN(FileRecord.detected_at)
            )
        )
        .where(FileRecord.state.in_(WAITING))
        .tuples()
        .get()
    )
    oldest = (
        scoped(FileRecord.select(FileRecord.name, FileRecord.detected_at))
        .where(FileRecord.state.in_(WAITING))
        .order_by(FileRecord.detected_at)
        .limit(1)
        .tuples()
        .first()
    )
    last = (
        scoped(FileRecord.select(FileRecord.name, FileRecord.committed_at))
        .where(FileRecord.committed_at.is_null(False))
        .order_by(FileRecord.committed_at.desc())
        .limit(1)
        .tuples()
        .first()
    )
    recent = (
        scoped(TransferBatch.select(), TransferBatch)
        .where(TransferBatch.status.in_(["failed", "partial"]))
        .order_by(TransferBatch.started_at.desc())
        .limit(failures)
    )
    now = time.time()
    return {
        "source": source,
        "states": counts,
        "backlog": {
            "files": backlog[0] or 0,
            "bytes": int(backlog[1] or 0),
            "oldest": oldest[0] if oldest else None,
            "oldest_age_seconds": round(now - oldest[1], 1) if oldest else None,
        },
        "last_commit": {"file": last[0], "at": last[1], "age_seconds": round(now - last[1], 1)}
        if last
        else None,
        "recent_failures": [
            {
                "batch": b.id,
                "at": b.started_at,
                "files": b.files,
                "status": b.status,
                "error_class": b.error_class,
                "returncode": b.returncode,
                "stderr": (b.stderr or "").strip().splitlines()[-1:] or [""],
            }
            for b in recent
        ],
    }


def render(info: dict[str, Any]) -> str:
    """The one-screen text form of :func:`summary`."""
    lines = []
    states = info["states"]
    lines.append("files:    " + "  ".join(f"{k} {v}" for k, v in states.items()))
    b = info["backlog"]
    if b["files"]:
        lines.append(
            f"backlog:  {b['files']} files, {b['bytes'] / 1e6:.1f} MB, oldest {b['oldest']} "
            f"({_age(b['oldest_age_seconds'])} ago)"
        )
    else:
        lines.append("backlog:  none")
    last = info["last_commit"]
    lines.append(f"last ok:  {last['file']} ({_age(last['age_seconds'])} ago)" if last else "last ok:  never")
    if info["recent_failures"]:
        lines.append("recent failures:")
        for f in info["recent_failures"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["at"]))
            lines.append(
                f"  {when} batch {f['batch']} ({f['files']} files) {f['status']} "
                f"[{f['error_class']}, exit {f['returncode']}]: {f['stderr'][0]}"
            )
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"
