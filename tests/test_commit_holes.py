"""The commit program under hostile conditions, against a LOCAL endpoint.

Each test injects one failure the endpoint can throw at the commit (a full staging
filesystem, a missing or failing ``b2sum``, a file that vanishes before the rename, a final
name that already exists, a low argument limit, a ``flock`` that fails) and asserts what
lands in the endpoint buffer and what the daemon is told. Tools are faked by putting a
directory first on the remote PATH (the remote template is ``env PATH=... sh -c``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hdfmgr.deliver import COMMITTED, BatchJob, BatchReport, deliver
from hdfmgr.detect import snapshot
from hdfmgr.endpoint import StagedFile
from hdfmgr.replies import recovered
from tests.test_endpoint_script import Site, stage

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def fake_tools(root: Path, tools: dict[str, str], *, hide: tuple[str, ...] = ()) -> Path:
    """A directory of tools: the system's (minus ``hide``), some replaced by sh scripts."""
    bin_dir = root / "fakebin"
    bin_dir.mkdir()
    if hide:
        for d in reversed(SYSTEM_PATH.split(":")):
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name not in hide and not (bin_dir / name).exists():
                    (bin_dir / name).symlink_to(os.path.join(d, name))
    for name, body in tools.items():
        path = bin_dir / name
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    return bin_dir


def faked_site(root: Path, bin_dir: Path, *, verify: str = "size") -> Site:
    path = str(bin_dir) if (bin_dir / "sh").exists() else f"{bin_dir}:{SYSTEM_PATH}"
    return Site(root, verify=verify, remote=f'env PATH={path} sh -c "{{command}}"')


def job_for(site: Site, slot: str, files: list[StagedFile], batch: int = 1) -> BatchJob:
    snaps = {f.rel: snapshot(f.path) for f in files}
    return BatchJob(batch, 0, slot, files, snaps, prepare=False)  # type: ignore[arg-type]


def run_batch(site: Site, slot: str, files: list[StagedFile]) -> BatchReport:
    """The worker's steps after the transfer (the copies are staged by hand): verify, commit."""
    endpoint = site.endpoint
    endpoint.transfer_argvs = lambda files, slot_dir: []  # type: ignore[method-assign]
    return deliver(job_for(site, slot, files), endpoint, lambda *a: True)


def endpoint_files(site: Site) -> dict[str, bytes]:
    out = {}
    for p in site.ep_buffer.rglob("*"):
        if p.is_file():
            out[str(p.relative_to(site.ep_buffer))] = p.read_bytes()
    return out


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the endpoint's staging and buffer, easy to fill."""
    mnt = tmp_path / "ep"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --------------------------------------------------------------------------- hole 1


def test_hole1_full_staging_and_a_silently_truncated_copy_moves_nothing(
    tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging full (no list can be written) and a 100-byte fragment of a 1000-byte file."""
    monkeypatch.chdir(tmp_path)
    site = Site(small_fs)
    slot = site.slot()
    good = site.local("d/good.fits", b"g" * 500)
    cut = site.local("d/cut.fits", b"c" * 1000)
    stage(slot, good.basename, b"g" * 500)
    stage(slot, cut.basename, b"c" * 100)  # the transfer tool truncated it and said nothing
    fd = os.open(small_fs / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    report = run_batch(site, slot, [good, cut])
    assert "d/cut.fits" not in endpoint_files(site), "an unverified fragment was moved"
    assert report.outcomes.get("d/cut.fits", ("",))[0] != COMMITTED
    # Nothing can be listed, so nothing is moved at all, and the daemon is told so.
    assert endpoint_files(site) == {}
    assert report.unknown == []
    assert report.error_class == "endpoint"
    assert [p.name for p in site.staging.iterdir() if ".tmp." in p.name] == []  # lists removed


@pytest.mark.parametrize(
    "b2sum",
    [
        None,  # missing
        'echo "b2sum: $3: Input/output error" >&2; exit 1',  # EIO
        "echo \"b2sum: invalid option -- 'z'\" >&2; exit 1",  # without -z (coreutils < 8.26)
        "exit 0",  # prints nothing at all
    ],
    ids=["missing", "eio", "no-z", "silent"],
)
def test_hole1_checksum_mode_without_a_working_b2sum_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, b2sum: str | None
) -> None:
    monkeypatch.chdir(tmp_path)
    if b2sum is None:
        bin_dir = fake_tools(tmp_path, {}, hide=("b2sum",))
    else:
        bin_dir = fake_tools(tmp_path, {"b2sum": b2sum})
    site = faked_site(tmp_path / "site", bin_dir, verify="checksum")
    slot = site.slot()
    good = site.local("a.fits", b"good data")
    bad = site.local("b.fits", b"BAD-data!")
    stage(slot, good.basename, b"good data")
    stage(slot, bad.basename, b"bad data!")  # same size, other content
    report = run_batch(site, slot, [good, bad])
    assert endpoint_files(site) == {}, "unverified copies were moved"
    assert report.unknown == []
    assert report.error_class == "endpoint"
    assert "b2sum" in (report.error or "")


#: Every other tool the commit program runs before its first rename, failing with an I/O
#: error, and the words of the reason it gives (``cat`` stores the input, ``cmp`` checks it
#: whole, the first ``xargs`` deletes strays).
FAILING_STEPS = {
    "find": "find failed",
    "sort": "sort failed",
    "comm": "comm failed",
    "cut": "cut failed",
    "join": "join failed",
    "xargs": "cannot delete strays",
    "cat": "cannot store the commit input",
    "cmp": "commit input cut short",
}


@pytest.mark.parametrize("tool", sorted(FAILING_STEPS))
def test_hole1_any_failing_step_before_the_rename_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str
) -> None:
    """Not only b2sum: whichever step fails (find, sort, comm, join, ...), nothing is moved,
    the daemon is told which step and the error class, and no file is left unknown."""
    monkeypatch.chdir(tmp_path)
    bin_dir = fake_tools(tmp_path, {tool: f'echo "{tool}: Input/output error" >&2; exit 1'})
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    good = site.local("d/good.fits", b"g" * 50)
    cut = site.local("d/cut.fits", b"c" * 100)
    stage(slot, good.basename, b"g" * 50)
    stage(slot, cut.basename, b"c" * 10)  # a fragment
    report = run_batch(site, slot, [good, cut])
    assert endpoint_files(site) == {}, f"a commit whose {tool} failed moved files"
    assert report.committed() == [] and report.unknown == []
    assert report.error_class == "endpoint"
    assert FAILING_STEPS[tool] in (report.error or ""), report.error
    # The good copy is still staged; the fragment too, or set aside beside the slot.
    rejected = slot + ".rejected"
    aside = os.listdir(rejected) if os.path.isdir(rejected) else []
    assert sorted(os.listdir(slot) + aside) == ["cut.fits", "good.fits"]
    assert "good.fits" in os.listdir(slot)


# --------------------------------------------------------------------------- hole 2


def test_hole2_a_file_vanished_before_the_rename_is_not_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Something deletes one staged copy right before ``mv`` runs: it must be sent again."""
    monkeypatch.chdir(tmp_path)
    real_mv = "/usr/bin/mv" if os.path.exists("/usr/bin/mv") else "/bin/mv"
    bin_dir = fake_tools(tmp_path, {"mv": f'rm -f ./b.fits; exec {real_mv} "$@"'})
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode() * 10) for n in ("a.fits", "b.fits", "c.fits")]
    for f in files:
        stage(slot, f.basename, f.basename.encode() * 10)
    report = run_batch(site, slot, files)
    assert "d/b.fits" not in endpoint_files(site)
    assert report.outcomes.get("d/b.fits", ("",))[0] != COMMITTED, "a vanished file was recorded delivered"
    assert "d/b.fits" not in report.unknown  # known not delivered: sent again, not listed
    # The others were renamed and say so.
    assert endpoint_files(site) == {"d/a.fits": b"a.fits" * 10, "d/c.fits": b"c.fits" * 10}
    assert report.committed() == ["d/a.fits", "d/c.fits"]


