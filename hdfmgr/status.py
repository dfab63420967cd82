"""Read-only queries over the audit trail for ``hdfmgr status``.

Every query is bounded by an index (see :mod:`hdfmgr.db`), so that ``status`` answers in a
fraction of a second on a database with a million files: counts by state scan the
``(source, state, detected_at)`` index only, the backlog reads the waiting rows only (its oldest
file with one seek of that index per waiting state), the last commit and the
throughput windows read the ``(source, committed_at)`` index from its end.
"""

from __future__ import annotations

import time
from typing import Any

import peewee as pw

from .db import WAITING_STATES, FileRecord, State, TransferBatch
from .endpoint import ErrorClass

WAITING = WAITING_STATES

#: Batch error classes that mean "the endpoint could not be reached" (they feed the breaker).
TRANSPORT_CLASSES = ("transport", "timeout")
#: The error class of a commit that the endpoint stopped before renaming anything.
ENDPOINT_CLASS = ErrorClass.ENDPOINT

#: Throughput windows, label -> seconds.
WINDOWS = {"1m": 60.0, "1h": 3600.0}

BREAKER_BASIS = (
    "derived from the latest batches: the daemon does not record its circuit breaker, so "
    "'open' means the last breaker_threshold finished batches all failed with a transport or "
    "timeout error"
)


def summary(
    source: str | None = None,
    *,
    failures: int = 5,
    breaker_threshold: int = 3,
    now: float | None = None,
) -> dict[str, Any]:
    """Counts by state, backlog, last success, throughput, breaker and the latest failures.

    ``source`` None means every source in the database (``--all``); the result then also has a
    ``sources`` list with the backlog, last commit and breaker of each.
    """
    now = time.time() if now is None else now
    info: dict[str, Any] = {"source": source, "generated_at": round(now, 3)}
    counts = {state.value: 0 for state in State}
    # Grouped by source too, also for every source: the (source, state, ...) index then
    # delivers the rows in group order, a walk of that index instead of a sort of the table.
    for _source, state, n in (
        _scoped(FileRecord.select(FileRecord.source, FileRecord.state, pw.fn.COUNT(FileRecord.id)), source)
        .group_by(FileRecord.source, FileRecord.state)
        .tuples()
    ):
        counts[state] += n
    info["states"] = counts
    info["backlog"] = backlog(source, now=now)
    info["last_commit"] = last_commit(source, now=now)
    info["throughput"] = throughput(source, now=now)
    if source is not None:
        info["breaker"] = breaker(source, threshold=breaker_threshold)
    else:
        info["sources"] = [
            {
                "source": name,
                "backlog": backlog(name, now=now),
                "last_commit": last_commit(name, now=now),
                "breaker": breaker(name, threshold=breaker_threshold),
            }
            for name in sources()
        ]
    info["oldest"] = oldest(source, now=now)
    info["recent_failures"] = recent_failures(source, limit=failures)
    return info


#: States whose oldest file ``status`` shows (held is history, not a state anything sits in).
AGED_STATES = (*WAITING, State.COMMITTED.value, State.QUARANTINED.value)


def oldest(source: str | None, *, now: float) -> dict[str, float]:
    """Age in seconds of the oldest file (by detection) in each state that has any: one seek
    of the (source, state, detected_at) index per state and source."""
    ages: dict[str, float] = {}
    for name in [source] if source is not None else sources():
        for state in AGED_STATES:
            row = (
                FileRecord.select(FileRecord.detected_at)
                .where((FileRecord.source == name) & (FileRecord.state == state))
                .order_by(FileRecord.detected_at)
                .limit(1)
                .tuples()
                .first()
            )
            if row is not None:
                ages[state] = max(ages.get(state, 0.0), round(now - row[0], 1))
    return ages


def _scoped(query: pw.ModelSelect, source: str | None, model: type[pw.Model] = FileRecord) -> pw.ModelSelect:
    return query.where(model.source == source) if source is not None else query


def sources() -> list[str]:
    """Every source that recorded a file or a batch."""
    names = {s for (s,) in FileRecord.select(FileRecord.source).distinct().tuples()}
    names.update(s for (s,) in TransferBatch.select(TransferBatch.source).distinct().tuples())
    return sorted(names)


