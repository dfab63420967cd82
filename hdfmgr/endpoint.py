"""The remote steps of one batch: prepare staging, transfer, verify and commit.

Staging layout. Each transfer slot of each running instance owns one flat directory in the
endpoint's staging area, ``hdfmgr.<name>.<generation>.<slot>``. Its name contains no data, so
``{dest}`` in a transfer command is always harmless, and it outlives batches, so in the steady
state a batch needs only two commands: the transfer and one remote command that verifies every
staged file and moves the good ones into the endpoint buffer.

Commit script. The remote command is a constant POSIX sh script run as ``sh -c SCRIPT``; the
only arguments on its command line are the slot directory, the verification mode, two numbers
and a second constant script. The data (the expected ``size/name`` or ``b2sum`` records and
the final directories) travels NUL-separated on stdin and reaches that second script through
``xargs -0`` as arguments, so no filename is ever parsed by a remote shell. The script prints
the names it verified, a ``/`` record, and the names still in staging.

Framed replies. Every reply that is parsed starts with a begin record and ends with an end
record (both contain '/', which no name does). Whatever a chatty login shell prints before or
after is skipped, and a reply cut short (the connection dropped, the command timed out) is
recognised as such: its outcome is unknown, never read as "nothing was moved".
"""

from __future__ import annotations

import os
import posixpath
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from . import runner
from .config import Config
from .runner import CommandResult
from .templates import quote_remote

#: The records that frame a parsed reply (see the module's docstring). No name contains '/'.
BEGIN = "/hdfmgr-begin/"
END = "/hdfmgr-end/"
#: Beside each slot directory, the staged copies that failed verification (see MOVE_SCRIPT).
REJECTED = ".rejected"
#: Beside each slot directory, the highest batch number a listing decided (see COMMIT_SCRIPT).
FENCE = ".fence"

#: Both scripts are one line (a tcsh login shell cannot take a newline inside quotes) and
#: have no '!' (history expansion).
#:
#: COMMIT_SCRIPT, run as ``sh -c COMMIT_SCRIPT hdfmgr SLOT MODE NREC SIZE MOVE_SCRIPT NARG
#: WAIT BATCH``, hands the NUL-separated stdin to MOVE_SCRIPT as arguments through ONE
#: ``xargs -0 -x`` (``-x``: all of them or nothing, never a second, partial invocation).
#: Arguments are never parsed by a shell, so the names need no quoting, and the moves need one
#: ``mv`` per final directory, not a pipeline of filters per directory: a batch costs about a
#: dozen processes on the endpoint whatever its size.
#:
#: The slot lock. A commit whose ssh client died (killed, timed out, connection dropped) can
#: go on running on the endpoint for a while, moving files. A listing of the slot meanwhile
#: would see a file not yet moved and have it sent again: a second delivery. So the commit
#: runs under ``flock`` on its slot directory (util-linux; the lock is the open directory's,
#: inherited by every process of the script, so it lasts exactly as long as the script), and
#: LIST_SCRIPT takes the same lock, waiting at most WAIT seconds, before it lists a slot.
#: Without ``flock`` on the endpoint both run unlocked (``hdfmgr doctor`` reports it).
#:
#: The fence. The lock cannot make a listing wait for a commit that has not started yet (its
#: client died while the remote shell was still starting). So a listing, holding the lock,
#: also writes the highest batch number it is asked about into ``SLOT.fence``, and a commit
#: whose batch number is not above it does nothing (exit 95, which xargs reports as 123): its
#: outcome has been decided without it.
COMMIT_SCRIPT = (
    'cd "$1" || exit 97; L=; if command -v flock >/dev/null 2>&1; then L="flock -w $7 ."; fi; '
    'exec $L xargs -0 -x -s "$4" sh -c "$5" hdfmgr "$1" "$2" "$3" "$6" "$8"'
)

