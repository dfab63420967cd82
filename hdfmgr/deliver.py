"""One batch on a worker thread: hash, prepare staging, transfer, verify and commit.

This runs off the main thread and never touches the database. The one moment it must wait for
the main thread is right before the remote ``mv``: the files' COMMITTING state has to be on
disk first, so that a restart knows they may already be in the endpoint buffer
(``checkpoint``). After the commit the worker also moves the delivered files to holding
(``hold``), so that the main thread, which every batch's records go through, only records.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import pin
from .checksum import blake2b_file
from .detect import snapshot
from .endpoint import COMMIT_STATUS, Endpoint, ErrorClass, StagedFile, classify
from .holding import HoldError, HoldResult, Outcome
from .runner import CommandResult, Feed
from .settle import Snapshot
from .stream import TarStream

log = logging.getLogger("hdfmgr")

#: Per-file outcomes of a batch.
COMMITTED = "committed"
FAILED = "failed"
UNVERIFIED = "unverified"
CHANGED = "changed"
#: The local file cannot be read (its mode, an I/O error): the file's own fault, quarantined
#: at once, and left out of the transfer so that it never fails the others.
UNREADABLE = "unreadable"
#: Verified, not renamed: an earlier version of it waits in the endpoint buffer.
WAITING = "waiting"

WAITING_REASON = (
    "its final name exists in the endpoint buffer (an earlier version not ingested yet); "
    "never overwritten: sent again, with backoff, once it is gone"
)


@dataclass
class BatchJob:
    """What the main thread hands a worker: files with distinct basenames and a staging slot."""

    id: int
    slot: int
    staging_dir: str
    files: list[StagedFile]
    snapshots: dict[str, Snapshot]
    prepare: bool
    #: The slot's private directory of pins (see :mod:`hdfmgr.pin`); None: send the buffer's
    #: paths as they are.
    pin_dir: str | None = None


@dataclass
class BatchReport:
    """What the worker hands back: every command's result and every file's outcome."""

    job: BatchJob
    started: float
    checksums: dict[str, str] = field(default_factory=dict)
    hash_seconds: float = 0.0
    prepare: CommandResult | None = None
    transfers: list[CommandResult] = field(default_factory=list)
    commit: CommandResult | None = None
    outcomes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    error_class: str | None = None
    error: str | None = None
    slot_clean: bool = True
    #: Delivered files moved to holding: relative path in the buffer -> relative path in holding.
    held: dict[str, str] = field(default_factory=dict)
    #: Delivered files that could not be moved (relative path -> the HoldError's message).
    hold_errors: dict[str, str] = field(default_factory=dict)
    #: Delivered files that changed or vanished in the buffer since (relative path -> why).
    changed_after: dict[str, str] = field(default_factory=dict)
    #: Delivered files left in the buffer until a writer is known to be done with them:
    #: relative path -> Outcome.WRITING (one has it open) or Outcome.UNPROVEN (cannot tell).
    deferred: dict[str, Outcome] = field(default_factory=dict)
    #: Files whose commit ran but whose reply was lost: any of them may be in the endpoint
    #: buffer. They stay COMMITTING until a listing of the slot directory tells.
    unknown: list[str] = field(default_factory=list)

    def committed(self) -> list[str]:
        return [f.rel for f in self.job.files if self.outcomes.get(f.rel, ("",))[0] == COMMITTED]

    def commands(self) -> list[CommandResult]:
        return [r for r in (self.prepare, *self.transfers, self.commit) if r is not None]

    def fail(self, result: CommandResult, phase: str) -> None:
        self.error_class = classify(result)
        self.error = f"{phase}: {result.describe()}"
        self.slot_clean = False


#: Called with the job, the files about to be committed and new checksums; returns False when
#: the daemon is shutting down and the commit must not start.
Checkpoint = Callable[[BatchJob, list[StagedFile], dict[str, str]], bool]

#: Moves one delivered file (relative path, the version sent) to holding if it is still that
#: version and no writer is at it (holding.hold_delivered).
Holder = Callable[[str, Snapshot], HoldResult]

CHANGED_AFTER = "changed or vanished in the buffer after delivery; not moved to holding"

GONE_REASON = "verified, then gone from staging before the move; sending again"
NOT_MOVED_REASON = "verified but not moved: mkdir or mv failed in the endpoint buffer"
UNSURE_REASON = "mv failed and the file left staging: outcome unknown; sending again"

#: Files at least this large are hashed outside the turn (see :class:`_Turns`).
LONG_CALL_BYTES = 1024 * 1024

_local_io = threading.Lock()


class _Turns:
    """Makes the workers' per-file loops (hashing, holding) take turns on the file system.

    Two threads that each make many short system calls at once hand the interpreter lock to
    each other after every call, and both crawl: 10,000 holding moves took 0.12-0.22 s in one
    thread and 0.29-0.32 s split over two running together, and in the daemon a batch's
    holding loop used 0.19 CPU-seconds beside another one against 0.08 on its own. So a loop
    holds this turn across a run of short calls. A large file is handled outside it: hashlib
    releases the interpreter lock while it digests a block, so two of those do run in
    parallel, and holding may have to copy it to another file system, which must not hold up
    the other workers.
    """

    def __init__(self) -> None:
        self.held = False

    def before(self, size: int) -> None:
        """Before the calls on one file of ``size`` bytes: in turn if it is small, else out."""
        if size < LONG_CALL_BYTES:
            if not self.held:
                _local_io.acquire()
                self.held = True
        else:
            self.release()

    def release(self) -> None:
        if self.held:
            _local_io.release()
            self.held = False

    def __enter__(self) -> _Turns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def deliver(
    job: BatchJob, endpoint: Endpoint, checkpoint: Checkpoint, hold: Holder | None = None
) -> BatchReport:
    """Run one batch's commands; never raises (a bug becomes a failed batch, retried)."""
    report = BatchReport(job, time.time())
    try:
        _steps(job, _pin(job, report), endpoint, checkpoint, report)
    except Exception as exc:
        log.exception("batch %d failed unexpectedly", job.id)
        report.error_class, report.error = ErrorClass.LOCAL, f"internal error: {exc!r}"
        report.slot_clean = False
        return report
    finally:
        if job.pin_dir is not None:
            pin.release(job.pin_dir)
    if hold is not None:
        try:
            _hold(job, report, hold)
        except Exception:
            # The files are delivered whatever happens here; the main thread holds the rest.
            log.exception("batch %d: moving to holding failed unexpectedly", job.id)
    return report