def backlog(source: str | None, *, now: float) -> dict[str, Any]:
    """Files still to deliver: count, bytes and the oldest one (by detection time)."""
    # One equality per state and source: with ANALYZE's statistics SQLite judges any IN list
    # over the few states unselective and scans the whole table; each equality seeks the
    # (source, state, detected_at) index, so the backlog costs what it holds, not the table.
    files, nbytes = 0, 0
    oldest: tuple[str, float] | None = None
    for name in [source] if source is not None else sources():
        for state in WAITING:
            where = (FileRecord.source == name) & (FileRecord.state == state)
            n, size = (
                FileRecord.select(pw.fn.COUNT(FileRecord.id), pw.fn.SUM(FileRecord.size))
                .where(where)
                .tuples()
                .get()
            )
            if not n:
                continue
            files, nbytes = files + n, nbytes + int(size or 0)
            row = (
                FileRecord.select(FileRecord.name, FileRecord.detected_at)
                .where(where)
                .order_by(FileRecord.detected_at)
                .limit(1)
                .tuples()
                .first()
            )
            if row is not None and (oldest is None or row[1] < oldest[1]):
                oldest = row
    return {
        "files": files,
        "bytes": nbytes,
        "oldest": oldest[0] if oldest else None,
        "oldest_age_seconds": round(now - oldest[1], 1) if oldest else None,
    }


def last_commit(source: str | None, *, now: float) -> dict[str, Any] | None:
    last = (
        _scoped(FileRecord.select(FileRecord.name, FileRecord.committed_at), source)
        .where(FileRecord.committed_at.is_null(False))
        .order_by(FileRecord.committed_at.desc())
        .limit(1)
        .tuples()
        .first()
    )
    if last is None:
        return None
    return {"file": last[0], "at": last[1], "age_seconds": round(now - last[1], 1)}


def throughput(source: str | None, *, now: float) -> dict[str, dict[str, float]]:
    """Files and bytes committed in each window of :data:`WINDOWS`, and their rates."""
    out = {}
    for label, seconds in WINDOWS.items():
        files, nbytes = (
            _scoped(FileRecord.select(pw.fn.COUNT(FileRecord.id), pw.fn.SUM(FileRecord.size)), source)
            .where(FileRecord.committed_at >= now - seconds)
            .tuples()
            .get()
        )
        files, nbytes = files or 0, int(nbytes or 0)
        out[label] = {
            "seconds": seconds,
            "files": files,
            "bytes": nbytes,
            "files_per_s": round(files / seconds, 3),
            "mb_per_s": round(nbytes / seconds / 1e6, 3),
        }
    return out


def breaker(source: str, *, threshold: int = 3) -> dict[str, Any]:
    """The circuit breaker as the batches table shows it (see :data:`BREAKER_BASIS`).

    ``closed``: the latest finished batch reached the endpoint (or there is none);
    ``failing``: the latest batches failed with transport/timeout errors, fewer than
    ``threshold`` in a row; ``open``: at least ``threshold`` in a row, so the daemon has stopped
    dispatching and probes the endpoint.
    """
    latest = (
        TransferBatch.select(
            TransferBatch.started_at, TransferBatch.error_class, TransferBatch.status, TransferBatch.stderr
        )
        .where((TransferBatch.source == source) & (TransferBatch.status != "running"))
        .order_by(TransferBatch.started_at.desc())
        .limit(max(threshold, 1))
        .tuples()
    )
    latest = list(latest)
    run = []
    for started, error_class, status, stderr in latest:
        if status == "committed" or error_class not in TRANSPORT_CLASSES:
            break
        run.append((started, error_class, stderr))
    # The endpoint answers but its commits stop before renaming anything (flock failing on
    # staging, a tool missing or failing, staging full): reachable, yet nothing gets through.
    unfit = []
    for started, error_class, _status, stderr in latest:
        if error_class != ENDPOINT_CLASS:
            break
        unfit.append((started, stderr))
    if not run:
        state = "closed"
    elif len(run) >= threshold:
        state = "open"
    else:
        state = "failing"
    return {
        "state": state,
        "transport_failures_in_a_row": len(run),
        "threshold": threshold,
        "since": run[-1][0] if run else None,
        "error": _last_line(run[0][2]) if run else None,
        "basis": BREAKER_BASIS,
        "commit_failures_in_a_row": len(unfit),
        "commit_failures_since": unfit[-1][0] if unfit else None,
        "commit_error": _last_line(unfit[0][1]) if unfit else None,
    }


def recent_failures(source: str | None, *, limit: int = 5) -> list[dict[str, Any]]:
    recent = (
        _scoped(TransferBatch.select(), source, TransferBatch)
        .where(TransferBatch.status.in_(["failed", "partial"]))
        .order_by(TransferBatch.started_at.desc())
        .limit(limit)
    )
    return [
        {
            "batch": b.id,
            "source": b.source,
            "at": b.started_at,
            "files": b.files,
            "committed": b.committed,
            "status": b.status,
            "error_class": b.error_class,
            "returncode": b.returncode,
            "stderr": _last_line(b.stderr),
        }
        for b in recent
    ]


