"""What the endpoint's programs are given and what they answer, read as evidence.

State owned: none; pure parsing and building, tested without an endpoint. The commit's input
(one expected record per file, the plan of renames, the slot directory as its end mark), its
framed reply (per file: verified, renamed, left, gone), a slot's receipt and what a listing
proves with it (:func:`recovered`: "moved" only on the receipt's evidence, never because a copy
is gone from staging), and the start-up probe's findings. :mod:`hdfmgr.endpoint` runs the
programs; this module decides what their bytes mean.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: The records that frame a parsed reply (see the module's docstring). No name contains '/'.
BEGIN = "/hdfmgr-begin/"
END = "/hdfmgr-end/"
#: The commit program's version; its reply must name it (see hdfmgr/remote/commit.sh).
COMMIT_VERSION = "3"
#: The start-up probe's version (see hdfmgr/remote/probe.sh).
PROBE_VERSION = "3"


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


#: Commit exit statuses (hdfmgr/remote/commit.sh) and what each means, for the error line.
COMMIT_STATUS = {
    88: "a final directory could not be flushed to disk after its rename (those files are sent again)",
    89: (
        "the staged copies cannot be flushed to disk (sync missing, without file arguments, or failing),"
        " or a new final directory cannot be flushed"
    ),
    90: "the commit program arrived cut short",
    91: "the commit program was started wrongly",
    92: "the slot's lock cannot be taken on staging (flock missing or failing)",
    93: "the slot is still locked by an earlier commit or a listing",
    94: "staging cannot be written (full, read-only or an I/O error)",
    95: "fenced off: a listing already decided this batch",
    96: "the commit input arrived cut short",
    97: "the slot directory is missing",
    98: "a verification tool failed on the endpoint",
    99: "the move step broke off",
}


@dataclass
class CommitReport:
    """What the commit program says it did, per file (see hdfmgr/remote/commit.sh).

    Only ``moved`` is evidence of a delivery. ``aborted`` (status, reason): the program
    stopped before renaming anything. A verified name in none of the per-file sets is
    unknown (the move step broke off)."""

    version: str = ""
    verified: set[str] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)
    exists: set[str] = field(default_factory=set)
    gone: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    unsure: set[str] = field(default_factory=set)
    aborted: tuple[int, str] | None = None

    @property
    def committed(self) -> set[str]:
        return self.moved

    @property
    def remaining(self) -> set[str]:
        """Verified names the program left in staging (not renamed)."""
        return self.exists | self.failed

    @property
    def unreported(self) -> set[str]:
        """Verified names the reply gives no outcome for: any of them may have been moved."""
        return self.verified - self.moved - self.exists - self.gone - self.failed - self.unsure


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
    """Read the program's framed reply; None when it is incomplete or not this version's."""
    records = framed_records(stdout)
    if not records or records[0] != b"V" + COMMIT_VERSION.encode():
        return None
    report = CommitReport(version=COMMIT_VERSION)
    sets = {
        ord("K"): report.verified,
        ord("M"): report.moved,
        ord("E"): report.exists,
        ord("G"): report.gone,
        ord("F"): report.failed,
        ord("U"): report.unsure,
    }
    for record in records[1:]:
        if not record:
            continue
        kind, text = record[0], record[1:]
        if kind == ord("X"):
            status, _, reason = os.fsdecode(text).partition(" ")
            report.aborted = (int(status) if status.isdigit() else -1, reason)
        elif kind in sets:
            sets[kind].add(os.fsdecode(text))
        else:
            return None
    return report


def commit_groups(
    files: Sequence[StagedFile], final_dir: Callable[[str], str]
) -> list[tuple[str, list[StagedFile]]]:
    """The batch's files by final directory, in first-seen order."""
    groups: dict[str, list[StagedFile]] = {}
    for f in files:
        groups.setdefault(final_dir(os.path.dirname(f.rel)), []).append(f)
    return list(groups.items())


def commit_payload(
    groups: Sequence[tuple[str, Sequence[StagedFile]]], mode: str, slot_dir: str
) -> tuple[bytes, int, int]:
    """The commit program's data, and how many expected and plan records it holds.

    First one record per file, what the program's listing of staging shows for a good copy
    (``<size>/<name>`` or ``<b2sum>  <name>``), all sorted bytewise as ``LC_ALL=C sort -z``
    sorts, so that ``comm`` takes them as they are (basenames are distinct in a batch). Then
    the plan, ``<name>/<final directory>`` per file, and last the slot directory with a '/'
    appended: the program checks that it came whole.
    """
    records = []
    plan = []
    for final, files in groups:
        for f in files:
            name = os.fsencode(f.basename)
            plan.append(name + b"/" + os.fsencode(final))
            if mode == "checksum":
                if f.checksum is None:
                    raise ValueError(f"no checksum for {f.rel!r}")
                records.append(f.checksum.encode("ascii") + b"  " + name)
            else:
                records.append(str(f.size).encode("ascii") + b"/" + name)
    records.sort()
    data = b"\0".join([*records, *plan, os.fsencode(slot_dir) + b"/"]) + b"\0"
    return data, len(records), len(plan)


