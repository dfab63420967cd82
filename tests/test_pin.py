"""Unit tests for hdfmgr.pin: the file sent is the file registered, links never followed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from hdfmgr import pin
from hdfmgr.settle import Snapshot


def registered(path: Path) -> Snapshot:
    st = os.lstat(path)
    return Snapshot(st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, str]:
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    return buffer, pin.slot_dir(pin.pin_root(str(buffer), str(tmp_path)), 0)


def test_pin_links_the_registered_inode(layout: tuple[Path, str]) -> None:
    buffer, slot = layout
    src = buffer / "a.fits"
    src.write_bytes(b"data")
    pinned = pin.pin(str(src), slot, registered(src))
    assert os.path.samefile(pinned, src) and os.path.basename(pinned) == "a.fits"
    assert os.stat(slot).st_mode & 0o777 == 0o700
    pin.release(slot)
    assert os.listdir(slot) == [] and src.exists()


def test_a_symlink_in_place_of_the_registered_file_is_not_pinned(
    layout: tuple[Path, str], tmp_path: Path
) -> None:
    buffer, slot = layout
    src = buffer / "a.fits"
    src.write_bytes(b"data")
    sent = registered(src)
    secret = tmp_path / "secret"
    secret.write_bytes(b"secret")
    src.unlink()
    src.symlink_to(secret)
    with pytest.raises(pin.NotRegistered):
        pin.pin(str(src), slot, sent)
    assert os.listdir(slot) == []


def test_another_file_under_the_registered_name_is_not_pinned(layout: tuple[Path, str]) -> None:
    buffer, slot = layout
    src = buffer / "a.fits"
    src.write_bytes(b"data")
    sent = registered(src)
    src.write_bytes(b"more data")
    with pytest.raises(pin.NotRegistered):
        pin.pin(str(src), slot, sent)


def test_protected_hardlinks_fall_back_to_a_checked_private_copy(
    layout: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fs.protected_hardlinks refuses links to another user's file the daemon cannot write."""
    buffer, slot = layout
    src = buffer / "a.fits"
    src.write_bytes(b"data" * 1000)
    sent = registered(src)

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pin.os, "link", refuse)
    pinned = pin.pin(str(src), slot, sent)
    assert Path(pinned).read_bytes() == b"data" * 1000
    assert not os.path.samefile(pinned, src)
    assert pin.intact(pinned, sent)
    pin.release(slot)
    # And a swapped-in link is refused there too (opened without following it).
    secret = buffer.parent / "secret"
    secret.write_bytes(b"secret")
    src.unlink()
    src.symlink_to(secret)
    with pytest.raises(pin.NotRegistered):
        pin.pin(str(src), slot, sent)
    assert os.listdir(slot) == []


def test_pins_go_on_the_buffers_filesystem(tmp_path: Path) -> None:
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    assert pin.pin_root(str(buffer), str(tmp_path)) == os.path.join(tmp_path, pin.PIN_DIR)
    assert pin.pin_root(str(buffer), "/proc") == os.path.join(buffer, pin.PIN_DIR)


def test_a_pin_directory_it_cannot_write_is_not_the_files_fault(tmp_path: Path) -> None:
    """A pin directory left by another account (a rescan run as root) refuses the pin: that is
    a failure of the pin, retried, never the file's "unreadable" (which quarantines at once)."""
    from hdfmgr import deliver

    src = tmp_path / "buffer" / "a.fits"
    src.parent.mkdir()
    src.write_bytes(b"abc")
    blocked = tmp_path / "pins"
    blocked.write_bytes(b"")  # not a directory: the pin cannot be made there
    files = [deliver.StagedFile("a.fits", str(src), 3)]
    job = deliver.BatchJob(
        1, 0, "slot", files, {"a.fits": registered(src)}, prepare=False, pin_dir=str(blocked / "0")
    )
    report = deliver.BatchReport(job, 0.0)
    assert deliver._pin(job, report) == []
    outcome, reason = report.outcomes["a.fits"]
    assert outcome == deliver.FAILED and str(blocked) in reason


def test_only_a_permission_refused_read_is_the_files_own_fault() -> None:
    from hdfmgr import deliver

    assert deliver._read_outcome(PermissionError(errno.EACCES, "Permission denied")) == deliver.UNREADABLE
    for code in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT):
        assert deliver._read_outcome(OSError(code, os.strerror(code))) == deliver.FAILED