def _hold(job: BatchJob, report: BatchReport, hold: Holder) -> None:
    """Delivered files that are still the delivered version, with no writer, go to holding."""
    with _Turns() as turn:
        for f in job.files:
            if report.outcomes.get(f.rel, ("",))[0] != COMMITTED:
                continue
            turn.before(f.size)
            try:
                result = hold(f.rel, job.snapshots[f.rel])
            except HoldError as exc:
                report.hold_errors[f.rel] = str(exc)
                continue
            if result.outcome is Outcome.HELD and result.name is not None:
                report.held[f.rel] = result.name
            elif result.outcome is Outcome.CHANGED:
                report.changed_after[f.rel] = CHANGED_AFTER
            else:
                report.deferred[f.rel] = result.outcome


def _pin(job: BatchJob, report: BatchReport) -> list[StagedFile]:
    """The batch's files as the transfer, the hash and the checks will see them: pinned."""
    if job.pin_dir is None:
        return list(job.files)
    files = []
    with _Turns() as turn:  # short system calls only, whatever the size
        for f in job.files:
            turn.before(0)
            files.extend(_pin_one(job, f, report))
    return files


def _pin_one(job: BatchJob, f: StagedFile, report: BatchReport) -> list[StagedFile]:
    """The pinned file, or nothing (its outcome in the report)."""
    assert job.pin_dir is not None
    try:
        path = pin.pin(f.path, job.pin_dir, job.snapshots[f.rel])
    except pin.NotRegistered:
        report.outcomes[f.rel] = (CHANGED, "changed or replaced in the buffer before the transfer")
        return []
    except pin.Unreadable as exc:
        report.outcomes[f.rel] = (_read_outcome(exc), f"cannot read: {exc.strerror}")
        return []
    except OSError as exc:
        report.outcomes[f.rel] = (FAILED, f"cannot pin it for the transfer in {job.pin_dir}: {exc.strerror}")
        return []
    return [StagedFile(f.rel, path, f.size, f.checksum)]


