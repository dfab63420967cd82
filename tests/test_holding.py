"""Unit tests for hdfmgr.holding: move to holding without overwriting; prune the buffer."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from hdfmgr import holding
from hdfmgr.holding import HoldError, hold, prune_empty_dirs


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    buffer = tmp_path / "buffer"
    held = tmp_path / "holding"
    buffer.mkdir()
    held.mkdir()
    return buffer, held


def put(root: Path, rel: str, data: bytes) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- hold


def test_hold_moves_to_the_same_relative_path(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    src = put(buffer, "2024/night 1/img.fits", b"data")
    st = src.stat()
    rel = hold(str(buffer), str(held), "2024/night 1/img.fits")
    assert rel == "2024/night 1/img.fits"
    assert not src.exists()
    assert (held / rel).read_bytes() == b"data"
    assert (held / rel).stat().st_mtime_ns == st.st_mtime_ns  # a rename, not a copy
    assert (buffer / "2024" / "night 1").is_dir()  # the buffer's directories stay (pruned later)


def test_hold_at_the_top_level(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    put(buffer, "top.fits", b"x")
    assert hold(str(buffer), str(held), "top.fits") == "top.fits"
    assert files_under(held) == {"top.fits": b"x"}


def test_hold_never_overwrites(dirs: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    buffer, held = dirs
    results = []
    for version in (b"first", b"second", b"third"):
        put(buffer, "d/img.fits", version)
        results.append(hold(str(buffer), str(held), "d/img.fits"))
    assert results == ["d/img.fits", "d/img.fits.1", "d/img.fits.2"]
    assert files_under(held) == {"d/img.fits": b"first", "d/img.fits.1": b"second", "d/img.fits.2": b"third"}
    assert files_under(buffer) == {}
    assert sum("kept both" in r.getMessage() for r in caplog.records) == 2


def test_hold_skips_taken_suffixes(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    put(held, "img", b"old")
    put(held, "img.1", b"old1")
    (held / "img.2").mkdir()  # even a directory with that name is never replaced
    put(buffer, "img", b"new")
    assert hold(str(buffer), str(held), "img") == "img.3"
    assert (held / "img").read_bytes() == b"old"
    assert (held / "img.1").read_bytes() == b"old1"
    assert (held / "img.3").read_bytes() == b"new"


def test_hold_finishes_a_move_interrupted_after_the_link(dirs: tuple[Path, Path]) -> None:
    """Killed between link and unlink: the next hold sees the same file and completes the move."""
    buffer, held = dirs
    src = put(buffer, "d/img", b"x")
    (held / "d").mkdir()
    os.link(src, held / "d" / "img")
    assert hold(str(buffer), str(held), "d/img") == "d/img"
    assert not src.exists()
    assert files_under(held) == {"d/img": b"x"}


def test_hold_hostile_names(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    names = ["-rf", "a b 'c' \"d\"", "$(touch pwned)", "new\nline", os.fsdecode(b"raw-\xff\xfe"), "{dest}"]
    for name in names:
        put(buffer, f"sub/{name}", name.encode("utf-8", "surrogateescape"))
        assert hold(str(buffer), str(held), f"sub/{name}") == f"sub/{name}"
    assert sorted(os.listdir(held / "sub")) == sorted(names)
    assert not any(p.name == "pwned" for p in held.parent.rglob("*"))


def test_hold_missing_source_raises_and_leaves_nothing(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    with pytest.raises(HoldError):
        hold(str(buffer), str(held), "d/absent.fits")
    assert files_under(held) == {}


def test_hold_directory_blocked_by_a_file(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    put(held, "d", b"a file where a directory should be")
    src = put(buffer, "d/img", b"x")
    with pytest.raises(HoldError):
        hold(str(buffer), str(held), "d/img")
    assert src.read_bytes() == b"x"  # stays in the buffer


def test_hold_across_filesystems(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """When link() says EXDEV the file is copied beside its target first, then linked."""
    buffer, held = dirs
    real_link = os.link

    def link(src: str, dst: str, **kwargs: bool) -> None:
        if src.startswith(str(buffer)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(holding.os, "link", link)
    put(held, "d/img", b"old")
    put(buffer, "d/img", b"new")
    assert hold(str(buffer), str(held), "d/img") == "d/img.1"
    assert files_under(held) == {"d/img": b"old", "d/img.1": b"new"}  # no temporary file left
    assert files_under(buffer) == {}


# --------------------------------------------------------------------------- prune


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_prune_removes_old_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    age(tmp_path / "old", 3600)
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 1
    assert not (tmp_path / "old").exists()
    assert tmp_path.is_dir()


def test_prune_keeps_recent_empty_directories(tmp_path: Path) -> None:
    (tmp_path / "fresh").mkdir()
    age(tmp_path / "fresh", 10)
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 0
    assert (tmp_path / "fresh").is_dir()


def test_prune_keeps_non_empty_directories(tmp_path: Path) -> None:
    put(tmp_path, "full/img.fits", b"x")
    (tmp_path / "full" / "sub").mkdir()
    put(tmp_path, "full/sub/deeper/img.fits", b"y")
    (tmp_path / "hidden").mkdir()
    put(tmp_path, "hidden/.dotfile", b"z")
    (tmp_path / "linkonly").mkdir()
    (tmp_path / "linkonly" / "dangling").symlink_to(tmp_path / "nowhere")
    for p in [
        tmp_path / "full",
        tmp_path / "full" / "sub",
        tmp_path / "full" / "sub" / "deeper",
        tmp_path / "hidden",
        tmp_path / "linkonly",
    ]:
        age(p, 3600)
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 0
    assert (tmp_path / "full" / "sub" / "deeper" / "img.fits").exists()
    assert (tmp_path / "hidden" / ".dotfile").exists()
    assert (tmp_path / "linkonly" / "dangling").is_symlink()


def test_prune_never_removes_the_root(tmp_path: Path) -> None:
    root = tmp_path / "buffer"
    root.mkdir()
    age(root, 10**6)
    assert prune_empty_dirs(str(root), older_than=0, now=time.time()) == 0
    assert root.is_dir()


def test_prune_does_not_follow_directory_links(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "empty").mkdir(parents=True)
    age(outside / "empty", 3600)
    root = tmp_path / "buffer"
    root.mkdir()
    (root / "link").symlink_to(outside)
    (root / "holder").mkdir()
    (root / "holder" / "dirlink").symlink_to(outside / "empty")
    age(root / "holder", 3600)
    assert prune_empty_dirs(str(root), older_than=600, now=time.time()) == 0
    assert (outside / "empty").is_dir()
    assert (root / "holder" / "dirlink").is_symlink()


def test_prune_nested_empty_directories(tmp_path: Path) -> None:
    """A whole emptied dated tree goes in one pass: removing a child refreshes its parent's
    mtime, but hdfmgr's own removal does not make the parent young."""
    (tmp_path / "night" / "raw" / "exposure").mkdir(parents=True)
    (tmp_path / "night" / "raw" / "other").mkdir()
    for p in [
        tmp_path / "night" / "raw" / "exposure",
        tmp_path / "night" / "raw" / "other",
        tmp_path / "night" / "raw",
        tmp_path / "night",
    ]:
        age(p, 3600)
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 4
    assert list(tmp_path.iterdir()) == []
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 0


