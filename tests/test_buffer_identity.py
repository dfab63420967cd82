"""Regression test, found while testing over SSH: the watcher must not take ordinary activity
in the buffer for a replaced buffer directory.

The watcher's buffer check (``Watcher.check_buffer``) used to identify the buffer by
``(st_ino, st_ctime_ns)``. A directory's ctime changes whenever an entry is created, renamed
or removed in it, so every file written into the buffer's top level, and every file moved from
it to holding, was reported as "buffer ... was replaced or its watch stopped; watching it
again": a WARNING, an observer restart and a full rescan per batch. (Now ``(st_dev, st_ino)``.)"""

from __future__ import annotations

from pathlib import Path

from tests.site import Site, wait_for


def test_files_coming_and_going_do_not_look_like_a_replaced_buffer(tmp_path: Path) -> None:
    site = Site(tmp_path)
    daemon = site.start()
    try:
        files = {f"f{i}.fits": b"x" * i for i in range(3)}
        site.write_many(files)
        wait_for(lambda: site.held() == files, 20, "delivery")
    finally:
        assert daemon.stop() == 0
    output = daemon.output()
    assert "was replaced or its watch stopped" not in output, output
    assert "is back; watching it again" not in output, output