def _steps(
    job: BatchJob, files: list[StagedFile], endpoint: Endpoint, checkpoint: Checkpoint, report: BatchReport
) -> None:
    if not files:
        report.error_class, report.error = (
            ErrorClass.LOCAL,
            "no file of the batch is still the registered one",
        )
        return
    # Hash while the transfer runs: the digest is needed only at the commit, and on a large
    # file hashing alone takes about as long as a local copy.
    readable = _readable(files, report)
    if not readable:
        report.error_class, report.error = ErrorClass.LOCAL, "no readable file in batch"
        return
    if endpoint.config.stream:
        # The stream hashes what it sends: each file is read once.
        hashed = _stream(job, readable, endpoint, report)
        if hashed is None:
            return
    else:
        hashed = []
        hasher = threading.Thread(
            target=lambda: hashed.extend(_hash(job, report, readable)), name=f"hash-{job.id}"
        )
        hasher.start()
        try:
            if not _transfer(job, readable, endpoint, report):
                return
        finally:
            hasher.join()
    files = [f for f in hashed if f.rel not in report.outcomes]
    if not files:
        report.error_class, report.error = ErrorClass.LOCAL, "no readable file in batch"
        return
    # The transfer read the files while they could still change: commit only those that are
    # still the version that was registered.
    to_commit = []
    with _Turns() as turn:
        for f in files:
            turn.before(0)
            sent = job.snapshots[f.rel]
            if not (pin.intact(f.path, sent) if job.pin_dir is not None else snapshot(f.path) == sent):
                report.outcomes[f.rel] = (CHANGED, "changed or vanished during the transfer")
                report.slot_clean = False
            else:
                to_commit.append(f)
    if not to_commit or not checkpoint(job, to_commit, report.checksums):
        return
    result, listing = endpoint.commit(job.staging_dir, None, to_commit, batch=job.id)
    report.commit = result
    if listing is None:
        # Cut off (a dropped connection, a timeout) or never framed: the script may have moved
        # any of them. Sending them again now could deliver a file twice.
        report.unknown = [f.rel for f in to_commit]
        if result.ok:
            report.error_class, report.error = ErrorClass.REMOTE, "verify and commit: incomplete reply"
            report.slot_clean = False
        else:
            report.fail(result, "verify and commit")
        return
    mode = endpoint.config.verify
    if listing.aborted is not None:
        # It stopped before renaming anything: nothing moved, known for certain.
        status, reason = listing.aborted
        report.error_class = ErrorClass.ENDPOINT
        why = reason or COMMIT_STATUS.get(status, "stopped")
        report.error = f"verify and commit: {why} (exit status {status}; nothing moved)"
        report.slot_clean = False
        for f in to_commit:
            report.outcomes[f.rel] = (FAILED, report.error)
        return
    # Evidence per file: only a reported rename is a delivery.
    unknown = listing.unreported
    for f in to_commit:
        name = f.basename
        if name in listing.moved:
            report.outcomes[f.rel] = (COMMITTED, None)
        elif name not in listing.verified:
            report.outcomes[f.rel] = (UNVERIFIED, f"staged copy failed {mode} verification")
        elif name in listing.exists:
            report.outcomes[f.rel] = (WAITING, WAITING_REASON)
        elif name in listing.gone:
            report.outcomes[f.rel] = (FAILED, GONE_REASON)
        elif name in listing.failed:
            report.outcomes[f.rel] = (FAILED, NOT_MOVED_REASON)
        elif name in listing.unsure:
            # mv failed for its group and it left staging, yet its final name is absent:
            # vanished, or renamed and ingested at once. Sending again risks a duplicate,
            # never a loss.
            report.outcomes[f.rel] = (FAILED, UNSURE_REASON)
        elif name in unknown:
            report.unknown.append(f.rel)
    if len(listing.moved) < len(to_commit):
        report.slot_clean = False
    if report.unknown:
        report.error_class, report.error = ErrorClass.REMOTE, "verify and commit: the move step broke off"
    elif not result.ok:
        report.fail(result, "verify and commit")
    elif any(outcome == UNVERIFIED for outcome, _ in report.outcomes.values()):
        report.error_class = ErrorClass.VERIFICATION
        report.error = f"staged copy failed {mode} verification"
    elif any(outcome == WAITING for outcome, _ in report.outcomes.values()):
        report.error_class, report.error = ErrorClass.EXISTS, WAITING_REASON
    elif any(outcome == FAILED for outcome, _ in report.outcomes.values()):
        report.error_class, report.error = ErrorClass.REMOTE, "verify and commit: some files were not moved"


