"""The file table: the one owner of every known file's state, in memory and in the database.

State owned: for each path in the buffer that hdfmgr is handling, its row (id, size, mtime,
inode, attempts, whether its checksum is stored) and its state. Nothing else changes a file's
state: every change goes through a method here, which checks it against :data:`TRANSITIONS`
and writes the database in the same place, so that the row on disk and the entry in memory
never disagree and no code path can, say, take a file from ``staging`` to ``held``.

A file leaves the table when it is done (held, or retired as an earlier delivered version)
or when it vanished from the buffer undelivered (quarantined with the reason). A file
quarantined while still in the buffer stays as a *tombstone*: the same path, size and mtime
are never registered again, across scans and restarts, until it changes or ``hdfmgr retry``
re-queues it.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from .db import State
from .deliver import BatchReport
from .endpoint import ErrorClass
from .record import Failure, Recorder
from .replies import StagedFile
from .settle import Snapshot

READY = State.READY.value
STAGING = State.STAGING.value
COMMITTING = State.COMMITTING.value
COMMITTED = State.COMMITTED.value
FAILED = State.FAILED.value
QUARANTINED = State.QUARANTINED.value
HELD = State.HELD.value
#: Not a database state: the file has left the table (held, retired, vanished, replaced).
GONE = "gone"
NEW = "new"

#: Every change of state a file may make; anything else is a bug (:class:`IllegalTransition`).
TRANSITIONS: dict[str, frozenset[str]] = {
    NEW: frozenset({READY}),
    READY: frozenset({STAGING, READY, QUARANTINED}),
    FAILED: frozenset({STAGING, READY, QUARANTINED}),
    STAGING: frozenset({COMMITTING, FAILED, QUARANTINED, READY}),
    # a lost reply leaves it COMMITTING until a listing decides; a commit's report or the
    # listing sends it on
    COMMITTING: frozenset({COMMITTED, FAILED, QUARANTINED, READY}),
    COMMITTED: frozenset({HELD}),
    # a tombstone: re-queued by 'hdfmgr retry', or forgotten once it changes or leaves
    QUARANTINED: frozenset({READY, GONE}),
}
IN_FLIGHT = (STAGING, COMMITTING)


class IllegalTransition(RuntimeError):
    """A change of state the table does not allow: a bug, never a condition to handle."""


def _stamp(mtime_ns: int, inode: int) -> int:
    """mtime and inode in one int: one object a file instead of two (3 MB per 100,000)."""
    return (inode << 64) | (mtime_ns + (1 << 63))


class Known:
    """One file's entry: the in-memory mirror of its database row."""

    __slots__ = ("attempts", "hashed", "id", "scanned", "since", "size", "stamp", "state")

    def __init__(
        self,
        id: int,
        size: int,
        mtime_ns: int,
        inode: int,
        state: str,
        attempts: int = 0,
        hashed: bool = False,
        since: float = 0.0,
    ) -> None:
        self.id = id
        self.size = size
        self.stamp = _stamp(mtime_ns, inode)
        self.state = state
        self.attempts = attempts
        #: The BLAKE2b is in the database (read back per batch: 177 bytes a file is too
        #: much to keep in memory for a backlog of 100,000).
        self.hashed = hashed
        self.since = since
        #: Number of the last full scan that saw the file (a set of 100,000 names per scan
        #: would cost more memory than all of these).
        self.scanned = 0

    @property
    def mtime_ns(self) -> int:
        return (self.stamp & ((1 << 64) - 1)) - (1 << 63)

    @property
    def inode(self) -> int:
        return self.stamp >> 64

    def matches(self, snap: Snapshot) -> bool:
        return self.size == snap.size and self.stamp == _stamp(snap.mtime_ns, snap.inode)

    def snapshot(self) -> Snapshot:
        """The version registered (the one sent, once it is in flight)."""
        return Snapshot(self.size, self.mtime_ns, self.inode)


@dataclass
class Loaded:
    """What a restart found in the records, for the scheduler and the reconciliation."""

    ready: list[str] = field(default_factory=list)
    retries: list[tuple[float, str]] = field(default_factory=list)  # (monotonic due, rel)
    committing: dict[int, list[str]] = field(default_factory=dict)  # batch id -> files


@dataclass
class Registered:
    """The outcome of registering settled files."""

    ready: list[str] = field(default_factory=list)  # to enqueue
    settled: list[str] = field(default_factory=list)  # delivered, and their writer is done
    retired: list[str] = field(default_factory=list)  # an earlier delivered version, retired