#: Arguments: the slot directory, the mode, the number of records, the number of arguments
#: that follow the batch number, the batch number (empty: no fence check), then the records,
#: the plan and a last argument, the slot directory with a '/' appended. Records (NREC of
#: them, sorted bytewise as ``LC_ALL=C sort -z`` sorts): what the listing of a good staged
#: copy shows, ``<size>/<name>`` or ``<b2sum>  <name>``. The plan:
#: each final directory with a '/' appended (a name never contains '/'), then the names that
#: go there.
#:
#: Input cut short. When the connection drops (or the daemon dies) while stdin is on its way,
#: xargs sees end-of-file early and runs the script on what came: a cut record would make its
#: file a stray (deleted, then taken for delivered by the listing that follows), a cut name a
#: prefix of another file's name. So the script first checks that it got every argument and
#: that the last one is whole, and does nothing otherwise (exit 96). A cut stream can pass
#: neither check: it has fewer arguments, or the same number with a shorter last one.
#:
#: Staged files that match no record are deleted when no record names them (strays), and set
#: aside in ``SLOT.rejected`` when one does (a partial or corrupt copy of a file of the batch;
#: emptied first, since an earlier batch of the slot has its outcome by now): a listing after a
#: lost reply reads "gone from the slot" as "moved into the endpoint buffer", and counts what
#: it finds set aside as still to send. One ``mkdir -p`` creates the missing directories and
#: each directory gets one ``mv`` of its planned names that are still there (the last argument
#: reads as the slot directory itself: nothing to create, nothing to move). ``eval`` only ever
#: sees argument numbers. Output, between the BEGIN and END records: the verified names, a
#: ``/`` record, the names still in staging (END only once all of it is written); the exit
#: status is not 0 when a mkdir or mv failed.
MOVE_SCRIPT = "; ".join(
    [
        r's=$1; m=$2; c=$3; a=$4; i=$5; shift 5; eval "z=\${$#}"',
        'if [ "$#" -eq "$a" ] && [ "$z" = "$s/" ]; then :; else'
        ' echo "hdfmgr: commit input cut short: $# of $a arguments" >&2; exit 96; fi',
        f'if [ -n "$i" ] && [ -f "$s{FENCE}" ] && read f < "$s{FENCE}" && [ "$f" -ge "$i" ]; then'
        ' echo "hdfmgr: batch $i: too late, its slot was listed for batch $f" >&2; exit 95; fi',
        f"w=$s.want; h=$s.have; k=$s.ok; b=$s.bad; u=$s.wn; v=$s.bn; q=$s{REJECTED}; B={BEGIN}; E={END}",
        'rm -rf -- "$q"',
        'printf \'%s\\000\' "$@" > "$b"; LC_ALL=C head -z -n "$c" "$b" > "$w"; shift "$c"',
        "if [ \"$m\" = checksum ]; then find . -mindepth 1 -maxdepth 1 -type f -printf '%f\\000'"
        ' | xargs -0r b2sum -z -- | LC_ALL=C sort -z > "$h"'
        "; else find . -mindepth 1 -maxdepth 1 -type f -printf '%s/%f\\000' | LC_ALL=C sort -z > \"$h\"; fi",
        'names() { if [ "$m" = checksum ]; then LC_ALL=C cut -z -b 131- "$1"; '
        'else LC_ALL=C cut -z -d/ -f 2- "$1"; fi; }',
        'LC_ALL=C comm -z -23 "$h" "$w" > "$b"',
        'if [ -s "$b" ]; then names "$w" | LC_ALL=C sort -z > "$u"; names "$b" | LC_ALL=C sort -z > "$v"',
        'LC_ALL=C comm -z -23 "$v" "$u" | xargs -0r rm -f --; LC_ALL=C comm -z -12 "$v" "$u" > "$b"',
        'if [ -s "$b" ] && mkdir -- "$q"; then xargs -0r mv -f -t "$q" -- < "$b"; fi; fi',
        'LC_ALL=C comm -z -12 "$w" "$h" > "$k"',
        "r=0; j=0; n=",
        "for x do j=$((j+1)); case $x in */) "
        r'if [ -d "$x" ]; then :; else n="$n \"\${$j}\""; fi ;; esac; done',
        r'if [ -n "$n" ]; then eval "mkdir -p --$n" || r=98; fi',
        "j=0; t=; l=",
        "for x do j=$((j+1)); case $x in */) "
        r'if [ -n "$l" ]; then eval "mv -f -t \"\$t\" --$l" || r=1; fi; '
        r't=$x; l=; if [ -d "$t" ]; then :; else t=; fi ;; '
        r'*) if [ -n "$t" ] && [ -f "./$x" ]; then l="$l \"\${$j}\""; fi ;; esac; done',
        r'if [ -n "$l" ]; then eval "mv -f -t \"\$t\" --$l" || r=1; fi',
        "printf '\\000%s\\000' \"$B\"; names \"$k\" && printf '/\\000' &&"
        " find . -mindepth 1 -maxdepth 1 -type f -printf '%f\\000' && printf '%s\\000' \"$E\"",
        'rm -f -- "$w" "$h" "$k" "$b" "$u" "$v"',
        "exit $r",
    ]
)