def _readable(files: list[StagedFile], report: BatchReport) -> list[StagedFile]:
    """The files this process can open; the others get the outcome UNREADABLE.

    A transfer tool that meets an unreadable file fails the whole batch (cp, scp and rsync
    all exit non-zero), and nothing in its exit status says which file was at fault: so each
    file is opened first (one open and close, no read).
    """
    readable = []
    for f in files:
        try:
            os.close(os.open(f.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ELOOP):
                readable.append(f)  # gone or replaced: the transfer's check tells (CHANGED)
                continue
            report.outcomes[f.rel] = (_read_outcome(exc), f"cannot read: {exc.strerror}")
            continue
        readable.append(f)
    return readable


def _read_outcome(exc: OSError) -> str:
    """A permission refused is the file's own state: quarantined at once. Any other read error
    (EIO, or ESTALE and timeouts on a network buffer) may pass: retried with backoff."""
    return UNREADABLE if exc.errno in (errno.EACCES, errno.EPERM) else FAILED


def _transfer(job: BatchJob, files: list[StagedFile], endpoint: Endpoint, report: BatchReport) -> bool:
    """Prepare the slot if needed and run the transfer command(s); False on a failure."""
    if job.prepare:
        report.prepare = endpoint.prepare(job.staging_dir)
        if not report.prepare.ok:
            report.fail(report.prepare, "preparing staging")
            return False
    argvs = endpoint.transfer_argvs(files, job.staging_dir)
    # One command for the batch, or one per file (a template without {batch}).
    per_file = len(argvs) > 1 and len(argvs) == len(files)
    sizes = [f.size for f in files] if per_file else [sum(f.size for f in files)] * len(argvs)
    for argv, nbytes in zip(argvs, sizes, strict=True):
        result = endpoint.transfer(argv, nbytes)
        report.transfers.append(result)
        if not result.ok:
            report.fail(result, "transfer")
            return False
    return True


def _stream(
    job: BatchJob, files: list[StagedFile], endpoint: Endpoint, report: BatchReport
) -> list[StagedFile] | None:
    """The built-in stream transfer (hdfmgr/stream.py): the batch as one tar stream into the
    slot, hashed as it is read. The files with their checksums, or None when it failed."""
    tar = TarStream(files)
    result = endpoint.receive(job.staging_dir, Feed(tar.length, tar.chunks()), batch=job.id)
    report.transfers.append(result)
    report.hash_seconds = tar.hash_seconds
    report.checksums.update(tar.digests)
    for f in files:
        exc = tar.unread.get(f.rel)
        if exc is not None:
            outcome = CHANGED if exc.errno in (errno.ENOENT, errno.ELOOP) else _read_outcome(exc)
            report.outcomes[f.rel] = (outcome, f"cannot read: {exc.strerror}")
        elif f.rel in tar.short:
            report.outcomes[f.rel] = (CHANGED, "changed or vanished during the transfer")
            report.slot_clean = False
    if not result.ok:
        report.fail(result, "transfer")
        return None
    return [
        StagedFile(f.rel, f.path, f.size, f.checksum or tar.digests[f.rel])
        for f in files
        if f.rel not in report.outcomes
    ]


def _hash(job: BatchJob, report: BatchReport, files: list[StagedFile] | None = None) -> list[StagedFile]:
    """BLAKE2b each file (of ``files``, by default the job's) that has none yet (once per
    version: it is stored afterwards)."""
    t0 = time.monotonic()
    hashed = []
    with _Turns() as turn:
        for f in job.files if files is None else files:
            digest = f.checksum
            if digest is None:
                turn.before(f.size)
                try:
                    digest = blake2b_file(f.path)
                except OSError as exc:
                    outcome = CHANGED if exc.errno == errno.ENOENT else _read_outcome(exc)
                    report.outcomes[f.rel] = (outcome, f"cannot read: {exc.strerror}")
                    continue
                report.checksums[f.rel] = digest
            hashed.append(StagedFile(f.rel, f.path, f.size, digest))
    report.hash_seconds = time.monotonic() - t0
    return hashed


def describe_commands(commands: list[CommandResult]) -> str:
    """The rendered commands for the audit trail, with long file lists shortened."""
    parts = []
    for result in commands:
        argv = [os.fsencode(a).decode("utf-8", "backslashreplace") for a in result.argv]
        if len(argv) > 12:
            argv = [*argv[:6], f"... ({len(argv) - 9} more) ...", *argv[-3:]]
        parts.append(" ".join(a if len(a) < 300 else a[:120] + "...(script)" for a in argv))
    return "\n".join(parts)[:8000]