def _last_line(text: str | None) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def render(info: dict[str, Any]) -> str:
    """The one-screen text form of :func:`summary`."""
    lines = []
    if info.get("source"):
        lines.append(f"source:   {info['source']}")
    states = info["states"]
    lines.append("files:    " + "  ".join(f"{k} {v}" for k, v in states.items()))
    lines.append("backlog:  " + _backlog(info["backlog"]))
    lines.append("last ok:  " + _last(info["last_commit"]))
    rates = []
    for label, t in info["throughput"].items():
        window = {"1m": "last minute", "1h": "last hour"}.get(label, label)
        per_s = f"{t['files_per_s']:.2f} files/s, {t['mb_per_s']:.2f} MB/s"
        rates.append(f"{window} {t['files']} files ({per_s})")
    lines.append("rate:     " + "; ".join(rates))
    if info.get("oldest"):
        ages = [f"{state} {states[state]} (oldest {_age(age)})" for state, age in info["oldest"].items()]
        lines.append("oldest:   " + "  ".join(ages))
    if "daemon" in info:
        lines.extend(_daemon(info["daemon"], info["generated_at"]))
    if "breaker" in info:
        lines.append("endpoint: " + _breaker(info["breaker"]))
    for src in info.get("sources", []):
        lines.append(
            f"  {src['source']}: backlog {_backlog(src['backlog'])}; last ok {_last(src['last_commit'])}; "
            f"endpoint {_breaker(src['breaker'])}"
        )
    if info["recent_failures"]:
        lines.append("recent failures:")
        for f in info["recent_failures"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(f["at"]))
            who = f" {f['source']}" if info.get("source") is None else ""
            code = f", exit {f['returncode']}" if f["returncode"] is not None else ""  # imported
            lines.append(
                f"  {when}{who} batch {f['batch']} ({f['files']} files) {f['status']} "
                f"[{f['error_class']}{code}]: {f['stderr']}"
            )
    return "\n".join(lines)


def _daemon(daemon: dict[str, Any] | None, now: float) -> list[str]:
    """The running daemon as it publishes itself (hdfmgr/lock.py), and its slots."""
    if daemon is None:
        return ["daemon:   not running (no hdfmgr holds this buffer's lock)"]
    line = f"daemon:   running, pid {daemon['pid']}"
    if "started_at" in daemon:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(daemon["started_at"]))
        line += f" since {since} ({_age(now - daemon['started_at'])}), version {daemon.get('version', '?')}"
    if daemon.get("breaker") not in (None, "closed"):
        line += f"; circuit breaker {daemon['breaker']}"
    if "updated_at" in daemon:
        line += f"; state published {_age(max(0.0, now - daemon['updated_at']))} ago"
    lines = [line]
    slots = daemon.get("slots", [])
    if slots:
        count: dict[str, int] = {}
        for slot in slots:
            count[slot["state"]] = count.get(slot["state"], 0) + 1
        lines.append("slots:    " + ", ".join(f"{n} {state}" for state, n in sorted(count.items())))
    for slot in slots:
        if slot["state"] == "free":
            continue
        text = f"  slot {slot['slot']}: {slot['state']}"
        if slot.get("batch") is not None:
            mb = slot.get("bytes", 0) / 1e6
            text += f" batch {slot['batch']} ({slot['files']} file(s), {mb:.1f} MB)"
        if slot.get("since") is not None:
            text += f" for {_age(max(0.0, now - slot['since']))}"
        if slot.get("due") is not None and now > slot["due"]:
            text += f", STUCK: past its deadline by {_age(now - slot['due'])}"
        if slot.get("reason"):
            text += f": {slot['reason']}"
        lines.append(text)
    return lines


def _backlog(b: dict[str, Any]) -> str:
    if not b["files"]:
        return "none"
    return (
        f"{b['files']} files, {b['bytes'] / 1e6:.1f} MB, oldest {b['oldest']} "
        f"({_age(b['oldest_age_seconds'])} ago)"
    )


def _last(last: dict[str, Any] | None) -> str:
    return f"{last['file']} ({_age(last['age_seconds'])} ago)" if last else "never"


def _breaker(b: dict[str, Any]) -> str:
    if b["state"] == "closed" and b.get("commit_failures_in_a_row"):
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["commit_failures_since"]))
        return (
            f"reachable, but its commits FAIL: the last {b['commit_failures_in_a_row']} stopped "
            f"before renaming anything, since {since} (derived from the batches table)\n"
            f"          {b['commit_error']}"
        )
    if b["state"] == "closed":
        return "ok (closed)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["since"]))
    word = "FAILING, breaker open" if b["state"] == "open" else "failing"
    return (
        f"{word}: {b['transport_failures_in_a_row']} transport/timeout failure(s) in a row since {since}"
        f" (derived from the batches table)\n          {b['error']}"
    )


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