# --------------------------------------------------------------------------- hole 3


@pytest.mark.parametrize("quote", ["'", '\\"'], ids=["single", "double"])
def test_hole2_mv_failing_only_because_the_consumer_was_fast_is_still_a_delivery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quote: str
) -> None:
    """GNU mv given several names stats each final name after renaming it; when the endpoint
    manager has taken the file already, mv says "cannot stat '<final path>'" and fails. Those
    files were renamed: reported M (sending them again would deliver them twice)."""
    monkeypatch.chdir(tmp_path)
    real_mv = shutil.which("mv")
    consumer = (
        f'{real_mv} "$@" || exit; [ "$1" = -n ] || exit 0; rm -f "$3/a.fits"; '
        f'echo "mv: cannot stat {quote}$3/a.fits{quote}: No such file or directory" >&2; exit 1'
    )
    bin_dir = fake_tools(tmp_path, {"mv": consumer})
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode()) for n in ("a.fits", "b.fits", "c.fits")]
    for f in files:
        stage(slot, f.basename, f.basename.encode())
    report = run_batch(site, slot, files)
    assert report.committed() == ["d/a.fits", "d/b.fits", "d/c.fits"], report.outcomes
    assert endpoint_files(site) == {"d/b.fits": b"b.fits", "d/c.fits": b"c.fits"}  # a: ingested


def test_hole3_an_earlier_version_in_the_endpoint_buffer_is_never_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path)
    (site.ep_buffer / "d").mkdir()
    (site.ep_buffer / "d" / "a.fits").write_bytes(b"version 1")  # not ingested yet
    slot = site.slot()
    v2 = site.local("d/a.fits", b"version 2!")
    other = site.local("d/b.fits", b"other")
    stage(slot, v2.basename, b"version 2!")
    stage(slot, other.basename, b"other")
    report = run_batch(site, slot, [v2, other])
    assert endpoint_files(site) == {"d/a.fits": b"version 1", "d/b.fits": b"other"}
    assert report.committed() == ["d/b.fits"]
    outcome, reason = report.outcomes["d/a.fits"]
    assert outcome != COMMITTED
    assert "exists" in (reason or "")
    assert "d/a.fits" not in report.unknown