class FileTable:
    """Known files by relative path, and every change of their state."""

    def __init__(self) -> None:
        self._known: dict[str, Known] = {}
        self.recorder: Recorder | None = None

    # ------------------------------------------------------------------ reading

    def __contains__(self, rel: str) -> bool:
        return rel in self._known

    def __getitem__(self, rel: str) -> Known:
        return self._known[rel]

    def __len__(self) -> int:
        return len(self._known)

    def get(self, rel: str) -> Known | None:
        return self._known.get(rel)

    def items(self) -> Iterator[tuple[str, Known]]:
        return iter(list(self._known.items()))

    def in_state(self, *states: str) -> list[str]:
        return [rel for rel, k in self._known.items() if k.state in states]

    def undelivered(self) -> list[str]:
        return [rel for rel, k in self._known.items() if k.state not in (COMMITTED, QUARANTINED)]

    def waiting(self) -> tuple[int, int]:
        """Files (and bytes) known and not delivered yet."""
        pending = [k for k in self._known.values() if k.state not in (COMMITTED, QUARANTINED)]
        return len(pending), sum(k.size for k in pending)

    def unseen(self, scan_number: int) -> list[tuple[str, Known]]:
        return [(rel, k) for rel, k in self._known.items() if k.scanned != scan_number]

    @property
    def rec(self) -> Recorder:
        assert self.recorder is not None, "the file table has no database yet"
        return self.recorder

    def with_checksums(self, files: list[StagedFile]) -> list[StagedFile]:
        """The batch's files with the checksums already stored (each version is hashed once)."""
        stored = self.rec.checksums([self._known[f.rel].id for f in files if self._known[f.rel].hashed])
        if not stored:
            return files
        return [StagedFile(f.rel, f.path, f.size, stored.get(self._known[f.rel].id)) for f in files]

    # ------------------------------------------------------------------ transitions

    def _move(self, rels: Iterable[str], to: str) -> None:
        """The one place a state changes in memory (its database write is the caller's,
        in the same method)."""
        for rel in rels:
            known = self._known[rel]
            if to not in TRANSITIONS.get(known.state, ()):
                raise IllegalTransition(f"{rel!r}: {known.state} -> {to}")
            if to in (GONE, HELD):
                del self._known[rel]  # done: nothing more can happen to this version
            else:
                known.state = to

    def _ids(self, rels: Iterable[str]) -> list[int]:
        return [self._known[rel].id for rel in rels]

    def load(self, *, once: bool) -> Loaded:
        """Every unfinished row, and the tombstones, from the records (at start-up)."""
        now, wall = time.monotonic(), time.time()
        loaded = Loaded()
        # One shared string per state, not one per row (a restart with 100,000 unfinished
        # files runs this loop for each).
        states = {s.value: s.value for s in State}
        known_files = self._known
        for row in self.rec.active():
            rel, state = row.rel, states[row.state]
            known_files[rel] = Known(
                row.id, row.size, row.mtime_ns, row.inode, state, row.attempts, row.hashed, since=now
            )
            if state == COMMITTING and row.last_batch is not None:
                loaded.committing.setdefault(row.last_batch, []).append(rel)
            elif state == READY or (state == FAILED and once):
                loaded.ready.append(rel)
            elif state == FAILED:
                loaded.retries.append((now + max(0.0, row.next_try - wall), rel))
        for row in self.rec.quarantined():
            if row.rel not in known_files:
                known_files[row.rel] = Known(
                    row.id, row.size, row.mtime_ns, row.inode, QUARANTINED, row.attempts, row.hashed
                )
        return loaded

    def register(self, items: list[tuple[str, Snapshot]], now: float, queued: Container[str]) -> Registered:
        """Settled files: new ones get a row, changed ones a new version (one transaction
        each). ``queued`` says which are in the ready queue already."""
        wall = time.time()
        out = Registered()
        new: list[tuple[str, Snapshot]] = []
        changed: list[tuple[str, Snapshot, Known]] = []
        for rel, snap in items:
            known = self._known.get(rel)
            if known is None:
                new.append((rel, snap))
            elif known.matches(snap):
                if known.state == READY and rel not in queued:
                    out.ready.append(rel)
                elif known.state == COMMITTED:
                    out.settled.append(rel)
            elif known.state == COMMITTED:
                # Delivered, then rewritten before it reached holding: the delivered version
                # is done; the new content is a new version.
                self.retire(rel, "replaced in the buffer by a new version after delivery")
                out.retired.append(rel)
                new.append((rel, snap))
            elif known.state == QUARANTINED:
                # Replaced by the operator (or the camera): the quarantined row stays as it
                # was, the new content is a new version.
                self._move([rel], GONE)
                new.append((rel, snap))
            else:
                changed.append((rel, snap, known))
        if changed:
            self.rec.new_version([(known.id, snap) for _, snap, known in changed], wall)
            for rel, snap, known in changed:
                self._move([rel], READY)
                known.size, known.stamp = snap.size, _stamp(snap.mtime_ns, snap.inode)
                known.hashed, known.since = False, now
                out.ready.append(rel)
        if new:
            ids = self.rec.insert(new, wall)
            for (rel, snap), row_id in zip(new, ids, strict=True):
                self._known[rel] = Known(row_id, snap.size, snap.mtime_ns, snap.inode, NEW, since=now)
                self._move([rel], READY)
                out.ready.append(rel)
        return out

    def retire(self, rel: str, reason: str) -> None:
        """A delivered version whose file was replaced: done, with the reason."""
        self.rec.set_state(self._ids([rel]), State.HELD, error=reason, wall=time.time())
        self._move([rel], HELD)

    def vanished(self, rels: Sequence[str]) -> None:
        """Gone from the buffer before delivery: quarantined with the reason, and forgotten
        (nothing is left in the buffer to keep a tombstone for)."""
        self.rec.set_state(
            self._ids(rels),
            State.QUARANTINED,
            error="vanished from the buffer before it was delivered",
            error_class=ErrorClass.LOCAL,
            wall=time.time(),
        )
        self._move(rels, QUARANTINED)
        self._move(rels, GONE)

    def forget(self, rels: Iterable[str]) -> None:
        """Tombstones whose file left the buffer: no scan can register that version again."""
        self._move(rels, GONE)

    def requeued(self, now: float) -> list[str]:
        """Files an operator re-queued (``hdfmgr retry``): READY in the records; the ones to
        enqueue now."""
        out: list[str] = []
        for row in self.rec.requeued():
            known = self._known.get(row.rel)
            if known is not None and known.id != row.id:
                continue  # a newer version of that path is already being handled
            if known is None:
                known = Known(
                    row.id, row.size, row.mtime_ns, row.inode, NEW, row.attempts, row.hashed, since=now
                )
                self._known[row.rel] = known
            elif known.state in IN_FLIGHT or known.state == COMMITTED:
                continue  # its batch, or its hold, decides
            self._move([row.rel], READY)
            out.append(row.rel)
        return out

    def start_batch(self, staging_dir: str, files: Sequence[StagedFile], wall: float) -> int:
        """A batch row, and its files STAGING, before any command runs."""
        rels = [f.rel for f in files]
        batch_id = self.rec.start_batch(staging_dir, self._ids(rels), sum(f.size for f in files), wall)
        self._move(rels, STAGING)
        for rel in rels:
            self._known[rel].attempts += 1
        return batch_id

    def committing(self, batch_id: int, rels: Sequence[str], checksums: dict[str, str]) -> None:
        """COMMITTING on disk before the remote mv may run: a restart must know."""
        self.rec.committing(batch_id, self._ids(rels), self.new_checksums(checksums), time.time())
        self._move(rels, COMMITTING)

    def new_checksums(self, checksums: dict[str, str]) -> list[tuple[int, str]]:
        """Checksums not stored yet (each file version is hashed once, then remembered)."""
        pairs = []
        for rel, digest in checksums.items():
            known = self._known[rel]
            if not known.hashed:
                known.hashed = True
                pairs.append((known.id, digest))
        return pairs

    def finish_batch(self, plan: BatchOutcome, wall: float) -> None:
        """A batch's outcome for every file, in one transaction, then in memory."""
        report = plan.report
        held = report.held
        committed = plan.committed
        self.rec.finish_batch(
            report,
            committed=self._ids(rel for rel in committed if rel not in held),
            held=self._ids(rel for rel in committed if held.get(rel) == rel),
            renamed=[(self._known[rel].id, held[rel]) for rel in committed if held.get(rel, rel) != rel],
            failures=[failure for _, failure in plan.failures],
            unknown=self._ids(report.unknown),
            checksums=self.new_checksums(report.checksums),
            wall=wall,
        )
        self._move(committed, COMMITTED)
        self._move([rel for rel in committed if rel in held], HELD)
        for rel, failure in plan.failures:
            self._move([rel], QUARANTINED if failure.quarantine else FAILED)

    def set_state(
        self, rels: Sequence[str], state: State, *, error: str | None, error_class: str | None = None
    ) -> None:
        """A change decided outside a batch's report: a restart, a listing."""
        self.rec.set_state(self._ids(rels), state, error=error, error_class=error_class, wall=time.time())
        self._move(rels, state.value)

    def held(self, plain: Sequence[str], renamed: Sequence[tuple[str, str]]) -> None:
        """Delivered files now in holding (under their own name, or a suffixed one): done."""
        self.rec.held(self._ids(plain), [(self._known[rel].id, name) for rel, name in renamed], time.time())
        self._move([*plain, *(rel for rel, _ in renamed)], HELD)

    def note_error(self, rel: str, error_class: str, error: str) -> None:
        """An error that changes no state (a delivered file that cannot be held yet)."""
        self.rec.note_error(self._known[rel].id, error_class, error)


@dataclass
class BatchOutcome:
    """What a batch's report comes to, file by file (built by :mod:`hdfmgr.outcomes`)."""

    report: BatchReport
    committed: list[str]
    failures: list[tuple[str, Failure]]