@dataclass(frozen=True)
class Receipt:
    """What a slot's receipt says (hdfmgr/remote/commit.sh): the batch of the latest commit of
    the slot, the names it renamed into the endpoint buffer (``moved``), the names it was about
    to rename (``intended``, written just before their ``mv``) and the names whose outcome it
    wrote after that ``mv`` (``settled``, moved or not)."""

    batch: int | None
    moved: frozenset[str] = frozenset()
    intended: frozenset[str] = frozenset()
    settled: frozenset[str] = frozenset()


class Listing(dict[str, set[str]]):
    """The files per slot directory that a listing found (a directory missing from it does not
    exist), and the receipt it found beside each slot (:class:`Receipt`)."""

    def __init__(self) -> None:
        super().__init__()
        self.receipts: dict[str, Receipt] = {}


@dataclass
class Recovered:
    """What a listing proves about files whose commit may have run (:func:`recovered`)."""

    moved: list[str] = field(default_factory=list)
    resend: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def parse_receipt(records: Sequence[bytes]) -> Receipt:
    """A receipt from its records: the batch number, then ``I``, ``M``, ``E``, ``F`` or
    ``U`` and a name each. Anything else makes the receipt prove nothing."""
    if not records or not records[0].isdigit():
        return Receipt(None)
    moved, intended, settled = set(), set(), set()
    for record in records[1:]:
        kind, name = record[:1], os.fsdecode(record[1:])
        if kind == b"I":
            intended.add(name)
        elif kind in (b"M", b"E", b"F", b"U"):
            settled.add(name)
            if kind == b"M":
                moved.add(name)
        else:
            return Receipt(None)
    return Receipt(int(records[0]), frozenset(moved), frozenset(intended), frozenset(settled))


def recovered(
    entries: Sequence[tuple[str, int]], names: set[str] | None, receipt: Receipt | None
) -> Recovered:
    """Decide, for the ``(rel, batch)`` entries of one slot whose commit's reply was lost,
    what the listing of the slot (``names``, None if the slot directory is missing) and its
    receipt prove.

    Moved only on the evidence of the receipt of the file's own batch: its ``M`` record (the
    commit renamed it), or its ``I`` record with no outcome after it while the copy is gone
    from staging (the commit was killed inside that name's ``mv``, which had taken it). A copy
    still staged (or set aside) was not moved: sent again. A copy gone from staging without
    such evidence was deleted there by someone else (a tmp cleaner, an operator), or its
    commit never ran or was fenced off: ``unknown``, sent again, so a duplicate is possible,
    never a loss.
    """
    out = Recovered()
    for rel, batch in entries:
        name = os.path.basename(rel)
        own = receipt if receipt is not None and receipt.batch == batch else Receipt(None)
        staged = names is not None and name in names
        killed_in_mv = name in own.intended and name not in own.settled
        if name in own.moved or (killed_in_mv and names is not None and not staged):
            out.moved.append(rel)
            continue
        out.resend.append(rel)
        if not staged:
            out.unknown.append(rel)
    return out


@dataclass(frozen=True)
class Requirements:
    """What the start-up probe found on the endpoint (hdfmgr/remote/probe.sh)."""

    arg_max: int | None = None
    missing: tuple[str, ...] = ()
    b2sum: str = "not checked"
    flock: str = "not checked"
    #: ``sync -- FILE`` flushes the named file (the commit flushes what it renames with it).
    sync: str = "not checked"
    #: GNU tar, asked for only when the stream transfer is configured (the receive program).
    tar: str = "not checked"

    def problems(self, mode: str) -> list[str]:
        """What keeps the endpoint from running the commit in ``mode``; empty when nothing."""
        out = []
        if self.missing:
            out.append("not found on the remote PATH: " + " ".join(self.missing))
        if mode == "checksum" and self.b2sum != "ok" and "b2sum" not in self.missing:
            out.append(f"b2sum -z does not work ({self.b2sum})")
        if self.flock != "ok" and "flock" not in self.missing:
            out.append(f"flock does not work on staging ({self.flock})")
        if self.sync != "ok" and "sync" not in self.missing:
            out.append(f"sync -- FILE does not work ({self.sync})")
        if self.tar not in ("ok", "not checked", "missing"):
            out.append(f"tar cannot unpack the stream transfer ({self.tar})")
        return out


def parse_probe_output(stdout: bytes) -> Requirements | None:
    """Read the probe's framed ``key=value`` records; None when the reply is incomplete."""
    records = framed_records(stdout)
    if not records or records[0] != b"version=" + PROBE_VERSION.encode():
        return None
    arg_max: int | None = None
    missing: list[str] = []
    values = {"b2sum": "not checked", "flock": "not checked", "sync": "not checked", "tar": "not checked"}
    for record in records[1:]:
        key, _, value = os.fsdecode(record).partition("=")
        if key == "arg_max":
            arg_max = int(value) if value.isdigit() else None
        elif key == "missing":
            missing.append(value)
        elif key in values:
            values[key] = value
    return Requirements(
        arg_max, tuple(missing), values["b2sum"], values["flock"], values["sync"], values["tar"]
    )