def test_hole3_a_final_name_that_appears_just_before_the_rename_is_not_overwritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the builtin check cannot close: the final name appears between the check and
    ``mv``. ``mv -n`` leaves the staged copy (coreutils 9.1 says nothing and exits 0): the
    program sees it still staged and reports E, not M."""
    monkeypatch.chdir(tmp_path)
    real_mv = shutil.which("mv")
    racer = 'if [ "$1" = -n ]; then printf early > "$3/a.fits"; fi'
    bin_dir = fake_tools(tmp_path, {"mv": f'{racer}; exec {real_mv} "$@"'})
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode()) for n in ("a.fits", "b.fits")]
    for f in files:
        stage(slot, f.basename, f.basename.encode())
    report = run_batch(site, slot, files)
    assert endpoint_files(site) == {"d/a.fits": b"early", "d/b.fits": b"b.fits"}
    assert report.committed() == ["d/b.fits"]
    assert report.outcomes["d/a.fits"][0] == "waiting"


# --------------------------------------------------------------------------- hole 7


def test_hole7_a_commit_larger_than_the_endpoints_argument_limit_runs_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint's ARG_MAX is 128 KiB (a 256 KiB stack); the batch's names take ~300 KB."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path, remote='prlimit --stack=262144 sh -c "{command}"')
    slot = site.slot()
    files = []
    for i in range(1200):
        name = f"d/{i:05d}-" + "x" * 240 + ".fits"
        f = site.local(name, b"%d" % i)
        stage(slot, f.basename, b"%d" % i)
        files.append(f)
    report = run_batch(site, slot, files)
    assert report.unknown == [], report.error
    assert len(report.committed()) == 1200
    assert len(endpoint_files(site)) == 1200


# --------------------------------------------------------------------------- hole 8


def test_hole8_a_flock_that_fails_on_staging_is_a_clear_error_not_a_lost_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bin_dir = fake_tools(
        tmp_path, {"flock": 'echo "flock: failed to lock: Function not implemented" >&2; exit 1'}
    )
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    f = site.local("a.fits", b"data")
    stage(slot, f.basename, b"data")
    report = run_batch(site, slot, [f])
    assert endpoint_files(site) == {}
    assert report.unknown == [], "a failing flock was read as a lost reply"
    assert report.error_class == "endpoint"
    assert "flock" in (report.error or "")


# --------------------------------------------------------------------------- hole 9


def logging_tools(root: Path, *names: str, before: str = "") -> tuple[Path, Path]:
    """Shims for ``names`` that record each call (the tool, its working directory, its
    arguments, NUL-separated) and a copy of the slot's receipt as it was at that moment, in
    call order, then run ``before`` and the real tool. The commit runs its tools one at a
    time, so the counter needs no lock."""
    log = root / "calls"
    log.mkdir()
    tools = {}
    for name in names:
        real = shutil.which(name)
        tools[name] = (
            f'L={log}; n=$(cat "$L/n" 2>/dev/null || echo 0); n=$((n + 1)); echo "$n" >"$L/n"\n'
            f'printf "%s\\000" {name} "$PWD" "$@" >"$L/$n.call"\n'
            f'[ ! -f "$PWD.receipt" ] || cp "$PWD.receipt" "$L/$n.receipt"\n'
            f'{before}\nexec {real} "$@"'
        )
    return fake_tools(root, tools), log


def staged(site: Site, rels: list[str] | tuple[str, ...]) -> tuple[str, list[StagedFile]]:
    """A slot holding a good copy of each of ``rels`` (their content is their name)."""
    slot = site.slot()
    files = [site.local(rel, rel.encode()) for rel in rels]
    for f in files:
        stage(slot, f.basename, f.rel.encode())
    return slot, files


def listed_outcome(site: Site, slot: str, files: list[StagedFile]) -> tuple[list[str], list[str]]:
    """What a listing after a lost reply decides for ``files`` (batch 1): (moved, resend)."""
    _, listed = site.endpoint.list_slots([slot])
    assert listed is not None
    decided = recovered([(f.rel, 1) for f in files], listed.get(slot), listed.receipts.get(slot))
    return sorted(decided.moved), sorted(decided.resend)


def refusing(path: Path) -> str:
    """A shim's first line: fail (status 1) when ``path`` is among the tool's arguments."""
    return f'for a; do [ "$a" != {path} ] || exit 1; done'


def sync_refusing(path: Path) -> str:
    """A ``sync`` that fails when ``path`` is among its arguments, else the real one."""
    return f'{refusing(path)}; exec {shutil.which("sync")} "$@"'


def calls(log: Path) -> list[tuple[list[str], set[str]]]:
    """The recorded calls in order: ``[tool, cwd, *args]`` and the names the receipt held M
    records for at that moment."""
    out = []
    for n in range(1, int((log / "n").read_text()) + 1):
        words = [os.fsdecode(w) for w in (log / f"{n}.call").read_bytes().split(b"\0")[:-1]]
        receipt = log / f"{n}.receipt"
        records = receipt.read_bytes().split(b"\0") if receipt.exists() else []
        out.append((words, {os.fsdecode(r[1:]) for r in records if r[:1] == b"M"}))
    return out


HOSTILE_FEW = ["with space.fits", "new\nline", "-leading-dash", "--", "$(touch pwned)", "*", "."]


def test_hole9_the_copies_are_flushed_before_the_first_rename_and_each_directory_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A power cut on the endpoint must not empty a renamed file or undo its rename: the
    verified copies (only they, every one, hostile names as they are) are flushed before the
    first mv; a final directory the commit creates is flushed with its parents before anything
    is renamed into it; after the last group's mv every group's directory and the slot are
    flushed, in one sync, before any M record reaches the receipt (and so the reply, which
    comes after it)."""
    monkeypatch.chdir(tmp_path)
    bin_dir, log = logging_tools(tmp_path, "sync", "mv")
    site = faked_site(tmp_path / "site", bin_dir)
    (site.ep_buffer / "old").mkdir()
    slot = site.slot()
    files = []
    for i, name in enumerate(n for n in HOSTILE_FEW if n != "."):
        rel = f"{'old' if i % 2 else 'new/deep'}/{name}"
        f = site.local(rel, b"%d" % i)
        stage(slot, f.basename, b"%d" % i)
        files.append(f)
    cut = site.local("old/cut.fits", b"c" * 100)
    stage(slot, cut.basename, b"c" * 10)  # fails verification: never flushed, never renamed
    report = run_batch(site, slot, [*files, cut])
    assert report.error_class == "verification", report.error  # the cut copy, only
    assert sorted(report.committed()) == sorted(f.rel for f in files)
    assert set(endpoint_files(site)) == {f.rel for f in files}
    seen = calls(log)
    renames = [i for i, (words, _) in enumerate(seen) if words[0] == "mv" and "-n" in words]
    assert len(renames) == 2, seen
    # 1. The data: one flush, before the first rename, of exactly the verified copies.
    data = [i for i, (words, _) in enumerate(seen) if words[0] == "sync" and words[1] == slot]
    assert data and data[0] < renames[0], seen
    first = seen[data[0]][0]
    assert first[2] == "--" and sorted(first[3:]) == sorted(f.basename for f in files), seen
    # 2. The new directory: it and each parent it was made in, before the rename into it.
    new = str(site.ep_buffer / "new" / "deep")
    made = [i for i, (words, _) in enumerate(seen) if words[0] == "sync" and new in words]
    into_new = [i for i in renames if new in seen[i][0]]
    assert made and into_new and made[0] < into_new[0], seen
    assert seen[made[0]][0][3:] == [str(site.ep_buffer), str(site.ep_buffer / "new"), new]
    # 3. Every group's directory and the slot: flushed by one sync after the last mv, with no
    # M in the receipt yet (the outcome records come only after that flush).
    targets = [seen[i][0][seen[i][0].index("-t") + 1] for i in renames]
    after, receipt = seen[renames[-1] + 1]
    assert after[0] == "sync" and after[2] == "--" and sorted(after[3:]) == sorted([*targets, "."]), seen
    assert receipt == set(), "a rename was reported before it was on disk"
    receipt = (Path(slot + ".receipt")).read_bytes().split(b"\0")
    assert {os.fsdecode(r[1:]) for r in receipt if r[:1] == b"M"} == {f.basename for f in files}
    assert not [p for p in tmp_path.rglob("pwned")]


