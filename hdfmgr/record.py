"""Every database write the daemon makes, batched per transfer batch, not per file.

Only the dispatcher's thread calls these. Each method is one transaction, so a state is either
on disk completely or not at all when the process dies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import peewee as pw

from .db import Attempt, FileRecord, State, TransferBatch, display, from_blob, to_blob
from .deliver import BatchReport, describe_commands
from .settle import Snapshot

#: Rows per statement: well under SQLite's 32766 bound parameters and PostgreSQL's limits.
CHUNK = 500


@dataclass(frozen=True, slots=True)
class ActiveRow:
    id: int
    rel: str
    size: int
    mtime_ns: int
    inode: int
    state: str
    attempts: int
    checksum: str | None
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

    def active(self) -> Iterator[ActiveRow]:
        """Rows of files not yet done: what a restart must resume."""
        query = (
            FileRecord.select(
                FileRecord.id,
                FileRecord.relpath,
                FileRecord.size,
                FileRecord.mtime_ns,
                FileRecord.inode,
                FileRecord.state,
                FileRecord.attempts,
                FileRecord.checksum,
                FileRecord.next_try,
                FileRecord.last_batch,
            )
            .where(
                (FileRecord.source == self.source)
                & FileRecord.state.not_in([State.HELD.value, State.QUARANTINED.value])
            )
            .tuples()
        )
        for row in query:
            yield ActiveRow(row[0], from_blob(row[1]), *row[2:])

    def requeued(self) -> Iterator[ActiveRow]:
        """Rows in state READY: after ``hdfmgr retry``, the ones the daemon does not know yet."""
        for row in self.active():
            if row.state == State.READY.value:
                yield row

    def staging_dirs(self, batch_ids: Iterable[int]) -> dict[int, str]:
        query = TransferBatch.select(TransferBatch.id, TransferBatch.staging_dir).where(
            TransferBatch.id.in_(list(batch_ids))
        )
        return dict(query.tuples())

    def insert(self, items: Sequence[tuple[str, Snapshot]], wall: float) -> list[int]:
        """New file versions, state READY; returns their ids in order."""
        ids: list[int] = []
        with self.db.atomic():
            for chunk in _chunks(list(items), 200):
                rows = [
                    {
                        "source": self.source,
                        "relpath": to_blob(rel),
                        "name": display(rel),
                        "size": snap.size,
                        "mtime_ns": snap.mtime_ns,
                        "inode": snap.inode,
                        "state": State.READY.value,
                        "detected_at": wall,
                        "ready_at": wall,
                        "updated_at": wall,
                    }
                    for rel, snap in chunk
                ]
                cursor = FileRecord.insert_many(rows).returning(FileRecord.id).execute()
                ids.extend(row.id if hasattr(row, "id") else row[0] for row in cursor)
        return ids

    def new_version(self, updates: Sequence[tuple[int, Snapshot]], wall: float) -> None:
        """A file that changed before delivery: same row, new size/mtime, no checksum yet."""
        with self.db.atomic():
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
        with self.db.atomic():
            batch = TransferBatch.create(
                source=self.source, staging_dir=staging_dir, started_at=wall, files=len(ids), bytes=nbytes
            )
            for chunk in _chunks(list(ids), CHUNK):
                FileRecord.update(
                    state=State.STAGING.value,
                    attempts=FileRecord.attempts + 1,
                    last_batch=batch.id,
                    updated_at=wall,
                ).where(FileRecord.id.in_(chunk)).execute()
                Attempt.insert_many([{"batch": batch.id, "file": i} for i in chunk]).execute()
        return batch.id

    def committing(
        self, batch_id: int, ids: Sequence[int], checksums: Sequence[tuple[int, str]], wall: float
    ) -> None:
        """COMMITTING (and the new checksums) on disk before the remote mv may run."""
        with self.db.atomic():
            self._set_checksums(checksums)
            for chunk in _chunks(list(ids), CHUNK):
                FileRecord.update(state=State.COMMITTING.value, updated_at=wall).where(
                    FileRecord.id.in_(chunk)
                ).execute()
            TransferBatch.update(commit_started=wall).where(TransferBatch.id == batch_id).execute()

    def finish_batch(
        self,
        report: BatchReport,
        *,
        committed: Sequence[int],
        failures: Sequence[Failure],
        checksums: Sequence[tuple[int, str]],
        wall: float,
    ) -> None:
        """The batch's timings and commands, and every file's outcome, in one transaction."""
        transfer_seconds = sum(r.duration for r in report.transfers) if report.transfers else None
        nbytes = sum(f.size for f in report.job.files)
        commands = report.commands()
        last = commands[-1] if commands else None
        status = "committed" if not failures else ("partial" if committed else "failed")
        with self.db.atomic():
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
                committed=len(committed),
            ).where(TransferBatch.id == report.job.id).execute()
            self._set_checksums(checksums)
            for chunk in _chunks(list(committed), CHUNK):
                FileRecord.update(
                    state=State.COMMITTED.value,
                    committed_at=wall,
                    updated_at=wall,
                    error_class=None,
                    last_error=None,
                ).where(FileRecord.id.in_(chunk)).execute()
                Attempt.update(outcome="committed").where(
                    (Attempt.batch == report.job.id) & Attempt.file.in_(chunk)
                ).execute()
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
        with self.db.atomic():
            for chunk in _chunks(list(plain), CHUNK):
                FileRecord.update(
                    state=State.HELD.value, held_as=FileRecord.name, held_at=wall, updated_at=wall
                ).where(FileRecord.id.in_(chunk)).execute()
            for row_id, held_as in renamed:
                FileRecord.update(
                    state=State.HELD.value, held_as=display(held_as), held_at=wall, updated_at=wall
                ).where(FileRecord.id == row_id).execute()

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
        with self.db.atomic():
            for chunk in _chunks(list(ids), CHUNK):
                FileRecord.update(values).where(FileRecord.id.in_(chunk)).execute()

    def note_error(self, row_id: int, error_class: str, error: str) -> None:
        FileRecord.update(error_class=error_class, last_error=error, updated_at=time.time()).where(
            FileRecord.id == row_id
        ).execute()

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
