"""The commit program's move step under hostile conditions, against a LOCAL endpoint.

Staging filling up (data or inodes) just before or just after the renames, new final
directories that cannot be flushed (nested in each other, or in a directory of another
group), a directory an earlier commit could not flush, a staged copy named ``-`` in checksum
mode, and hostile names and directories under a low argument limit with dash and bash as
``sh``: what lands in the endpoint buffer and what the daemon is told.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_commit_holes import (
    Site,
    endpoint_files,
    fake_tools,
    faked_site,
    refusing,
    run_batch,
    stage,
    staged,
    sync_refusing,
)


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``mnt`` (made here) for the test's duration."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs holding the endpoint's staging and buffer."""
    with tmpfs(tmp_path / "ep", "size=1m") as mnt:
        yield mnt


@pytest.fixture
def few_inodes(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs with room for data but few inodes (a staging filesystem out of inodes)."""
    with tmpfs(tmp_path / "ep", "size=8m,nr_inodes=400") as mnt:
        yield mnt


FILL_DATA = "[ -e {mnt}/filler ] || head -c 8000000 /dev/zero >{mnt}/filler 2>/dev/null"
#: Uses up the inodes of the filesystem at {mnt}, once.
FILL_INODES = (
    "[ -e {mnt}/inodes ] || {{ mkdir {mnt}/inodes; i=0; "
    "while touch {mnt}/inodes/$i 2>/dev/null; do i=$((i + 1)); done; }}"
)


# ------------------------------------------------------------------ staging full after the renames


@pytest.mark.parametrize(
    ("space", "fill"), [("full_fs", FILL_DATA), ("few_inodes", FILL_INODES)], ids=["data", "inodes"]
)
def test_staging_full_right_after_the_renames_still_reports_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, space: str, fill: str
) -> None:
    """Staging fills up (another slot's transfer, say), its data or its inodes, while mv runs.
    The files are renamed and flushed: M, decided in memory, never unknown for want of space
    to write a list (nor ended by a failed redirection of a special built-in such as `:`,
    which would end the shell at once, the whole reply lost)."""
    monkeypatch.chdir(tmp_path)
    mnt = request.getfixturevalue(space)
    real_mv = shutil.which("mv")
    mv = f'{real_mv} "$@"; rc=$?; [ "$1" != -n ] || {fill.format(mnt=mnt)}; exit $rc'
    bin_dir = fake_tools(tmp_path, {"mv": mv})
    site = faked_site(mnt, bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode()) for n in ("a.fits", "b.fits")]
    (site.ep_buffer / "d").mkdir()
    for f in files:
        stage(slot, f.basename, f.basename.encode())
    report = run_batch(site, slot, files)
    assert set(endpoint_files(site)) == {"d/a.fits", "d/b.fits"}
    assert report.unknown == [], report.error
    assert report.committed() == ["d/a.fits", "d/b.fits"], report.outcomes


def test_staging_out_of_inodes_before_the_move_step_is_x94_not_a_lost_reply(
    tmp_path: Path, few_inodes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staging runs out of inodes just before the move step (while the outcomes known before
    it are listed): the commit stops with an X record (nothing moved, known for certain), not a
    lost reply."""
    monkeypatch.chdir(tmp_path)
    real_sed = shutil.which("sed")
    sed = f'{FILL_INODES.format(mnt=few_inodes)}; exec {real_sed} "$@"'
    bin_dir = fake_tools(tmp_path, {"sed": sed})
    site = faked_site(few_inodes, bin_dir)
    slot = site.slot()
    files = [site.local(f"d/{n}", n.encode()) for n in ("a.fits", "b.fits")]
    for f in files:
        stage(slot, f.basename, f.basename.encode())
    report = run_batch(site, slot, files)
    moved = set(endpoint_files(site))
    assert report.unknown == [], f"nothing-moved read as a lost reply (moved: {moved}): {report.error}"
    assert moved == set(report.committed())


# ------------------------------------------------------------------ new directories


def test_a_new_directory_that_cannot_be_flushed_takes_its_new_parent_final_directory_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two new final directories, x and x/y, in one batch; x/y cannot be flushed: only x/y
    is removed again (x/y/b.fits F); x, flushed, keeps its group (x/a.fits M)."""
    monkeypatch.chdir(tmp_path)
    sick = tmp_path / "site" / "endpoint" / "buffer" / "x" / "y"
    bin_dir = fake_tools(tmp_path, {"sync": sync_refusing(sick)})
    site = faked_site(tmp_path / "site", bin_dir)
    slot, files = staged(site, ("x/a.fits", "x/y/b.fits"))
    report = run_batch(site, slot, files)
    assert report.outcomes["x/y/b.fits"][0] == "failed"
    assert endpoint_files(site) == {"x/a.fits": b"x/a.fits"}, report.outcomes
    assert report.committed() == ["x/a.fits"]


def test_an_unflushable_new_directory_holding_another_new_one_does_not_stop_the_other_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New final directories x and x/y; x cannot be flushed (nor x/y, made in it): the
    fallback removes the deepest first, then x, and the commit goes on for z/c.fits."""
    monkeypatch.chdir(tmp_path)
    sick = tmp_path / "site" / "endpoint" / "buffer" / "x"
    bin_dir = fake_tools(tmp_path, {"sync": sync_refusing(sick)})
    site = faked_site(tmp_path / "site", bin_dir)
    (site.ep_buffer / "z").mkdir()
    slot, files = staged(site, ("x/a.fits", "x/y/b.fits", "z/c.fits"))
    report = run_batch(site, slot, files)
    assert report.committed() == ["z/c.fits"], report.error
    assert endpoint_files(site) == {"z/c.fits": b"z/c.fits"}


def test_a_directory_an_earlier_commit_made_but_could_not_flush_is_not_taken_as_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x cannot be flushed, by any commit: no rename into x or x/y is ever reported M."""
    monkeypatch.chdir(tmp_path)
    sick = tmp_path / "site" / "endpoint" / "buffer" / "x"
    bin_dir = fake_tools(tmp_path, {"sync": sync_refusing(sick)})
    site = faked_site(tmp_path / "site", bin_dir)
    for attempt, rels in enumerate([("x/a.fits", "x/y/b.fits"), ("x/y/b.fits",)]):
        slot = site.slot(attempt)
        files = [site.local(rel, rel.encode()) for rel in rels]
        for f in files:
            stage(slot, f.basename, f.rel.encode())
        report = run_batch(site, slot, files)
        assert report.committed() == [], (attempt, report.outcomes, report.error)


# ------------------------------------------------------------------ verification (old hole)


def test_checksum_mode_a_staged_copy_named_dash_is_really_verified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b2sum reads its standard input for a file named "-": the commit hashes ./-, so that
    an empty local d/- never "verifies" whatever its staged copy holds."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path, verify="checksum")
    slot = site.slot()
    f = site.local("d/-", b"")
    stage(slot, "-", b"garbage, not what was sent")
    report = run_batch(site, slot, [f])
    assert endpoint_files(site).get("d/-") in (None, b""), "an unverified copy was delivered"
    assert report.committed() == []


# ------------------------------------------------------------------ stress (passes: no hole found)

HOSTILE = [
    "with space",
    "new\nline",
    "-dash",
    "--",
    "$(touch pwned)",
    "*",
    "it's",
    'q"uote',
    "a",
    "a.b",
    "a-b",
    "a/",
    "\udcff\udcfe",
    "back\\slash",
    "%s%n",
    "tab\there",
    " lead",
]


@pytest.mark.parametrize("verify", ["size", "checksum"])
@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_stress_hostile_names_and_directories_under_a_low_argument_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: str, verify: str
) -> None:
    """Hostile names and directories (new and existing), names and directories that sort
    differently by whole line and by first field, E among them, 1200 names in two
    directories, a 128 KiB ARG_MAX, dash and bash as sh."""
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "shbin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which(shell))
    remote = f'env PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin prlimit --stack=262144 sh -c "{{command}}"'
    site = Site(tmp_path / "site", remote=remote, verify=verify)
    slot = site.slot()
    dirs = [d.rstrip("/") for d in HOSTILE] + ["a/a.b", "a-b/a", "a.b/a-b/new\nline", "deep/a", "deep/a.b"]
    rels = [f"plain/{n}" for n in ("a", "a.b", "a-b", "a-", "a.", "a0", "--", "*")]
    if verify == "size":
        rels.append("plain/-")  # checksum mode: its own test above
    k = 0
    for di, d in enumerate(dirs):
        if di % 2:
            (site.ep_buffer / d).mkdir(parents=True, exist_ok=True)
        for n in HOSTILE:
            rels.append(f"{d}/{n.rstrip('/')}~{k}")
            k += 1
    rels += [f"a/{i:05d}-" + "y" * 200 for i in range(900)]
    rels += [f"a.b/{i:05d}" for i in range(300)]
    taken = set(rels[5::7])
    for rel in taken:
        p = site.ep_buffer / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"earlier")
    files, waiting = [], []
    for rel in rels:
        data = (b"new " if rel in taken else b"") + os.fsencode(rel)
        f = site.local(rel, data)
        stage(slot, f.basename, data)
        (waiting if rel in taken else files).append(f)
    report = run_batch(site, slot, files + waiting)
    assert report.unknown == [], report.error
    assert sorted(report.committed()) == sorted(f.rel for f in files)
    for f in waiting:
        assert report.outcomes[f.rel][0] == "waiting", (f.rel, report.outcomes[f.rel])
    got = endpoint_files(site)
    for f in files:
        assert got[f.rel] == os.fsencode(f.rel)
    for f in waiting:
        assert got[f.rel] == b"earlier"
    assert sorted(os.listdir(slot)) == sorted(f.basename for f in waiting)
    assert not list(tmp_path.rglob("pwned"))


def _flush_log_sync(tmp_path: Path, sick: Path) -> tuple[Path, Path]:
    """A sync that fails whenever `sick` is among its arguments, and logs (one NUL-separated
    line per call) the arguments of each call that succeeded."""
    log = tmp_path / "flushed"
    real = shutil.which("sync")
    body = f'{refusing(sick)}\n{real} "$@" || exit $?\nprintf "%s\\000" "$@" >>{log}; printf "\\n" >>{log}'
    return fake_tools(tmp_path, {"sync": body}), log


def test_an_intermediate_new_directory_left_unflushed_is_later_taken_as_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit 1 makes x (an intermediate) and x/y (the final directory); x/y cannot be
    flushed, so the fallback removes x/y alone and keeps x, whose entry in the buffer was
    never flushed (no successful sync ever named the buffer). Commit 2 renames x/b.fits into
    the existing x and reports M after flushing x and the slot only: a power cut can take x
    (and the delivered file) away."""
    monkeypatch.chdir(tmp_path)
    sick = tmp_path / "site" / "endpoint" / "buffer" / "x" / "y"
    bin_dir, log = _flush_log_sync(tmp_path, sick)
    site = faked_site(tmp_path / "site", bin_dir)
    a = site.local("x/y/a.fits", b"a")
    slot = site.slot(0)
    stage(slot, a.basename, b"a")
    report = run_batch(site, slot, [a])
    assert report.committed() == []
    b = site.local("x/b.fits", b"b")
    slot = site.slot(1)
    stage(slot, b.basename, b"b")
    report = run_batch(site, slot, [b])
    flushed = [set(line.split(b"\0")) for line in log.read_bytes().split(b"\n") if line]
    buffer_flushed = any(os.fsencode(site.ep_buffer) in args for args in flushed)
    assert not (report.committed() == ["x/b.fits"] and not buffer_flushed), (
        "M for a file in a directory whose own entry was never flushed",
        endpoint_files(site),
    )


def test_the_slot_lock_descriptor_that_cannot_be_opened_is_an_x_record_not_a_lost_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`exec 9<.` is a redirection on a special built-in: when it fails (here: descriptor 9
    over the open-files limit) bash as sh ends at once, with no X record and no end record,
    and the daemon takes a commit that never started for a lost reply."""
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "shbin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which("bash"))
    from tests.test_endpoint_script import Site

    remote = f'env PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin prlimit --nofile=9 sh -c "{{command}}"'
    site = Site(tmp_path / "site", remote=remote)
    slot = site.slot()
    f = site.local("d/a.fits", b"a")
    stage(slot, f.basename, b"a")
    report = run_batch(site, slot, [f])
    assert report.committed() == []
    assert report.unknown == [], report.error
    assert "exit status 92" in (report.error or ""), report.error
