"""The single-instance lock: one per buffer, outside holding, whatever the holding area."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from hdfmgr.lock import InstanceLock, LockBusy, buffer_key, holder, lock_path
from tests.site import Site, wait_for


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path / "site")


def test_a_purge_of_holding_does_not_let_a_second_watcher_start(site: Site) -> None:
    daemon = site.start()
    try:
        site.write("a.fits", b"a")
        wait_for(lambda: site.held() == {"a.fits": b"a"}, 20, "first file held")
        # The operator purges holding by age: everything in it goes.
        shutil.rmtree(site.holding)
        site.holding.mkdir()
        second = site.hdfmgr("run", str(site.config_path), timeout=30)
        assert second.returncode == 75, second.stderr
        assert "already running" in second.stderr
        assert f"pid {daemon.proc.pid}" in second.stderr
    finally:
        assert daemon.stop() == 0


def test_two_configs_on_one_buffer_with_different_holding_areas(site: Site, tmp_path: Path) -> None:
    other_holding = tmp_path / "other-holding"
    other_holding.mkdir()
    data = yaml.safe_load(site.config_path.read_text())
    # The same buffer, spelled through a symbolic link, with a holding area of its own.
    link = tmp_path / "buffer-link"
    link.symlink_to(site.buffer)
    data["handoff"] = {"buffer": str(link), "holding": str(other_holding)}
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data))
    daemon = site.start()
    try:
        second = site.hdfmgr("run", str(other), timeout=30)
        assert second.returncode == 75, second.stderr
        assert "already running" in second.stderr
    finally:
        assert daemon.stop() == 0
    assert not any(other_holding.iterdir())


def test_lock_is_keyed_by_the_real_path_and_released_on_close(tmp_path: Path) -> None:
    buffer = tmp_path / "buffer"
    buffer.mkdir()
    (tmp_path / "alias").symlink_to(buffer)
    assert buffer_key(buffer) == buffer_key(tmp_path / "alias") == buffer_key(f"{buffer}/")
    assert not lock_path(buffer).startswith(str(tmp_path))
    with InstanceLock(lock_path(buffer)):
        assert holder(buffer) is not None
        with pytest.raises(LockBusy):
            InstanceLock(lock_path(tmp_path / "alias")).acquire()
    assert holder(buffer) is None


def test_a_second_pipeline_with_another_lock_directory_is_refused(site: Site, tmp_path: Path) -> None:
    """A service given ``HDFMGR_LOCK_DIR`` and an operator's shell without it take lock files
    in two places: the buffer directory's own lock still keeps the second pipeline out (before,
    the rescan ran its own pipeline beside the watcher: files sent twice)."""
    daemon = site.start()
    try:
        wait_for(daemon.started, 20, "the watcher")
        other = tmp_path / "other-lock-dir"
        second = site.hdfmgr("rescan", str(site.config_path), env={"HDFMGR_LOCK_DIR": str(other)}, timeout=30)
        assert second.returncode == 75, second.stderr
        assert "already running" in second.stderr
    finally:
        assert daemon.stop() == 0