@pytest.mark.parametrize(
    "sync",
    [
        None,  # missing
        "echo \"sync: error syncing '$2': Input/output error\" >&2; exit 1",  # EIO
        'echo "sync: extra operand" >&2; exit 1',  # no file arguments
    ],
    ids=["missing", "eio", "no-file-arguments"],
)
def test_hole9_a_flush_that_fails_before_the_rename_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: str | None
) -> None:
    """The copies cannot be flushed (fsync's EIO or ENOSPC is a copy that may not be what was
    verified): nothing is renamed, the daemon is told why (exit status 89, error class
    endpoint) and that nothing moved, and every copy is still staged for the next try."""
    monkeypatch.chdir(tmp_path)
    if sync is None:
        bin_dir = fake_tools(tmp_path, {}, hide=("sync",))
    else:
        bin_dir = fake_tools(tmp_path, {"sync": sync})
    site = faked_site(tmp_path / "site", bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode()) for n in ("a.fits", "b.fits")]
    for f in files:
        stage(slot, f.basename, f.basename.encode())
    report = run_batch(site, slot, files)
    assert endpoint_files(site) == {}
    assert report.committed() == [] and report.unknown == []
    assert report.error_class == "endpoint"
    assert "exit status 89" in (report.error or "") and "flushed" in (report.error or ""), report.error
    assert "nothing moved" in (report.error or "")
    assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]
    assert not os.path.exists(site.ep_buffer / "d"), "a directory was made for a commit that stopped"


def test_hole9_a_directory_flush_that_fails_after_the_rename_is_unknown_and_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files of a group are renamed, then its directory cannot be flushed: the renames
    may not survive a power cut, so they are U (sent again: a duplicate at worst), never M
    (recorded delivered, and lost if the cut undoes them). The receipt says so too, so a
    listing after a lost reply sends them again as well; the other group is delivered."""
    from hdfmgr.deliver import UNSURE_REASON

    monkeypatch.chdir(tmp_path)
    sick = site_dir = tmp_path / "site" / "endpoint" / "buffer" / "sick"
    fail = (
        f'for a; do [ "$a" != {sick} ] || '
        f'{{ echo "sync: error syncing {sick}: Input/output error" >&2; exit 1; }}; done'
    )
    bin_dir, _ = logging_tools(tmp_path, "sync", before=fail)
    site = faked_site(tmp_path / "site", bin_dir)
    site_dir.mkdir()
    (site.ep_buffer / "well").mkdir()
    slot, files = staged(site, ("sick/a.fits", "sick/b.fits", "well/c.fits"))
    report = run_batch(site, slot, files)
    # Renamed all three; only the flushed one counts as delivered.
    assert set(endpoint_files(site)) == {"sick/a.fits", "sick/b.fits", "well/c.fits"}
    assert report.committed() == ["well/c.fits"]
    assert report.outcomes["sick/a.fits"] == ("failed", UNSURE_REASON)
    assert report.outcomes["sick/b.fits"] == ("failed", UNSURE_REASON)
    assert report.unknown == []
    assert "exit status 88" in (report.error or "") and "cannot flush" in (report.error or ""), report.error
    assert listed_outcome(site, slot, files) == (["well/c.fits"], ["sick/a.fits", "sick/b.fits"])


def test_hole9_a_new_directory_that_cannot_be_flushed_gets_nothing_renamed_into_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit makes a final directory and cannot flush it: nothing is renamed into a
    directory a power cut may take away (F: not moved, sent again); the others go on."""
    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "site" / "endpoint" / "buffer" / "fresh"
    bin_dir, _ = logging_tools(tmp_path, "sync", before=refusing(fresh))
    site = faked_site(tmp_path / "site", bin_dir)
    slot, files = staged(site, ("fresh/sub/a.fits", "b.fits"))
    report = run_batch(site, slot, files)
    assert set(endpoint_files(site)) == {"b.fits"}
    assert report.committed() == ["b.fits"] and report.unknown == []
    assert report.outcomes["fresh/sub/a.fits"][0] == "failed"
    assert os.listdir(slot) == ["a.fits"]


