"""Every database write the daemon makes, batched per transfer batch, not per file.

Only the dispatcher's thread calls these. Each method is one transaction, so a state is either
on disk completely or not at all when the process dies.

State owned: the database transactions of the daemon; which state a file goes to is decided by
:mod:`hdfmgr.files`, the only caller of the per-file writes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import peewee as pw

from .db import Attempt, FileRecord, State, TransferBatch, display, from_blob, to_blob
from .deliver import BatchReport, describe_commands
from .settle import Snapshot

#: Rows per statement: well under SQLite's 32766 bound parameters and PostgreSQL's limits.
CHUNK = 500

#: The states a restart resumes: everything but done (held) and waiting for an operator.
RESUMED_STATES = tuple(s.value for s in State if s not in (State.HELD, State.QUARANTINED))


class ActiveRow(NamedTuple):
    """One resumed file's row (a tuple: a restart makes one per unfinished file)."""

    id: int
    rel: str
    size: int
    mtime_ns: int
    inode: int
    state: str
    attempts: int
    hashed: bool
    next_try: float
    last_batch: int | None


@dataclass(frozen=True, slots=True)
class Failure:
    id: int
    outcome: str
    error: str
    error_class: str
    next_try: float
    quarantine: bool = False


class Recorder:
    """The audit trail's writer for one source (handoff host and buffer)."""

    def __init__(self, db: pw.Database, source: str) -> None:
        self.db = db
        self.source = source
        #: Transactions committed: after a database failure, the first one says it is back.
        self.writes = 0

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self.db.atomic():
            yield
        self.writes += 1

    def active(self) -> Iterator[ActiveRow]:
        """Rows of files not yet done: what a restart must resume.

        One index seek per state: a ``NOT IN (held, quarantined)`` walked every row of the
        source, so that a start-up after months of operation read the whole history (0.18 s
        for 2,000 active rows among 1,000,000).
        """
        yield from self._rows(RESUMED_STATES)

    def quarantined(self) -> Iterator[ActiveRow]:
        """Quarantined rows: tombstones, so that a restart does not register them again."""
        yield from self._rows((State.QUARANTINED.value,))

    def _rows(self, states: Sequence[str]) -> Iterator[ActiveRow]:
        columns = (
            FileRecord.id,
            FileRecord.relpath,
            FileRecord.size,
            FileRecord.mtime_ns,
            FileRecord.inode,
            FileRecord.state,
            FileRecord.attempts,
            FileRecord.checksum.is_null(False),
            FileRecord.next_try,
            FileRecord.last_batch,
        )
        for state in states:
            query = (
                FileRecord.select(*columns)
                .where((FileRecord.source == self.source) & (FileRecord.state == state))
                .order_by(FileRecord.detected_at)
                .tuples()
            )
            # The driver's cursor, read row by row: no cache of every row (at 100,000 rows
            # peewee's cache was 50 MB of peak RSS), and no per-column conversion, which the
            # driver's own types make unnecessary here (0.47 s of a 0.69 s read of 100,000 rows).
            for row in self.db.execute(query):
                yield ActiveRow(row[0], from_blob(row[1]), *row[2:7], bool(row[7]), *row[8:])

    def requeued(self) -> Iterator[ActiveRow]:
        """Rows in state READY: after ``hdfmgr retry``, the ones the daemon does not know yet."""
        for row in self.active():
            if row.state == State.READY.value:
                yield row

    def close_interrupted_batches(self, wall: float, keep: Iterable[int] = ()) -> int:
        """Batches a killed run left 'running', and their attempts: interrupted.

        Not those in ``keep``: their commit may have run, and a listing of their staging
        directory will tell (:meth:`close_listed_batches`).
        """
        keep = list(keep)
        running = (TransferBatch.source == self.source) & (TransferBatch.status == "running")
        if keep:
            running &= TransferBatch.id.not_in(keep)
        with self._transaction():
            ids = [row_id for (row_id,) in TransferBatch.select(TransferBatch.id).where(running).tuples()]
            for chunk in _chunks(ids, CHUNK):
                Attempt.update(outcome="interrupted", error="the daemon stopped during this batch").where(
                    Attempt.batch.in_(chunk) & (Attempt.outcome == "running")
                ).execute()
                TransferBatch.update(status="interrupted", finished_at=wall).where(
                    TransferBatch.id.in_(chunk)
                ).execute()
        return len(ids)

    def close_listed_batches(self, outcomes: dict[int, tuple[list[int], list[int]]], wall: float) -> None:
        """What a listing of staging proved about batches whose commit reply was lost (or
        that a restart found committing): per batch, the files moved into the endpoint buffer
        and the files still to send. A batch a restart left running is closed here."""
        if not outcomes:
            return
        with self._transaction():
            for batch_id, (moved, resend) in outcomes.items():
                open_outcomes = Attempt.outcome.in_(["running", "unknown"])
                for ids, outcome in ((moved, "committed"), (resend, "interrupted")):
                    if ids:
                        Attempt.update(outcome=outcome).where(
                            (Attempt.batch == batch_id) & Attempt.file.in_(ids) & open_outcomes
                        ).execute()
                batch = TransferBatch.get_or_none(TransferBatch.id == batch_id)
                if batch is None:
                    continue
                committed = batch.committed + len(moved)
                if batch.status == "running":
                    status = "committed" if not resend else ("partial" if committed else "interrupted")
                    batch.finished_at = wall
                    # Its files that never reached the commit were sent again from the start.
                    Attempt.update(outcome="interrupted", error="the daemon stopped during this batch").where(
                        (Attempt.batch == batch_id) & (Attempt.outcome == "running")
                    ).execute()
                else:
                    status = "partial" if committed and batch.status == "failed" else batch.status
                batch.status, batch.committed = status, committed
                batch.save()

    def checksums(self, ids: Sequence[int]) -> dict[int, str]:
        """Stored BLAKE2b of the given rows (a file version is hashed once, then read back)."""
        if not ids:
            return {}
        query = FileRecord.select(FileRecord.id, FileRecord.checksum).where(FileRecord.id.in_(list(ids)))
        return {row_id: digest for row_id, digest in query.tuples() if digest}

    def staging_dirs(self, batch_ids: Iterable[int]) -> dict[int, str]:
        query = TransferBatch.select(TransferBatch.id, TransferBatch.staging_dir).where(
            TransferBatch.id.in_(list(batch_ids))
        )
        return dict(query.tuples())

    def insert(self, items: Sequence[tuple[str, Snapshot]], wall: float) -> list[int]:
        """New file versions, state READY; returns their ids in order.

        One ``executemany`` instead of peewee's query builder: building the SQL for thousands
        of rows cost more than writing them. The ids are read back in one query; this source
        has one writer (the buffer lock), and ids only grow, so rows of this source above the
        highest id seen before the insert are exactly the new ones.
        """
        if not items:
            return []
        files = FileRecord._meta.table_name
        p = self.db.param
        columns = (
            "source",
            "relpath",
            "name",
            "size",
            "mtime_ns",
            "inode",
            "state",
            "attempts",
            "next_try",
            "detected_at",
            "ready_at",
            "updated_at",
        )
        names = ", ".join(f'"{column}"' for column in columns)
        sql = f'INSERT INTO "{files}" ({names}) VALUES ({", ".join([p] * len(columns))})'
        ready = State.READY.value
        rows = [
            (
                self.source,
                to_blob(rel),
                display(rel),
                snap.size,
                snap.mtime_ns,
                snap.inode,
                ready,
                0,
                0.0,
                wall,
                wall,
                wall,
            )
            for rel, snap in items
        ]
        with self._transaction():
            before = self.db.execute_sql(f'SELECT MAX("id") FROM "{files}"').fetchone()[0] or 0
            self.db.cursor().executemany(sql, rows)
            cursor = self.db.execute_sql(
                f'SELECT "id", "relpath" FROM "{files}" WHERE "source" = {p} AND "id" > {p}',
                (self.source, before),
            )
            by_path = {bytes(relpath): row_id for row_id, relpath in cursor.fetchall()}
        return [by_path[row[1]] for row in rows]

    def new_version(self, updates: Sequence[tuple[int, Snapshot]], wall: float) -> None:
        """A file that changed before delivery: same row, new size/mtime, no checksum yet."""
        with self._transaction():
            for row_id, snap in updates:
                FileRecord.update(
                    size=snap.size,
                    mtime_ns=snap.mtime_ns,
                    inode=snap.inode,
                    checksum=None,
                    state=State.READY.value,
                    ready_at=wall,
                    updated_at=wall,
                    next_try=0.0,
                ).where(FileRecord.id == row_id).execute()

    def start_batch(self, staging_dir: str, ids: Sequence[int], nbytes: int, wall: float) -> int:
        """The batch row, its links, and the files' STAGING state, before any command runs."""
        with self._transaction():
            batch = TransferBatch.create(
                source=self.source, staging_dir=staging_dir, started_at=wall, files=len(ids), bytes=nbytes
            )
            self._update_ids(
                ids,
                {"state": State.STAGING.value, "last_batch": batch.id, "updated_at": wall},
                increment="attempts",
            )
            p = self.db.param
            self.db.cursor().executemany(
                f'INSERT INTO "{Attempt._meta.table_name}" ("batch_id", "file_id", "outcome") '
                f"VALUES ({p}, {p}, {p})",
                [(batch.id, row_id, "running") for row_id in ids],
            )
        return batch.id

    def committing(
        self, batch_id: int, ids: Sequence[int], checksums: Sequence[tuple[int, str]], wall: float
    ) -> None:
        """COMMITTING (and the new checksums) on disk before the remote mv may run."""
        with self._transaction():
            self._set_checksums(checksums)
            self._update_ids(ids, {"state": State.COMMITTING.value, "updated_at": wall})
            TransferBatch.update(commit_started=wall).where(TransferBatch.id == batch_id).execute()

    def finish_batch(
        self,
        report: BatchReport,
        *,
        committed: Sequence[int],
        failures: Sequence[Failure],
        checksums: Sequence[tuple[int, str]],
        wall: float,
        held: Sequence[int] = (),
        renamed: Sequence[tuple[int, str]] = (),
        unknown: Sequence[int] = (),
    ) -> None:
        """The batch's timings and commands, and every file's outcome, in one transaction.

        ``committed`` are delivered files still in the buffer; ``held`` and ``renamed`` are
        delivered files the worker already moved to holding (under their own name or a
        suffixed one): they go straight to HELD, one write instead of two. ``unknown`` are
        files whose commit reply was lost: they stay COMMITTING, their attempt says so.
        """
        transfer_seconds = sum(r.duration for r in report.transfers) if report.transfers else None
        nbytes = sum(f.size for f in report.job.files)
        commands = report.commands()
        last = commands[-1] if commands else None
        delivered_count = len(committed) + len(held) + len(renamed)
        status = "committed" if not failures and not unknown else ("partial" if delivered_count else "failed")
        with self._transaction():
            TransferBatch.update(
                finished_at=wall,
                hash_seconds=report.hash_seconds,
                prepare_seconds=report.prepare.duration if report.prepare else None,
                transfer_started=report.transfers[0].started if report.transfers else None,
                transfer_seconds=transfer_seconds,
                commit_seconds=report.commit.duration if report.commit else None,
                rate=(nbytes / transfer_seconds) if transfer_seconds else None,
                status=status,
                error_class=report.error_class,
                returncode=last.returncode if last is not None else None,
                stderr="\n".join(r.stderr_tail() for r in commands if r.stderr) or report.error,
                command=describe_commands(commands),
                committed=delivered_count,
            ).where(TransferBatch.id == report.job.id).execute()
            self._set_checksums(checksums)
            delivered = {"committed_at": wall, "updated_at": wall, "error_class": None, "last_error": None}
            self._update_ids(committed, {"state": State.COMMITTED.value, **delivered})
            self._write_held(held, renamed, wall, delivered)
            self._update_ids(
                [*committed, *held, *(row_id for row_id, _ in renamed)],
                {"outcome": "committed"},
                table=Attempt,
                key="file_id",
                batch=report.job.id,
            )
            if unknown:
                error = f"commit reply lost ({report.error}); staging is listed to find out"[-2000:]
                self._update_ids(unknown, {"last_error": error, "updated_at": wall})
                self._update_ids(
                    unknown,
                    {"outcome": "unknown", "error": error},
                    table=Attempt,
                    key="file_id",
                    batch=report.job.id,
                )
            for f in failures:
                FileRecord.update(
                    state=(State.QUARANTINED if f.quarantine else State.FAILED).value,
                    next_try=f.next_try,
                    error_class=f.error_class,
                    last_error=f.error[-2000:],
                    updated_at=wall,
                ).where(FileRecord.id == f.id).execute()
                Attempt.update(outcome=f.outcome, error=f.error[-2000:]).where(
                    (Attempt.batch == report.job.id) & (Attempt.file == f.id)
                ).execute()

    def held(self, plain: Sequence[int], renamed: Sequence[tuple[int, str]], wall: float) -> None:
        """Files now in holding: under their own name (``plain``) or a suffixed one."""
        with self._transaction():
            self._write_held(plain, renamed, wall)

    def _write_held(
        self,
        plain: Sequence[int],
        renamed: Sequence[tuple[int, str]],
        wall: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        values = {"state": State.HELD.value, "held_at": wall, "updated_at": wall, **(extra or {})}
        self._update_ids(plain, values, copy=("held_as", "name"))
        for row_id, held_as in renamed:
            FileRecord.update(held_as=display(held_as), **values).where(FileRecord.id == row_id).execute()

    def set_state(
        self,
        ids: Sequence[int],
        state: State,
        *,
        error: str | None,
        wall: float,
        error_class: str | None = None,
    ) -> None:
        values: dict[Any, Any] = {"state": state.value, "updated_at": wall, "last_error": error}
        if error_class is not None:
            values["error_class"] = error_class
        if state is State.COMMITTED:
            values["committed_at"] = wall
        with self._transaction():
            for chunk in _chunks(list(ids), CHUNK):
                FileRecord.update(values).where(FileRecord.id.in_(chunk)).execute()

    def note_error(self, row_id: int, error_class: str, error: str) -> None:
        FileRecord.update(error_class=error_class, last_error=error, updated_at=time.time()).where(
            FileRecord.id == row_id
        ).execute()

    def _update_ids(
        self,
        ids: Sequence[int],
        values: dict[str, Any],
        *,
        table: type[pw.Model] = FileRecord,
        key: str = "id",
        batch: int | None = None,
        increment: str | None = None,
        copy: tuple[str, str] | None = None,
    ) -> None:
        """``UPDATE table SET values WHERE key IN ids`` as plain SQL, a chunk at a time.

        peewee's builder spends milliseconds on an IN list of a few hundred ids; this is the
        hot path (several statements per batch), so the SQL is written out here.
        """
        p = self.db.param
        sets = [f'"{column}" = {p}' for column in values]
        if increment:
            sets.append(f'"{increment}" = "{increment}" + 1')
        if copy:
            sets.append(f'"{copy[0]}" = "{copy[1]}"')
        where = f'"batch_id" = {p} AND ' if batch is not None else ""
        head = f'UPDATE "{table._meta.table_name}" SET {", ".join(sets)} WHERE {where}"{key}" IN '
        prefix = [*values.values(), *([batch] if batch is not None else [])]
        for chunk in _chunks(list(ids), CHUNK):
            self.db.execute_sql(head + f"({', '.join([p] * len(chunk))})", [*prefix, *chunk])

    def _set_checksums(self, pairs: Sequence[tuple[int, str]]) -> None:
        if not pairs:
            return
        table = FileRecord._meta.table_name
        p = self.db.param
        sql = f'UPDATE "{table}" SET "checksum" = {p} WHERE "id" = {p}'
        cursor = self.db.cursor()
        cursor.executemany(sql, [(digest, row_id) for row_id, digest in pairs])


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