def test_prune_spares_a_parent_young_in_its_own_right(tmp_path: Path) -> None:
    """An old empty child goes; a parent that is itself recent (a writer just used it) stays."""
    (tmp_path / "night" / "old").mkdir(parents=True)
    age(tmp_path / "night" / "old", 3600)
    age(tmp_path / "night", 10)
    assert prune_empty_dirs(str(tmp_path), older_than=600, now=time.time()) == 1
    assert (tmp_path / "night").is_dir()


def test_prune_mixed(tmp_path: Path) -> None:
    for name in ["old1", "old2", "young"]:
        (tmp_path / "night" / name).mkdir(parents=True)
    put(tmp_path, "night/kept.fits", b"x")
    age(tmp_path / "night" / "old1", 7200)
    age(tmp_path / "night" / "old2", 7200)
    assert prune_empty_dirs(str(tmp_path), older_than=3600, now=time.time()) == 2
    assert sorted(p.name for p in (tmp_path / "night").iterdir()) == ["kept.fits", "young"]


def test_prune_with_a_trailing_slash_still_spares_the_root(tmp_path: Path) -> None:
    age(tmp_path, 10**6)
    assert prune_empty_dirs(str(tmp_path) + "/", older_than=0, now=time.time()) == 0
    assert tmp_path.is_dir()


# --------------------------------------------------------------------------- the one holding path


def sent_version(path: Path) -> holding.Snapshot:
    st = os.lstat(path)
    return holding.Snapshot(st.st_size, st.st_mtime_ns, st.st_ino)


def test_hold_delivered_moves_the_version_sent(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    sent = sent_version(put(buffer, "d/img", b"x"))
    result = holding.hold_delivered(str(buffer), str(held), "d/img", sent, proven=False)
    assert result == holding.HoldResult(holding.Outcome.HELD, "d/img")
    assert files_under(held) == {"d/img": b"x"}


def test_hold_delivered_leaves_a_file_open_for_writing(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    path = put(buffer, "d/img", b"x")
    sent = sent_version(path)
    with open(path, "ab"):
        result = holding.hold_delivered(str(buffer), str(held), "d/img", sent, proven=False)
    assert result.outcome is holding.Outcome.WRITING
    assert path.exists() and files_under(held) == {}


def test_hold_delivered_leaves_a_changed_file(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    path = put(buffer, "d/img", b"x")
    sent = sent_version(path)
    path.write_bytes(b"xy")
    result = holding.hold_delivered(str(buffer), str(held), "d/img", sent, proven=True)
    assert result.outcome is holding.Outcome.CHANGED
    assert path.read_bytes() == b"xy" and files_under(held) == {}


def test_hold_delivered_without_a_lease_answer_waits(
    dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer, held = dirs
    path = put(buffer, "d/img", b"x")
    monkeypatch.setattr(holding, "open_for_writing", lambda path: None)
    result = holding.hold_delivered(str(buffer), str(held), "d/img", sent_version(path), proven=False)
    assert result.outcome is holding.Outcome.UNPROVEN
    assert path.exists()
    # A settle verdict is the proof the kernel could not give.
    result = holding.hold_delivered(str(buffer), str(held), "d/img", sent_version(path), proven=True)
    assert result.outcome is holding.Outcome.HELD


def test_hold_delivered_finds_a_file_moved_by_a_killed_run(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    path = put(buffer, "d/img", b"x")
    sent = sent_version(path)
    put(held, "d/img", b"another version")
    (held / "d").mkdir(exist_ok=True)
    os.link(path, held / "d" / "img.1")
    path.unlink()
    result = holding.hold_delivered(str(buffer), str(held), "d/img", sent, proven=False)
    assert result == holding.HoldResult(holding.Outcome.HELD, "d/img.1")


def test_hold_never_links_a_file_swapped_in_for_the_version_sent(dirs: tuple[Path, Path]) -> None:
    buffer, held = dirs
    path = put(buffer, "d/img", b"x")
    sent = sent_version(path)
    path.unlink()
    put(buffer, "d/img", b"x")  # same bytes, another inode
    with pytest.raises(holding.NotTheVersion):
        hold(str(buffer), str(held), "d/img", sent)
    assert files_under(held) == {}