def test_hole9_a_new_directory_that_can_be_neither_flushed_nor_removed_moves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new directory cannot be flushed, and removing it again fails too: it stays, and
    stays unflushed, so the commit stops before any rename (exit status 89, nothing moved)."""
    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "site" / "endpoint" / "buffer" / "fresh"
    bin_dir = fake_tools(tmp_path, {"sync": sync_refusing(fresh), "rmdir": "exit 1"})
    site = faked_site(tmp_path / "site", bin_dir)
    slot, files = staged(site, ("fresh/a.fits", "b.fits"))
    report = run_batch(site, slot, files)
    assert endpoint_files(site) == {}
    assert report.committed() == [] and report.unknown == []
    assert "exit status 89" in (report.error or "") and "nothing moved" in (report.error or ""), report.error
    assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]


def test_hole9_a_final_directory_that_cannot_be_made_gets_nothing_and_the_others_go_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file stands where a final directory must be: its names stay staged (F, sent again),
    the other directories, new and old, get theirs."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path)
    (site.ep_buffer / "blocked").write_bytes(b"not a directory")
    (site.ep_buffer / "old").mkdir()
    slot = site.slot()
    rels = ["blocked/night/a.fits", "new/b.fits", "old/c.fits", "blocked/night/d.fits"]
    files = [site.local(rel, rel.encode()) for rel in rels]
    for f in files:
        stage(slot, f.basename, f.rel.encode())
    report = run_batch(site, slot, files)
    got = endpoint_files(site)
    assert got.pop("blocked") == b"not a directory"
    assert got == {"new/b.fits": b"new/b.fits", "old/c.fits": b"old/c.fits"}
    assert report.committed() == ["new/b.fits", "old/c.fits"] and report.unknown == []
    assert report.outcomes["blocked/night/a.fits"][0] == "failed"
    assert report.outcomes["blocked/night/d.fits"][0] == "failed"
    assert sorted(os.listdir(slot)) == ["a.fits", "d.fits"]


def test_every_staged_name_gets_exactly_its_outcome_in_a_large_mixed_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One commit of many groups, one far larger than the steps the move step builds its
    argument lists in, hostile names among them: renamed (M), final name taken (E), gone from
    staging before the move (G), and the receipt holds I and the outcome of every name given
    to mv, and nothing for the others."""
    from hdfmgr.deliver import GONE_REASON

    monkeypatch.chdir(tmp_path)
    # A cleaner takes one copy after it was verified, before the move step (uniq runs there).
    bin_dir = fake_tools(tmp_path, {"uniq": f'rm -f ./vanish.fits; exec {shutil.which("uniq")} "$@"'})
    site = faked_site(tmp_path / "site", bin_dir)
    (site.ep_buffer / "big").mkdir()
    (site.ep_buffer / "big" / "taken.fits").write_bytes(b"earlier version")
    slot = site.slot()
    rels = [f"big/{i:04d}.fits" for i in range(300)] + ["big/taken.fits"]
    rels += [f"d{k}/{name}" for k, name in enumerate(HOSTILE_FEW) if name != "."]
    rels += ["deep/er/x.fits", "deep/er/vanish.fits"]
    files = [site.local(rel, rel.encode()) for rel in rels]
    for f in files:
        stage(slot, f.basename, f.rel.encode())
    report = run_batch(site, slot, files)
    delivered = set(rels) - {"big/taken.fits", "deep/er/vanish.fits"}
    assert sorted(report.committed()) == sorted(delivered)
    assert report.unknown == []
    assert report.outcomes["big/taken.fits"][0] == "waiting"
    assert report.outcomes["deep/er/vanish.fits"] == ("failed", GONE_REASON)
    got = endpoint_files(site)
    assert got.pop("big/taken.fits") == b"earlier version"
    assert got == {rel: rel.encode() for rel in delivered}
    assert os.listdir(slot) == ["taken.fits"]
    receipt = Path(slot + ".receipt").read_bytes().split(b"\0")[:-1]
    assert receipt[0] == b"1"
    kinds: dict[str, list[str]] = {}
    for r in receipt[1:]:
        kinds.setdefault(os.fsdecode(r[1:]), []).append(chr(r[0]))
    names = {os.path.basename(rel) for rel in delivered}
    assert kinds == {n: ["I", "M"] for n in names}, "receipt records wrong"
    assert not [p for p in tmp_path.rglob("pwned")]


def test_digest_helper_matches_b2sum() -> None:
    # The fake-tool tests rely on the real b2sum elsewhere; make sure it is the same digest.
    out = subprocess.run(["b2sum"], input=b"abc", capture_output=True, check=True).stdout
    assert out.split()[0].decode() == hashlib.blake2b(b"abc").hexdigest()


# --------------------------------------------------------------------------- the start-up check


def write_config(root: Path, *, verify: str, remote: str) -> Path:
    for d in ("buffer", "holding", "ep/buffer", "ep/staging"):
        (root / d).mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(
        "handoff: {buffer: buffer, holding: holding}\n"
        "endpoint:\n"
        f"  buffer: {root}/ep/buffer\n"
        f"  staging: {root}/ep/staging\n"
        "  commands:\n"
        "    transfer: cp {batch} {dest}\n"
        f"    remote: '{remote}'\n"
        "database: {engine: 'sqlite:///handoff.db'}\n"
        f"general: {{name: t1, verify: {verify}, timeout: 30, retry_initial: 1}}\n"
    )
    (root / "buffer" / "a.fits").write_bytes(b"data")
    return path


#: A ``sync`` that takes no file arguments (it complains), and one that ignores them (GNU
#: coreutils < 8.24 said so and synced everything): neither is known to flush what it is named.
SYNC_WITHOUT_ARGUMENTS = '[ "$#" -eq 0 ] || { echo "sync: extra operand" >&2; exit 1; }'
SYNC_IGNORING_ARGUMENTS = 'echo "sync: ignoring all arguments" >&2; exit 0'


