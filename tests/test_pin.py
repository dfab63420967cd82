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
