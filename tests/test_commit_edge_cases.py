"""The commit program's move step and its receipt at their edges, against a local endpoint.

A staged copy deleted before its mv by someone else while the commit is killed before its
outcomes are written; group sizes at the list growth boundary split over several xargs runs;
a final directory on another filesystem (mv would copy, not rename); a final directory an
earlier commit made but was killed before flushing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_commit_holes import (
    endpoint_files,
    fake_tools,
    faked_site,
    listed_outcome,
    run_batch,
    staged,
    sync_refusing,
)
from tests.test_commit_move_step import tmpfs
from tests.test_endpoint_script import Site, stage

#: A sync that ends the move step (its shell, killed) when asked to flush after the renames
#: (the slot directory "." is among its arguments only then): a commit killed in that flush.
KILLED_IN_FLUSH = 'for a; do [ "$a" != . ] || {{ kill -9 $PPID; exit 1; }}; done; exec {real} "$@"'


def test_a_copy_deleted_before_its_mv_in_a_commit_killed_in_the_flush_is_not_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tmp cleaner deletes b.fits after the commit listed staging and wrote its I record,
    before mv; mv renames a.fits and fails on b.fits; the commit is then killed in the flush
    after the renames (before any outcome is written). The listing after the lost reply finds
    I(b.fits) with no outcome and b.fits gone from staging, and must not take that as moved:
    b.fits is in no endpoint buffer."""
    monkeypatch.chdir(tmp_path)
    real_mv, real_sync = shutil.which("mv"), shutil.which("sync")
    bin_dir = fake_tools(
        tmp_path,
        {
            "mv": f'[ "$1" != -n ] || rm -f ./b.fits; exec {real_mv} "$@"',
            "sync": KILLED_IN_FLUSH.format(real=real_sync),
        },
    )
    site = faked_site(tmp_path / "site", bin_dir)
    (site.ep_buffer / "d").mkdir()
    slot, files = staged(site, ("d/a.fits", "d/b.fits"))
    report = run_batch(site, slot, files)
    assert report.committed() == []
    assert endpoint_files(site) == {"d/a.fits": b"d/a.fits"}
    moved, resend = listed_outcome(site, slot, files)
    assert "d/b.fits" not in moved, "a copy deleted in staging is recorded delivered: lost"
    assert resend == ["d/b.fits"]


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_groups_at_the_list_growth_boundary_split_over_xargs_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shell: str
) -> None:
    """Groups of 1, 63, 64, 65, 127, 128 and 129 names, long names, a 128 KiB argument
    limit: several groups split over xargs runs; some final names taken, some staged copies
    deleted before mv. Every name gets exactly its outcome."""
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "shbin"
    bin_dir.mkdir()
    (bin_dir / "sh").symlink_to(shutil.which(shell))
    real_mv = shutil.which("mv")
    (bin_dir / "mv").write_text(f'#!/bin/sh\n[ "$1" != -n ] || rm -f ./*-gone; exec {real_mv} "$@"\n')
    (bin_dir / "mv").chmod(0o755)
    remote = f'env PATH={bin_dir}:/usr/local/bin:/usr/bin:/bin prlimit --stack=262144 sh -c "{{command}}"'
    site = Site(tmp_path / "site", remote=remote)
    slot = site.slot()
    rels = []
    for g, size in enumerate([1, 63, 64, 65, 127, 128, 129, 64, 63]):
        for i in range(size):
            kind = "-taken" if i % 17 == 5 else "-gone" if i % 23 == 7 else ""
            rels.append(f"g{g} dir\nx/{g:02d}{i:04d}-" + "y" * 180 + kind)
    files = []
    for rel in rels:
        f = site.local(rel, os.fsencode(rel))
        stage(slot, f.basename, os.fsencode(rel))
        files.append(f)
        if rel.endswith("-taken"):
            p = site.ep_buffer / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"earlier")
    report = run_batch(site, slot, files)
    assert report.unknown == [], report.error
    expect = {
        "committed": sorted(r for r in rels if not r.endswith(("-taken", "-gone"))),
        "waiting": sorted(r for r in rels if r.endswith("-taken")),
        "failed": sorted(r for r in rels if r.endswith("-gone")),
    }
    got: dict[str, list[str]] = {k: [] for k in expect}
    for rel, (outcome, _) in report.outcomes.items():
        got.setdefault(outcome, []).append(rel)
    assert {k: sorted(v) for k, v in got.items()} == expect
    on_disk = endpoint_files(site)
    for rel in expect["committed"]:
        assert on_disk[rel] == os.fsencode(rel)
    for rel in expect["failed"]:
        assert rel not in on_disk