@pytest.mark.parametrize(
    "verify, hide, tools, culprit",
    [
        ("checksum", ("b2sum",), {}, "b2sum"),
        ("checksum", (), {"b2sum": "echo \"b2sum: invalid option -- 'z'\" >&2; exit 1"}, "b2sum -z"),
        (
            "size",
            (),
            {"flock": 'echo "flock: failed to lock: Function not implemented" >&2; exit 1'},
            "flock",
        ),
        ("size", ("sync",), {}, "sync"),
        ("size", (), {"sync": SYNC_WITHOUT_ARGUMENTS}, "sync -- FILE does not work"),
        ("size", (), {"sync": SYNC_IGNORING_ARGUMENTS}, "ignores its file arguments"),
    ],
    ids=[
        "b2sum-missing",
        "b2sum-without-z",
        "flock-failing",
        "sync-missing",
        "sync-rejecting-files",
        "sync-ignoring-files",
    ],
)
@pytest.mark.parametrize("command", ["rescan", "run"])
def test_run_refuses_an_endpoint_that_cannot_run_the_commit(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    verify: str,
    hide: tuple[str, ...],
    tools: dict[str, str],
    culprit: str,
) -> None:
    """Hole 1, 8 and 9 at start, for the watcher and the one pass alike: one line, sysexits
    69, nothing sent (the file stays put)."""
    from hdfmgr import cli

    monkeypatch.chdir(tmp_path)
    bin_dir = fake_tools(tmp_path, tools, hide=hide)
    path = str(bin_dir) if hide else f"{bin_dir}:{SYSTEM_PATH}"
    config = write_config(tmp_path / "site", verify=verify, remote=f'env PATH={path} sh -c "{{command}}"')
    assert cli.main([command, str(config)]) == cli.EX_UNAVAILABLE == 69
    err = capsys.readouterr().err.strip().splitlines()
    # One line says why (informational start-up lines, such as the database's creation, may
    # come before it), and nothing else is an error.
    assert err and culprit in err[-1] and "Traceback" not in "\n".join(err), err
    assert not [line for line in err[:-1] if " ERROR " in line or " WARNING " in line], err
    assert (tmp_path / "site" / "buffer" / "a.fits").exists()
    assert list((tmp_path / "site" / "ep" / "buffer").iterdir()) == []


def test_doctor_checks_the_same_assumptions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``doctor`` runs the start-up probe too: a flock failing on staging is one FAIL line,
    and so is a sync that ignores its file arguments."""
    from hdfmgr import doctor

    monkeypatch.chdir(tmp_path)
    failing = {"flock": 'echo "flock: failed to lock: Function not implemented" >&2; exit 1'}
    bin_dir = fake_tools(tmp_path, failing)
    remote = f'env PATH={bin_dir}:{SYSTEM_PATH} sh -c "{{command}}"'
    config = write_config(tmp_path / "site", verify="checksum", remote=remote)
    lines: list[str] = []
    assert doctor.main(str(config), out=lines.append) == doctor.EX_FAIL
    bad = [line for line in lines if line.startswith("FAIL endpoint can run the commit")]
    assert len(bad) == 1 and "flock" in bad[0] and "Function not implemented" in bad[0], lines
    good = write_config(tmp_path / "good", verify="checksum", remote='sh -c "{command}"')
    lines = []
    doctor.main(str(good), out=lines.append)
    ok = [line for line in lines if line.startswith("OK   endpoint can run the commit")]
    assert len(ok) == 1 and "b2sum -z works" in ok[0] and "ARG_MAX" in ok[0], lines
    assert "sync -- FILE works" in ok[0], lines
    # A sync that ignores the files it is named flushes nothing the commit relies on.
    bin_dir = fake_tools(tmp_path / "site", {"sync": SYNC_IGNORING_ARGUMENTS})
    remote = f'env PATH={bin_dir}:{SYSTEM_PATH} sh -c "{{command}}"'
    config = write_config(tmp_path / "old-sync", verify="size", remote=remote)
    lines = []
    assert doctor.main(str(config), out=lines.append) == doctor.EX_FAIL
    bad = [line for line in lines if line.startswith("FAIL ")]
    assert len(bad) == 1 and "ignores its file arguments" in bad[0] and "8.24" in bad[0], lines


def test_doctor_checks_leases_and_durability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The assumptions README, Guarantees, names beside flock: read leases on the handoff
    buffer (a WARN line, with the setting it then depends on, from a doctor without
    CAP_LEASE; the exit status stays 0) and a database that syncs every commit."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "site", verify="size", remote='sh -c "{command}"')
    from hdfmgr import cli

    assert cli.main(["initdb", str(config)]) == 0

    def doctor(*wrap: str) -> tuple[int, list[str]]:
        argv = [*wrap, sys.executable, "-m", "hdfmgr", "doctor", str(config)]
        result = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert "Traceback" not in result.stderr, result.stderr
        return result.returncode, result.stdout.splitlines()

    rc, lines = doctor()
    assert rc == 0, lines
    assert "OK   writers can be seen in the handoff buffer (read leases)" in lines
    durable = [line for line in lines if "database commits are on disk" in line]
    what = "database commits are on disk before what follows them (power loss)"
    assert durable == [f"OK   {what}: synchronous=full"], lines
    rc, lines = doctor("setpriv", "--inh-caps=-lease", "--bounding-set=-lease")
    assert rc == 0, lines
    warn = [line for line in lines if line.startswith("WARN ")]
    assert len(warn) == 1 and "no CAP_LEASE" in warn[0] and "general.stable_age (2 s)" in warn[0], lines
    assert not [line for line in lines if line.startswith("FAIL")], lines


# --------------------------------------------------------------------------- through the daemon


def test_hole3_daemon_waits_for_a_paused_consumer_then_delivers_the_new_version(tmp_path: Path) -> None:
    """The endpoint manager is paused: version 1 of a.fits waits in the endpoint buffer when
    version 2 is written. Version 2 never replaces it; once the consumer takes version 1,
    version 2 is delivered (once), and the database said why it waited."""
    from tests.site import Site as DaemonSite
    from tests.site import wait_for

    site = DaemonSite(tmp_path)
    site.configure(retry_initial=0.2, retry_max=0.5)
    final = site.ep_buffer / "d" / "a.fits"
    final.parent.mkdir()
    final.write_bytes(b"version 1")  # delivered earlier, not ingested yet (consumer paused)
    daemon = site.start()
    try:
        site.write("d/a.fits", b"version 2!")
        wait_for(
            lambda: any(
                "endpoint buffer" in (e or "") for (e,) in site.query("select last_error from files")
            ),
            20,
            "the reason it waits, recorded",
        )
        # A few more tries with the consumer still paused: each one leaves version 1 alone.
        waiting = "select attempts >= 3, state, error_class from files"
        wait_for(lambda: site.query(waiting) == [(1, "failed", "exists")], 20, "three tries")
        assert final.read_bytes() == b"version 1", "the earlier version was overwritten"
        assert site.held() == {} and site.waiting() == {"d/a.fits": b"version 2!"}
        final.unlink()  # the consumer resumes and ingests version 1
        wait_for(lambda: final.exists() and final.read_bytes() == b"version 2!", 20, "version 2 delivered")
        wait_for(lambda: site.states().get("d/a.fits") == "held", 10, "held")
        assert site.held() == {"d/a.fits": b"version 2!"}
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_hole2_daemon_sends_again_a_file_that_vanished_from_staging(tmp_path: Path) -> None:
    """Something deletes a staged copy right before the rename (a tmp cleaner, an operator):
    the file is sent again and arrives, and is never recorded delivered without arriving."""
    from tests.site import Site as DaemonSite
    from tests.site import wait_for

    site = DaemonSite(tmp_path)
    real_mv = shutil.which("mv")
    once = tmp_path / "vanished-once"
    vanish = f"if [ -f ./gone.fits ] && [ ! -e {once} ]; then : > {once}; rm -f ./gone.fits; fi"
    bin_dir = fake_tools(tmp_path, {"mv": f'{vanish}; exec {real_mv} "$@"'})
    site.configure(
        remote=f'env PATH={bin_dir}:{SYSTEM_PATH} sh -c "{{command}}"', retry_initial=0.2, retry_max=0.5
    )
    files = {"n/gone.fits": b"gone" * 10, "n/kept.fits": b"kept" * 10}
    daemon = site.start()
    try:
        site.write_many(files)
        wait_for(lambda: once.exists(), 20, "the staged copy to vanish")
        wait_for(lambda: site.delivered() == files, 20, "both delivered")
        wait_for(lambda: set(site.states().values()) == {"held"}, 10, "both held")
        attempts = dict(site.query("select relpath, attempts from files"))
        assert attempts[b"n/gone.fits"] == 2 and attempts[b"n/kept.fits"] == 1
    finally:
        assert daemon.stop() == 0, daemon.output()


def test_hole7_batches_respect_the_endpoints_argument_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe's ARG_MAX caps the batch budget when it is lower than this host's."""
    from hdfmgr.endpoint import Requirements
    from hdfmgr.pipeline import Pipeline

    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path / "site", verify="size", remote='sh -c "{command}"')
    from hdfmgr.config import load

    pipeline = Pipeline(load(config), once=True, install_signals=False)
    local = pipeline.budget
    monkeypatch.setattr(
        pipeline.endpoint,
        "requirements",
        lambda *args: (None, Requirements(arg_max=65536, flock="ok", sync="ok")),
    )
    pipeline.gate.ask_now()
    assert pipeline.budget < 65536 < local
    pipeline.executor.shutdown()