PREPARE_SCRIPT = 'if [ "$2" = clean ]; then rm -rf -- "$1" || exit 1; fi; mkdir -p -- "$1"'

#: Run as ``sh -c LIST_SCRIPT hdfmgr WAIT SLOT BATCH SLOT BATCH...``: lists the files left in
#: the given slot directories and set aside beside them (see MOVE_SCRIPT); a directory that
#: exists prints "dir/". Each slot is listed once no commit holds its lock, after its fence has
#: been raised to BATCH (unless empty) under that lock (see COMMIT_SCRIPT). The daemon starts
#: no commit in a slot it is listing, so no commit of BATCH or before moves a file after that.
LIST_SCRIPT = (
    "W=$1; shift; L=; if command -v flock >/dev/null 2>&1; then L=1; fi; "
    f"printf '\\000{BEGIN}\\000'; "
    'while [ "$#" -ge 2 ]; do d=$1; n=$2; shift 2; if [ -d "$d" ]; then '
    'if [ -n "$L" ]; then (cd "$d" && flock -w "$W" . sh -c '
    f'\'if [ -n "$1" ]; then echo "$1" > "$2{FENCE}"; fi\' hdfmgr "$n" "$d") || '
    '{ echo "hdfmgr: $d: a commit still holds it after $W s (or its fence cannot be written)" >&2; '
    "exit 1; }; "
    f'elif [ -n "$n" ]; then echo "$n" > "$d{FENCE}" || exit 1; fi; '
    "printf '%s/\\000' \"$d\"; "
    "find \"$d\" -mindepth 1 -maxdepth 1 -type f -printf '%h/%f\\000' || exit 1; "
    f'if [ -d "$d{REJECTED}" ]; then '
    f"find \"$d{REJECTED}\" -mindepth 1 -maxdepth 1 -type f -printf '%h/%f\\000' || exit 1; fi; "
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


def classify(result: CommandResult) -> str:
    if result.timed_out:
        return ErrorClass.TIMEOUT
    if result.returncode == 255:
        return ErrorClass.TRANSPORT
    return ErrorClass.REMOTE


@dataclass(frozen=True)
class StagedFile:
    """A file of a batch as the endpoint should receive it."""

    rel: str
    path: str  # absolute local path
    size: int
    checksum: str | None = None

    @property
    def basename(self) -> str:
        return os.path.basename(self.rel)


@dataclass
class CommitReport:
    verified: set[str] = field(default_factory=set)
    remaining: set[str] = field(default_factory=set)

    @property
    def committed(self) -> set[str]:
        return self.verified - self.remaining


def framed_records(stdout: bytes) -> list[bytes] | None:
    """The NUL-separated records between the begin and end records; None if either is missing."""
    records = stdout.split(b"\0")
    try:
        start = records.index(BEGIN.encode())
        end = records.index(END.encode(), start + 1)
    except ValueError:
        return None
    return records[start + 1 : end]


def parse_commit_output(stdout: bytes) -> CommitReport | None:
    """Read the script's framed ``names / names`` listing; None when the reply is incomplete."""
    records = framed_records(stdout)
    if records is None:
        return None
    report = CommitReport()
    target = report.verified
    for record in records:
        if record == b"/":
            target = report.remaining
        elif record:
            target.add(os.fsdecode(record))
    return report


def commit_groups(
    files: Sequence[StagedFile], final_dir: Callable[[str], str]
) -> list[tuple[str, list[StagedFile]]]:
    """The batch's files by final directory, in first-seen order."""
    groups: dict[str, list[StagedFile]] = {}
    for f in files:
        groups.setdefault(final_dir(os.path.dirname(f.rel)), []).append(f)
    return list(groups.items())


def commit_payload(groups: Sequence[tuple[str, Sequence[StagedFile]]], mode: str) -> tuple[bytes, int]:
    """The stdin of the commit script and how many records it starts with.

    First one record per file, what the script's listing of staging shows for a good copy
    (``<size>/<name>`` or ``<b2sum>  <name>``), all sorted bytewise as ``LC_ALL=C sort -z``
    sorts, so that ``comm`` takes them as they are (basenames are distinct in a batch). Then
    the plan: each final directory with a '/' appended, followed by its names.
    """
    records = []
    plan = []
    for final, files in groups:
        plan.append(os.fsencode(final) + b"/")
        for f in files:
            name = os.fsencode(f.basename)
            plan.append(name)
            if mode == "checksum":
                if f.checksum is None:
                    raise ValueError(f"no checksum for {f.rel!r}")
                records.append(f.checksum.encode("ascii") + b"  " + name)
            else:
                records.append(str(f.size).encode("ascii") + b"/" + name)
    records.sort()
    return b"\0".join([*records, *plan]) + b"\0", len(records)


def commit_stdin(slot_dir: str, payload: bytes) -> tuple[bytes, int]:
    """The payload, then the last argument MOVE_SCRIPT checks; and how many arguments in all."""
    data = payload + os.fsencode(slot_dir) + b"/\0"
    return data, data.count(b"\0")


class Endpoint:
    """Renders and runs the remote steps for one configured endpoint."""

    def __init__(
        self,
        config: Config,
        *,
        generation: str | None = None,
        run: Callable[..., CommandResult] = runner.run,
    ) -> None:
        self.config = config
        self.prefix = f"hdfmgr.{config.name}."
        self.generation = generation or secrets.token_hex(4)
        self._run = run

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
        return self._run(
            self.remote_argv(script, *args),
            timeout=timeout or self.config.timeout,
            stdin=stdin,
            on_start=on_start,
        )

    def probe(self) -> CommandResult:
        """The cheapest proof that the endpoint answers: the remote command running ``true``."""
        return self._run(self.config.remote.render(command="true"), timeout=min(self.config.timeout, 60.0))

    def prepare(self, slot_dir: str, *, clean: bool) -> CommandResult:
        return self.remote(PREPARE_SCRIPT, slot_dir, "clean" if clean else "keep")

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
        payload, count = commit_payload(groups, self.config.verify)
        stdin, arguments = commit_stdin(slot_dir, payload)
        # xargs's -s: the whole command line it builds, arguments and NULs, with room to spare.
        size = len(stdin) + len(MOVE_SCRIPT) + len(slot_dir) + 4096
        result = self.remote(
            COMMIT_SCRIPT,
            slot_dir,
            self.config.verify,
            str(count),
            str(size),
            MOVE_SCRIPT,
            str(arguments),
            self.lock_wait,
            "" if batch is None else str(batch),
            stdin=stdin,
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
    ) -> tuple[CommandResult, dict[str, set[str]] | None]:
        """Files left in ``slot_dirs`` (or set aside beside them: not moved either); a directory
        missing from the answer does not exist. ``fences``: per slot directory, the highest
        batch whose outcome this listing decides; no commit of it or before moves a file
        after this listing."""
        fences = fences or {}
        pairs = [arg for d in slot_dirs for arg in (d, str(fences.get(d, "")))]
        result = self.remote(LIST_SCRIPT, self.lock_wait, *pairs, on_start=on_start)
        records = framed_records(result.stdout) if result.ok else None
        if records is None:
            return result, None
        present: dict[str, set[str]] = {}
        for record in records:
            if not record:
                continue
            text = os.fsdecode(record)
            if text.endswith("/"):
                present.setdefault(text[:-1], set())
            else:
                directory, name = text.rsplit("/", 1)
                if directory.endswith(REJECTED) and directory not in slot_dirs:
                    directory = directory.removesuffix(REJECTED)  # not moved: still to send
                present.setdefault(directory, set()).add(name)
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
