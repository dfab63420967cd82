"""The rescan progress line: pure rendering, and a real rescan on a terminal (a pty)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from hdfmgr.progress import render
from tests.site import Site


def test_render_counts_rate_and_eta() -> None:
    line = render(done=50, done_bytes=50_000_000, waiting=150, waiting_bytes=150_000_000, elapsed=10.0)
    assert line == "rescan: 50/200 files, 50.0 MB/200.0 MB, 5.0 MB/s, ETA 30 s"
    assert render(0, 0, 10, 0, 0.0).endswith("ETA ?")
    assert render(10, 0, 0, 0, 1.0).endswith("ETA 0 s")


def test_rescan_on_a_terminal_shows_progress_and_a_summary(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.configure(transfer="sh -c 'sleep 0.3; cp \"$@\"' sh {batch} {dest}", num_threads=1, chunk_size=5)
    site.write_many({f"p/{i:02d}.fits": b"x" * 1000 for i in range(20)})
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hdfmgr", "rescan", str(site.config_path)],
            stdout=subprocess.PIPE,
            stderr=secondary,
            timeout=60,
            env={**os.environ},
        )
        os.close(secondary)
        chunks = []
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(primary)
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert proc.returncode == 0
    assert "rescan: " in terminal and "/20 files" in terminal and "MB/s" in terminal
    assert b"rescan: 20 delivered" in proc.stdout