def test_hole8_a_commit_that_cannot_lock_backs_off_and_is_never_a_lost_reply(tmp_path: Path) -> None:
    """flock works for the start-up probe but fails in every commit (a staging filesystem
    that changed under a running daemon): each attempt is an ``endpoint`` error with backoff,
    nothing is moved, and nothing is ever taken for a lost reply."""
    from tests.site import Site as DaemonSite
    from tests.site import wait_for

    site = DaemonSite(tmp_path)
    real = shutil.which("flock")
    probe_only = f'case "$1" in -n) exec {real} "$@" ;; esac'
    failing = f'{probe_only}; echo "flock: failed to lock: Function not implemented" >&2; exit 1'
    bin_dir = fake_tools(tmp_path, {"flock": failing})
    site.configure(
        remote=f'env PATH={bin_dir}:{SYSTEM_PATH} sh -c "{{command}}"', retry_initial=0.5, retry_max=2
    )
    daemon = site.start()
    try:
        site.write("a.fits", b"data")
        wait_for(lambda: site.query("select attempts from files") == [(4,)], 30, "a fourth attempt")
        # Backing off (0.5 s, 1 s, 2 s, ... with jitter): the fourth batch started at least a
        # second after the third ended (the records' times: a test's polling may lag).
        ((third_end, fourth_start),) = site.query(
            "select (select finished_at from batches where id = 3), "
            "(select started_at from batches where id = 4)"
        )
        assert fourth_start - third_end > 1.0
        rows = site.query("select error_class, last_error from files")
        assert rows[0][0] == "endpoint" and "flock fails on staging" in rows[0][1], rows
        assert "nothing moved" in rows[0][1]
        assert list(site.ep_buffer.iterdir()) == []
        # status does not call such an endpoint ok (the symptom the issue reports).
        shown = site.hdfmgr("status", str(site.config_path))
        assert shown.returncode == 0, shown.stderr
        assert "endpoint: ok" not in shown.stdout, shown.stdout
        assert "endpoint: reachable, but its commits FAIL" in shown.stdout, shown.stdout
        assert "flock fails on staging" in shown.stdout
    finally:
        assert daemon.stop() == 0
    assert "reply was lost" not in daemon.output()


