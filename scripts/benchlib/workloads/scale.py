"""Scale: 100,000 known files waiting, daemon restarted (start-up, no re-hashing, memory)."""

from __future__ import annotations

import os
import re
import shutil

from ..context import Bench
from ..site import Daemon, Site, Transport
from ..util import KiB, count_files, now, vm_hwm_kib, wait_until
from . import Workload


def scale(b: Bench) -> None:
    """100,000 known files: restart time, no re-hashing, memory with all of them waiting."""
    sizes = b.sizes
    n = sizes.scale_dirs * sizes.scale_per_dir
    site = Site(b.work / "scale")
    for d in range(sizes.scale_dirs):
        directory = site.buffer / f"night{d:03d}"
        directory.mkdir()
        for i in range(sizes.scale_per_dir):
            (directory / f"img{i:05d}.fits").write_bytes(os.urandom(4 * KiB))
    failing = Transport("failing", "false {batch} {dest}", 'sh -c "{command}"')
    general = {"retry_initial": 0.5, "retry_max": 2.0}
    site.configure(failing, level="DEBUG", **general)
    # Populate: every file registered and hashed once; every transfer fails, so all stay.
    daemon = Daemon(site, b.env(None))
    t0 = now()
    populated = wait_until(
        lambda: (
            site.db.exists()
            and site.count_or_zero("select count(*) from files where checksum is not null") >= n
        ),
        900,
        0.5,
    )
    populate_seconds = now() - t0
    daemon.stop()
    rows_before = site.query("select count(*) from files")[0][0]
    hashed_first = daemon.output().count("DEBUG hdfmgr.checksum: hashed ")
    if not populated:
        b.fail(f"scale: only {site.query('select count(*) from files')[0][0]} of {n} registered")
    b.record(
        workload="scale",
        method="populate",
        files=n,
        rows=rows_before,
        seconds=round(populate_seconds, 3),
        hashes=hashed_first,
        ok=bool(populated),
        problems=[],
    )
    for rep in range(b.reps):
        site.log.write_text("")
        max_batch = site.query("select coalesce(max(id), 0) from batches")[0][0]
        daemon = Daemon(site, b.env(None))
        started = wait_until(daemon.started_at, 120, 0.02)
        rss_started = vm_hwm_kib(daemon.pid)
        # Let the failed files come back from their retry delay and go out again.
        wait_until(
            lambda m=max_batch: site.query(f"select count(*) from batches where id > {m}")[0][0] >= 4,
            60,
            0.25,
        )
        rss = vm_hwm_kib(daemon.pid)
        daemon.stop()
        out = daemon.output()
        scans = [float(m) for m in re.findall(r"scan: \d+ entries, ([0-9.]+) s", out)]
        rehashed = out.count("DEBUG hdfmgr.checksum: hashed ")
        rows = site.query("select count(*) from files")[0][0]
        batches = site.query(f"select count(*) from batches where id > {max_batch}")[0][0]
        problems = []
        if rows != rows_before:
            problems.append(f"{rows - rows_before} file rows added on restart (files re-registered)")
        if rehashed:
            problems.append(f"{rehashed} file(s) re-hashed on restart")
        if count_files(site.buffer) != n:
            problems.append("files left the buffer")
        if problems:
            b.fail(f"scale rep {rep}: {'; '.join(problems)}")
        b.record(
            workload="scale",
            method="restart",
            rep=rep,
            files=n,
            startup_seconds=started and round(started, 3),
            scan_seconds=scans[0] if scans else None,
            rehashed=rehashed,
            batches_after_restart=batches,
            peak_rss_mb=round(rss / 1024, 1) if rss else None,
            rss_at_start_mb=round(rss_started / 1024, 1) if rss_started else None,
            ok=not problems,
            problems=problems,
        )
    if not b.args.keep:
        shutil.rmtree(site.root, ignore_errors=True)


WORKLOADS = [Workload("scale", scale, order=40)]
