"""The remote steps of one batch: prepare staging, transfer, verify and commit.

State owned: the endpoint side of this run (its generation, its warm sessions). The formats of
what its programs are given and answer are in :mod:`hdfmgr.replies`.

Staging layout. Each transfer slot of each running instance owns one flat directory in the
endpoint's staging area, ``hdfmgr.<name>.<generation>.<slot>``. Its name contains no data, so
``{dest}`` in a transfer command is always harmless, and it outlives batches, so in the steady
state a batch needs only two commands: the transfer and one remote command that verifies every
staged file and moves the good ones into the endpoint buffer.

Programs on the endpoint. The commit (verify, move, report) and the start-up probe are
readable multi-line POSIX sh programs, files in ``hdfmgr/remote/`` (package data), versioned.
They are never put on a command line: the remote command is the constant one-line
:data:`BOOTSTRAP`, whose only arguments are the program's length, its name and a few words
without data (the slot directory, the verification mode, numbers), each quoted; the program
and then its data follow on stdin, NUL-separated, so no filename is ever parsed by a remote
shell, and a csh-family login shell parses nothing but the bootstrap. The commit's reply says
per file what it verified and what it renamed; "delivered" is read only from a rename it
reports (see hdfmgr/remote/commit.sh for the records and exit statuses).

The slot lock. A commit whose ssh client died (killed, timed out, connection dropped) can go on
running on the endpoint for a while, moving files. A listing of the slot meanwhile would see a
file not yet moved and have it sent again: a second delivery. So the commit program holds
``flock`` on its slot directory (util-linux; the lock is the open directory's, inherited by
every process of the program, so it lasts exactly as long as the program), and LIST_SCRIPT
takes the same lock, waiting at most WAIT seconds, before it lists a slot. The start-up probe
checks that ``flock`` works on staging (it does not on Lustre mounted without ``flock``): the
daemon refuses to start otherwise, and a commit that cannot lock moves nothing.

The fence. The lock cannot make a listing wait for a commit that has not started yet (its
client died while the remote shell was still starting). So a listing, holding the lock, also
writes the highest batch number it is asked about into ``SLOT.fence``, and a commit whose batch
number is not above it does nothing (exit 95): its outcome has been decided without it.

The receipt. When a commit's reply is lost, the listing decides what it did, and "gone from the
slot directory" is no evidence of a move: a tmp cleaner or an operator may have deleted the
staged copy. So the commit program, holding the lock, keeps ``SLOT.receipt``: the batch number,
then per group of names an ``I`` record for each just before its ``mv`` and each name's outcome
(``M`` renamed, or not) after it. It replaces the receipt before it renames anything, and
renames nothing it could not record first. The listing returns the receipt with the slot, and
:func:`recovered` counts a file as moved only on that receipt's evidence for the file's own
batch; a file neither staged nor proven moved is unknown and sent again.

Framed replies. Every reply that is parsed starts with a begin record and ends with an end
record (both contain '/', which no name does). Whatever a chatty login shell prints before or
after is skipped, and a reply cut short (the connection dropped, the command timed out) is
recognised as such: its outcome is unknown, never read as "nothing was moved".
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from . import runner
from .config import Config
from .replies import (
    BEGIN,
    COMMIT_STATUS,
    COMMIT_VERSION,
    END,
    PROBE_VERSION,
    CommitReport,
    Listing,
    Receipt,
    Recovered,
    Requirements,
    StagedFile,
    commit_groups,
    commit_payload,
    framed_records,
    parse_commit_output,
    parse_probe_output,
    parse_receipt,
    recovered,
)
from .runner import CommandResult, Feed
from .session import SessionPool
from .templates import quote_remote

#: Beside each slot directory, the staged copies that failed verification (see commit.sh).
REJECTED = ".rejected"
#: Beside each slot directory, the highest batch number a listing decided (the fence).
FENCE = ".fence"
#: Beside each slot directory, what the slot's latest commit renamed (see commit.sh).
RECEIPT = ".receipt"
#: Beside each slot directory, the last batch the stream's receive unpacked there (receive.sh).
RECEIVED = ".received"
#: Ends a receipt in a listing's reply (see LIST_SCRIPT).
RECEIPT_END = "/hdfmgr-receipt-end/"

#: The programs hdfmgr runs on the endpoint, as files beside this module (package data).
PROGRAM_DIR = Path(__file__).with_name("remote")

#: The constant command line that starts every program: the only text the remote login shell
#: ever parses, one line without '!' (csh-family login shells take it too). Run as ``sh -c
#: BOOTSTRAP hdfmgr LENGTH NAME ARGS...``, it reads exactly LENGTH bytes of stdin (``head -c``
#: reads no further, even from a pipe), refuses a program that arrived shorter (exit 90), and
#: runs it as ``sh -c PROGRAM NAME ARGS...``; the program's own data follows it on the same
#: stdin. Not ``sh -s``: dash reads a script from a pipe in blocks, so a command in it that
#: reads stdin would miss the data the shell already took (tests/test_commit_program.py shows
#: it). A warm session (hdfmgr/session.py) is fed the same length-prefixed programs.
BOOTSTRAP = (
    'p=$(head -c "$1") || exit 90; [ "${#p}" -eq "$1" ] || '
    '{ echo "hdfmgr: program cut short" >&2; exit 90; }; shift; exec sh -c "$p" "$@"'
)

#: What the probe hashes with the endpoint's ``b2sum`` (passed on its stdin).
PROBE_DATA = b"hdfmgr probe\n"


@functools.cache
def program(name: str) -> str:
    """The text of a program in :data:`PROGRAM_DIR`, without trailing newlines (the
    bootstrap's command substitution would drop them, and the length must match)."""
    text = (PROGRAM_DIR / name).read_text(encoding="ascii").rstrip("\n")
    if "\0" in text:
        raise ValueError(f"{name}: a program cannot contain NUL")
    return text


#: Creates a slot directory, and never removes anything: a prepare whose command timed out can
#: still start later, when the slot carries the next batch, and replacing the directory would
#: take that batch's staged copies (sent again for nothing after a lost reply) and the lock a
#: running commit holds on it. Leftovers of a failed batch are the
#: next commit's: strays are deleted, bad copies set aside, both under the slot's lock.
PREPARE_SCRIPT = 'mkdir -p -- "$1"'

#: Run as ``sh -c LIST_SCRIPT hdfmgr WAIT SLOT BATCH SLOT BATCH...``: lists the files left in
#: the given slot directories and set aside beside them (see commit.sh); a directory that
#: exists prints "dir/". The slot's receipt follows, as "dir.receipt/", its records as the
#: commit wrote them, an empty record (which ends a last record cut short) and RECEIPT_END.
#: Each slot is listed once no commit holds its lock, after its fence has
#: been raised to BATCH (unless empty) under that lock (the module's docstring). The daemon starts
#: no commit in a slot it is listing, so no commit of BATCH or before moves a file after that.
#: The filesystem of staging (and of the endpoint buffer) is flushed before anything is read.
LIST_SCRIPT = (
    "W=$1; shift; L=; if command -v flock >/dev/null 2>&1; then L=1; fi; "
    f"printf '\\000{BEGIN}\\000'; "
    'while [ "$#" -ge 2 ]; do d=$1; n=$2; shift 2; if [ -d "$d" ]; then '
    'if [ -n "$L" ]; then (cd "$d" && flock -w "$W" . sh -c '
    f'\'if [ -n "$1" ]; then echo "$1" > "$2{FENCE}"; fi\' hdfmgr "$n" "$d") || '
    '{ echo "hdfmgr: $d: a commit still holds it after $W s (or its fence cannot be written)" >&2; '
    "exit 1; }; "
    f'elif [ -n "$n" ]; then echo "$n" > "$d{FENCE}" || exit 1; fi; '
    # A commit killed between a rename and its flush: what the receipt says it was about to
    # rename is read as moved, so the renames made are put on disk before that is decided.
    'sync -f -- "$d" || exit 1; '
    "printf '%s/\\000' \"$d\"; "
    "find \"$d\" -mindepth 1 -maxdepth 1 -type f -printf '%h/%f\\000' || exit 1; "
    f'if [ -d "$d{REJECTED}" ]; then '
    f"find \"$d{REJECTED}\" -mindepth 1 -maxdepth 1 -type f -printf '%h/%f\\000' || exit 1; fi; "
    f'if [ -f "$d{RECEIPT}" ]; then printf \'%s{RECEIPT}/\\000\' "$d"; cat -- "$d{RECEIPT}" || exit 1; '
    f"printf '\\000{RECEIPT_END}\\000'; fi; "
    "fi; done; "
    f"printf '{END}\\000'"
)

#: Removes this instance's slot directories (and their temporary lists) from earlier runs,
#: then creates the slot directories given after the first three arguments.
SWEEP_SCRIPT = (
    'find "$1" -mindepth 1 -maxdepth 1 -name "$2*" -not -name "$3*" -exec rm -rf -- {} +; '
    'shift 3; if [ "$#" -gt 0 ]; then mkdir -p -- "$@"; fi'
)


class ErrorClass:
    TRANSPORT = "transport"  # ssh could not reach the endpoint (exit 255)
    REMOTE = "remote"  # a command ran and failed
    TIMEOUT = "timeout"  # killed at general.timeout
    VERIFICATION = "verification"  # staged copy differs from the local file
    LOCAL = "local"  # the local file changed, vanished or could not be read
    ENDPOINT = "endpoint"  # the endpoint cannot run the commit (a tool, the lock, a full disk)
    EXISTS = "exists"  # an earlier version still waits in the endpoint buffer: never overwritten


def classify(result: CommandResult) -> str:
    if result.timed_out:
        return ErrorClass.TIMEOUT
    if result.returncode == 255:
        return ErrorClass.TRANSPORT
    return ErrorClass.REMOTE


class EndpointUnfit(RuntimeError):
    """The endpoint lacks what the configured verification needs; ``str()`` is one line."""


class Endpoint:
    """Renders and runs the remote steps for one configured endpoint."""

    def __init__(
        self,
        config: Config,
        *,
        generation: str | None = None,
        run: Callable[..., CommandResult] = runner.run,
        run_fed: Callable[..., CommandResult] = runner.run_fed,
        warm: bool = False,
    ) -> None:
        self.config = config
        self.prefix = f"hdfmgr.{config.name}."
        self.generation = generation or secrets.token_hex(4)
        self._run = run
        self._run_fed = run_fed
        #: Warm sessions (hdfmgr/session.py) for the remote steps, when ``warm``.
        self.sessions: SessionPool | None = None
        if warm:
            loop = program("session.sh")
            self.sessions = SessionPool(
                self.remote_argv(BOOTSTRAP, str(len(loop)), "hdfmgr-session"),
                loop,
                keep=config.num_threads + 1,
                backoff_initial=config.retry_initial,
                backoff_max=config.retry_max,
            )

    def prewarm(self) -> None:
        """Start every slot's warm session now, beside the start-up probe, not each in turn
        before its first batch (a no-op without warm sessions)."""
        if self.sessions is not None:
            self.sessions.prewarm()

    def close(self) -> None:
        """End the warm sessions (their remote shells exit on end of file)."""
        if self.sessions is not None:
            self.sessions.close()

    def _warm_or(
        self,
        script: str,
        args: Sequence[str],
        data: bytes | Feed,
        timeout: float,
        on_start: Callable[[int], None] | None,
        command: Callable[[], CommandResult],
    ) -> CommandResult:
        """The step through a warm session when there is one, else ``command()``: the same
        step as one remote command (``args`` starts with the program's $0)."""
        if self.sessions is None:
            return command()
        result, tried = self.sessions.run(script, args, data, timeout=timeout, on_start=on_start)
        if result is None:
            result = command()
            self.sessions.fell_back(tried, result)
        return result

    @property
    def lock_wait(self) -> str:
        """Seconds a script waits for a slot's lock: half the command's timeout, so that a
        lock still held fails the command with its own message before the timeout kills it."""
        return f"{self.config.timeout / 2:.1f}"

    def slot_dir(self, slot: int) -> str:
        return posixpath.join(self.config.staging, f"{self.prefix}{self.generation}.{slot}")

    def final_dir(self, rel_dir: str) -> str:
        return posixpath.normpath(posixpath.join(self.config.endpoint_buffer, rel_dir))

    def remote_argv(self, script: str, *args: str) -> list[str]:
        command = quote_remote(["sh", "-c", script, "hdfmgr", *args])
        return self.config.remote.render(command=command)

    def remote(
        self,
        script: str,
        *args: str,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> CommandResult:
        return self._warm_or(
            script,
            ["hdfmgr", *args],
            stdin or b"",
            timeout or self.config.timeout,
            on_start,
            lambda: self._run(
                self.remote_argv(script, *args),
                timeout=timeout or self.config.timeout,
                stdin=stdin,
                on_start=on_start,
            ),
        )

    def run_program(
        self,
        name: str,
        *args: str,
        data: bytes | Feed = b"",
        timeout: float | None = None,
        on_start: Callable[[int], None] | None = None,
    ) -> CommandResult:
        """Run a program of :data:`PROGRAM_DIR` through the constant bootstrap command line:
        the program, then ``data``, on stdin (``data`` whole, or as a :class:`Feed` produced
        while it runs: a batch's stream)."""
        text = program(name)
        step = f"hdfmgr-{name.removesuffix('.sh')}"
        timeout = timeout or self.config.timeout
        argv = self.remote_argv(BOOTSTRAP, str(len(text)), step, *args)
        head = text.encode("ascii")

        def command() -> CommandResult:
            if isinstance(data, Feed):
                feed = Feed(len(head) + data.length, _prefixed(head, data))
                return self._run_fed(argv, timeout=timeout, feed=feed, on_start=on_start)
            return self._run(argv, timeout=timeout, stdin=head + data, on_start=on_start)

        return self._warm_or(text, [step, *args], data, timeout, on_start, command)

    def receive(self, slot_dir: str, feed: Feed, *, batch: int) -> CommandResult:
        """The built-in stream transfer: ``feed`` (a tar stream, hdfmgr/stream.py) unpacked
        into ``slot_dir`` by the receive program, unless a later batch than ``batch`` was
        received there already; its deadline grows with the bytes."""
        return self.run_program(
            "receive.sh",
            slot_dir,
            self.lock_wait,
            str(batch),
            data=feed,
            timeout=self.config.deadline(feed.length),
        )

    def requirements(
        self, on_start: Callable[[int], None] | None = None
    ) -> tuple[CommandResult, Requirements | None]:
        """Ask the endpoint, in one command, what the commit needs: the tools, ``b2sum -z``
        (checksum mode), a real ``flock`` on staging, its argument limit."""
        digest = hashlib.blake2b(PROBE_DATA).hexdigest()
        result = self.run_program(
            "probe.sh",
            self.config.staging,
            self.config.verify,
            digest,
            "stream" if self.config.stream else "",
            data=PROBE_DATA,
            timeout=min(self.config.timeout, 60.0),
            on_start=on_start,
        )
        return result, parse_probe_output(result.stdout)

    def probe(self) -> CommandResult:
        """The cheapest proof that the endpoint answers: the remote command running ``true``."""
        timeout = min(self.config.timeout, 60.0)
        return self._warm_or(
            "true",
            ["hdfmgr"],
            b"",
            timeout,
            None,
            lambda: self._run(self.config.remote.render(command="true"), timeout=timeout),
        )

    def prepare(self, slot_dir: str) -> CommandResult:
        return self.remote(PREPARE_SCRIPT, slot_dir)

    def transfer(self, argv: Sequence[str], nbytes: int = 0) -> CommandResult:
        """One transfer command; its deadline grows with the ``nbytes`` it moves."""
        return self._run(list(argv), timeout=self.config.deadline(nbytes))

    def transfer_argvs(self, files: Sequence[StagedFile], slot_dir: str) -> list[list[str]]:
        template = self.config.transfer
        if template.batched:
            return [template.render(files=[f.path for f in files], dest=slot_dir)]
        return [template.render(files=[f.path], dest=slot_dir) for f in files]

    def commit(
        self,
        slot_dir: str,
        final_dir: str | None,
        files: Sequence[StagedFile],
        on_start: Callable[[int], None] | None = None,
        *,
        batch: int | None = None,
    ) -> tuple[CommandResult, CommitReport | None]:
        """Verify the staged ``files`` and move the good ones, in one remote command.

        Each file goes to the endpoint buffer's directory of its own relative directory, or
        all of them to ``final_dir`` when one is given. Basenames must be distinct (they
        share one flat slot directory). The report is None when the reply did not arrive
        whole: then any of the files may or may not have been moved. With ``batch``, the
        script does nothing once a listing of the slot has fenced that batch off.
        """
        groups = [(final_dir, list(files))] if final_dir is not None else commit_groups(files, self.final_dir)
        data, records, plans = commit_payload(groups, self.config.verify, slot_dir)
        result = self.run_program(
            "commit.sh",
            slot_dir,
            self.config.verify,
            self.lock_wait,
            "" if batch is None else str(batch),
            str(records),
            str(plans),
            data=data,
            on_start=on_start,
            # A checksum verification reads every staged byte.
            timeout=self.config.deadline(sum(f.size for f in files))
            if self.config.verify == "checksum"
            else None,
        )
        return result, parse_commit_output(result.stdout)

    def list_slots(
        self,
        slot_dirs: Sequence[str],
        on_start: Callable[[int], None] | None = None,
        *,
        fences: Mapping[str, int] | None = None,
    ) -> tuple[CommandResult, Listing | None]:
        """Files left in ``slot_dirs`` (or set aside beside them: not moved either), and each
        slot's receipt (``Listing.receipts``); a directory missing from the answer does not
        exist. ``fences``: per slot directory, the highest batch whose outcome this listing
        decides; no commit of it or before moves a file (or touches its receipt) after this
        listing. Absence from a slot is no evidence of a move: see :func:`recovered`."""
        fences = fences or {}
        pairs = [arg for d in slot_dirs for arg in (d, str(fences.get(d, "")))]
        result = self.remote(LIST_SCRIPT, self.lock_wait, *pairs, on_start=on_start)
        records = framed_records(result.stdout) if result.ok else None
        if records is None:
            return result, None
        present = Listing()
        receipt_of: str | None = None
        receipt: list[bytes] = []
        for record in records:
            if receipt_of is not None:
                if record != RECEIPT_END.encode():
                    receipt.append(record)
                    continue
                # The last record is the empty one after the file's final NUL, or a record the
                # commit could not finish writing: neither names a rename.
                present.receipts[receipt_of] = parse_receipt(receipt[:-1])
                receipt_of, receipt = None, []
                continue
            if not record:
                continue
            text = os.fsdecode(record)
            if text.endswith(RECEIPT + "/") and text[: -len(RECEIPT) - 1] in slot_dirs:
                receipt_of = text[: -len(RECEIPT) - 1]
                continue
            if text.endswith("/"):
                present.setdefault(text[:-1], set())
            else:
                directory, name = text.rsplit("/", 1)
                if directory.endswith(REJECTED) and directory not in slot_dirs:
                    directory = directory.removesuffix(REJECTED)  # not moved: still to send
                present.setdefault(directory, set()).add(name)
        if receipt_of is not None:
            return result, None  # a receipt without its end: the reply is not whole
        return result, present

    def sweep(
        self, create: Sequence[str] = (), on_start: Callable[[int], None] | None = None
    ) -> CommandResult:
        """Remove this instance's slot directories left by earlier runs; create ``create``.

        At start-up this one command also prepares every slot, so that no first batch needs
        a remote command of its own for that.
        """
        return self.remote(
            SWEEP_SCRIPT,
            self.config.staging,
            self.prefix,
            f"{self.prefix}{self.generation}.",
            *create,
            on_start=on_start,
        )


def _prefixed(head: bytes, feed: Feed) -> Iterator[bytes]:
    yield head
    yield from feed.exact()


#: What other modules take from here; the reply formats live in hdfmgr/replies.py.
__all__ = [
    "BEGIN",
    "BOOTSTRAP",
    "COMMIT_STATUS",
    "COMMIT_VERSION",
    "END",
    "FENCE",
    "PROBE_VERSION",
    "RECEIPT",
    "RECEIVED",
    "REJECTED",
    "CommitReport",
    "Endpoint",
    "EndpointUnfit",
    "ErrorClass",
    "Listing",
    "Receipt",
    "Recovered",
    "Requirements",
    "StagedFile",
    "classify",
    "commit_groups",
    "commit_payload",
    "framed_records",
    "parse_commit_output",
    "parse_probe_output",
    "parse_receipt",
    "program",
    "recovered",
]