def test_a_final_directory_on_another_filesystem_gets_no_copy_reported_as_a_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint buffer's d is a symlink to a directory on another filesystem (or a mount
    point): mv would copy the file there, the final name appearing before its data is whole,
    and the endpoint manager could ingest it half-written. Never reported M for a copy: a
    delivery is a rename (the same inode), or the file stays staged."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path / "site")
    with tmpfs(tmp_path / "other", "size=4m") as other:
        (other / "d").mkdir()
        (site.ep_buffer / "d").symlink_to(other / "d")
        (site.ep_buffer / "e").mkdir()
        slot, files = staged(site, ("d/a.fits", "e/b.fits"))
        inodes = {f.rel: os.stat(os.path.join(slot, f.basename)).st_ino for f in files}
        report = run_batch(site, slot, files)
        for rel in report.committed():
            st = os.stat(site.ep_buffer / rel)
            assert (st.st_dev, st.st_ino) == (os.stat(slot).st_dev, inodes[rel]), (
                f"{rel} reported delivered, but it was copied, not renamed"
            )
        assert report.committed() == ["e/b.fits"]
        assert report.outcomes["d/a.fits"][0] == "failed"
        assert not (other / "d" / "a.fits").exists()
        assert os.path.exists(os.path.join(slot, "a.fits"))


def test_a_directory_made_by_a_commit_killed_before_its_flush_is_not_taken_as_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commit 1 makes the new final directory x, and is killed (its whole process group) in
    the flush of x with the buffer it was made in. Commit 2 (sent again after the listing)
    finds x existing, renames x/b.fits into it and reports M having flushed x and the slot
    only: x's own entry in the buffer was never flushed, and a power cut can take x and the
    delivered file away."""
    monkeypatch.chdir(tmp_path)
    buffer = tmp_path / "site" / "endpoint" / "buffer"
    log, once = tmp_path / "flushed", tmp_path / "killed-once"
    real = shutil.which("sync")
    body = (
        f'for a; do [ "$a" != {buffer / "x"} ] || [ -e {once} ] || {{ touch {once}; kill -9 0; }}; done\n'
        f'{real} "$@" || exit $?\nprintf "%s\\000" "$@" >>{log}; printf "\\n" >>{log}'
    )
    site = faked_site(tmp_path / "site", fake_tools(tmp_path, {"sync": body}))
    slot0, (a,) = staged(site, ("x/a.fits",))
    report = run_batch(site, slot0, [a])
    assert report.committed() == [] and (buffer / "x").is_dir() and once.exists()
    log.unlink(missing_ok=True)
    b = site.local("x/b.fits", b"b")
    slot1 = site.slot(1)
    stage(slot1, b.basename, b"b")
    report = run_batch(site, slot1, [b])
    flushed = [set(line.split(b"\0")) for line in log.read_bytes().split(b"\n") if line]
    buffer_flushed = any(os.fsencode(buffer) in args for args in flushed)
    assert not (report.committed() == ["x/b.fits"] and not buffer_flushed), (
        "M for a file in a directory whose own entry was never flushed",
        flushed,
    )


def test_only_the_group_of_a_final_directory_elsewhere_stays_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A final directory elsewhere whose name holds a space and a newline, beside one that
    cannot be made and two plain ones: the one elsewhere and the missing one are F, the
    others renamed (each checked on its own once any directory is not on the slot's
    filesystem)."""
    monkeypatch.chdir(tmp_path)
    site = Site(tmp_path / "site")
    odd = "far \naway"
    with tmpfs(tmp_path / "other", "size=4m") as other:
        (other / "d").mkdir()
        (site.ep_buffer / odd).symlink_to(other / "d")
        (site.ep_buffer / "blocked").write_bytes(b"a file where a directory should be")
        (site.ep_buffer / "e").mkdir()
        slot, files = staged(site, (f"{odd}/a.fits", "blocked/b.fits", "e/c.fits", "new/d.fits"))
        report = run_batch(site, slot, files)
        assert sorted(report.committed()) == ["e/c.fits", "new/d.fits"]
        assert report.outcomes[f"{odd}/a.fits"][0] == "failed"
        assert report.outcomes["blocked/b.fits"][0] == "failed"
        assert list((other / "d").iterdir()) == []
        assert sorted(os.listdir(slot)) == ["a.fits", "b.fits"]
        assert (site.ep_buffer / "e" / "c.fits").read_bytes() == b"e/c.fits"


def test_a_directory_above_the_final_ones_that_cannot_be_flushed_does_not_stop_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The directories above an existing final directory are flushed as far as they can be:
    one that cannot be (here the endpoint buffer itself) leaves the delivery as it was."""
    monkeypatch.chdir(tmp_path)
    buffer = tmp_path / "site" / "endpoint" / "buffer"
    site = faked_site(tmp_path / "site", fake_tools(tmp_path, {"sync": sync_refusing(buffer)}))
    (site.ep_buffer / "x").mkdir()
    slot, files = staged(site, ("x/a.fits",))
    report = run_batch(site, slot, files)
    assert report.committed() == ["x/a.fits"]
    assert (site.ep_buffer / "x" / "a.fits").read_bytes() == b"x/a.fits"