def test_hole1_daemon_with_a_flaky_b2sum_delivers_each_file_once_and_only_verified(tmp_path: Path) -> None:
    """``verify: checksum`` with a ``b2sum`` that fails every other commit after printing the
    digest of its first file only (an I/O error part-way): no commit moves anything
    unverified, every file reaches a consumer that ingests at once exactly once with the
    right bytes, and the failed commits are ``endpoint`` errors, never lost replies."""
    from collections import Counter

    from tests.site import Consumer, content, wait_for
    from tests.site import Site as DaemonSite

    site = DaemonSite(tmp_path)
    real = shutil.which("b2sum")
    count = tmp_path / "b2sum-calls"
    # Only the commit's `b2sum -z -- NAMES` is flaky; the start-up probe's calls are real.
    flaky = (
        f'[ "$2" = -- ] || exec {real} "$@"\n'
        f"n=$(cat {count} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {count}\n"
        f'if [ $((n % 2)) -eq 1 ]; then {real} -z -- "$3"; '
        'echo "b2sum: $4: Input/output error" >&2; exit 1; fi\n'
        f'exec {real} "$@"'
    )
    bin_dir = fake_tools(tmp_path, {"b2sum": flaky})
    site.configure(
        remote=f'env PATH={bin_dir}:{SYSTEM_PATH} sh -c "{{command}}"',
        verify="checksum",
        retry_initial=0.2,
        retry_max=0.5,
        num_threads=1,
    )
    names = [f"n/f{i:02d}.fits" for i in range(15)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()
    daemon = site.start()
    try:
        for name in names:
            site.write(name, content(name))
        wait_for(lambda: set(site.states().values()) == {"held"} and len(site.states()) == 15, 60, "all held")
        wait_for(lambda: len(consumer.arrivals) >= 15, 10, "every arrival")
    finally:
        consumer.stop_event.set()
        assert daemon.stop() == 0, daemon.output()
    assert consumer.bad == [], "an unverified copy reached the endpoint buffer"
    assert Counter(consumer.arrivals) == Counter(names), "a file arrived twice or not at all"
    assert int(count.read_text()) >= 2, "b2sum never failed"
    classes = Counter(c for (c,) in site.query("select error_class from batches"))
    assert classes["endpoint"] >= 1 and set(classes) <= {None, "endpoint"}, classes
    assert site.held() == {name: content(name) for name in names}
    assert "reply was lost" not in daemon.output()


#: A remote command that notes each command line it is given, then runs it with a 256 KiB
#: stack: the endpoint's ARG_MAX is then 128 KiB, much lower than this host's.
LOW_ARG_MAX_REMOTE = """#!/bin/sh
printf '%s\\n' "$1" >> {log}
exec prlimit --stack=262144 sh -c "$1"
"""


def test_hole7_daemon_asks_the_endpoint_once_and_keeps_batches_under_its_limit(tmp_path: Path) -> None:
    """Through the daemon: an endpoint with a low argument limit is asked for it once, at
    start; every batch stays under it, nothing is split or reported lost, nothing loops."""
    from tests.site import Site as DaemonSite
    from tests.site import wait_for

    site = DaemonSite(tmp_path / "site")
    log = tmp_path / "commands"
    remote = tmp_path / "remote.sh"
    remote.write_text(LOW_ARG_MAX_REMOTE.format(log=log))
    remote.chmod(0o755)
    site.configure(remote=f'{remote} "{{command}}"', pause=60)
    endpoint_arg_max = int(
        subprocess.run(
            ["prlimit", "--stack=262144", "getconf", "ARG_MAX"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert endpoint_arg_max < os.sysconf("SC_ARG_MAX")
    names = [f"d/{i:04d}-" + "x" * 240 + ".fits" for i in range(700)]
    for name in names:
        site.write(name, name.encode())
    daemon = site.start()
    try:
        wait_for(lambda: site.held() == {n: n.encode() for n in names}, 60, "every file held")
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert site.delivered() == {n: n.encode() for n in names}
    commands = log.read_text()
    assert commands.count("hdfmgr-probe") == 1, "the endpoint was asked more than once"
    batches = site.query("select files, status, error_class from batches")
    assert all(status == "committed" and cls is None for _, status, cls in batches), batches
    # Each file weighs at least twice its name in a commit: a batch under the endpoint's
    # limit carries at most this many (the local limit would allow all 700 in one).
    assert max(n for n, _, _ in batches) <= endpoint_arg_max // (2 * len(names[0]))
    assert sum(n for n, _, _ in batches) == 700
    assert site.query("select max(attempts) from files") == [(1,)]
    assert "reply was lost" not in daemon.output()


#: Like LOW_ARG_MAX_REMOTE, but the first {down} commands fail as an unreachable ssh would.
#: An endpoint unreachable for its first {down} start-up probes (and every command meanwhile),
#: counted by probes: a sweep racing the probe at start must not use up the outage.
LATE_LOW_ARG_MAX_REMOTE = """#!/bin/sh
n=$(cat {count} 2>/dev/null || echo 0)
case "$1" in *hdfmgr-probe*) n=$((n + 1)); echo $n > {count} ;; esac
if [ "$n" -le {down} ]; then echo "ssh: connect to host endpoint port 22: No route to host" >&2; exit 255; fi
printf '%s\\n' "$1" >> {log}
exec prlimit --stack=262144 sh -c "$1"
"""


def test_hole7_an_endpoint_unreachable_at_start_is_asked_once_it_answers(tmp_path: Path) -> None:
    from tests.site import Site as DaemonSite
    from tests.site import wait_for

    site = DaemonSite(tmp_path / "site")
    log, count = tmp_path / "commands", tmp_path / "count"
    remote = tmp_path / "remote.sh"
    remote.write_text(LATE_LOW_ARG_MAX_REMOTE.format(log=log, count=count, down=2))
    remote.chmod(0o755)
    site.configure(remote=f'{remote} "{{command}}"', pause=60, retry_initial=0.2, retry_max=0.5)
    names = [f"d/{i:04d}-" + "x" * 240 + ".fits" for i in range(700)]
    for name in names:
        site.write(name, name.encode())
    daemon = site.start()
    try:
        wait_for(lambda: site.held() == {n: n.encode() for n in names}, 60, "every file held")
    finally:
        assert daemon.stop() == 0, daemon.output()
    assert "could not check what the endpoint provides" in daemon.output()
    assert log.read_text().count("hdfmgr-probe") == 1, "the endpoint was never asked once it answered"
    batches = site.query("select files from batches where status = 'committed'")
    assert max(n for (n,) in batches) <= 131072 // (2 * len(names[0])), batches
