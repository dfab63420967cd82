"""The backlog drains: 10,000 x 4 KiB in 100 directories ("backlog", with the database-write
count) and 20 x 64 MiB ("big", with the hashing comparison), against every reference."""

from __future__ import annotations

from pathlib import Path

from ..context import Bench
from ..references import run_bound, run_floor, run_ideal_ssh, run_lsyncd, run_naive
from . import Workload
from .dbcount import dbcount
from .hashing import hashing


def drain(b: Bench, workload: str, tree: tuple[Path, dict[str, str]], *, big: bool) -> None:
    local = b.transport("local")
    ssh_names = ["scp+share", "rsync+share", "scp", "rsync", "stream"]
    if b.quick:
        ssh_names = ["scp+share", "rsync"]
    for rep in range(b.reps):
        run_floor(b, workload, "rsync", rep, tree)
        run_floor(b, workload, "cp", rep, tree)
        if not big:
            run_bound(b, workload, rep, tree)
            run_bound(b, workload, rep, tree, guarded=True)
        if not b.quick:
            b.run_hdfmgr(workload, local, rep, tree=tree)
        run_naive(b, workload, "local", rep, tree)
        if b.lsyncd:
            run_lsyncd(b, workload, "rsync", rep, tree=tree)
        if b.args.no_ssh:
            continue
        run_floor(b, workload, "rsync-ssh", rep, tree)
        run_floor(b, workload, "scp", rep, tree)
        if not big:
            run_ideal_ssh(b, workload, rep, tree)
        for name in ssh_names:
            if not b.quick:
                b.run_hdfmgr(workload, b.transport(name), rep, tree=tree)
        if not big or b.quick:
            run_naive(b, workload, "scp", rep, tree, share=True)
            if not b.quick:
                run_naive(b, workload, "scp", rep, tree, share=False)
        if b.lsyncd and (not big or b.quick):
            run_lsyncd(b, workload, "rsync-ssh", rep, tree=tree)
    # One more run of each hdfmgr configuration through the PATH shim: processes spawned.
    b.run_hdfmgr(workload, local, 0, tree=tree, count=True)
    if not b.args.no_ssh:
        for name in ssh_names:
            b.run_hdfmgr(workload, b.transport(name), 0, tree=tree, count=True)


def small(b: Bench) -> None:
    s = b.sizes
    tree = b.cached_tree(
        f"small-{s.backlog_dirs}x{s.backlog_per_dir}", s.backlog_dirs, s.backlog_per_dir, s.backlog_size
    )
    drain(b, "backlog small", tree, big=False)
    dbcount(b, tree)


def big(b: Bench) -> None:
    s = b.sizes
    tree = b.cached_tree(f"big-{s.big_count}x{s.big_size}", 1, s.big_count, s.big_size)
    drain(b, "backlog big", tree, big=True)
    hashing(b, tree)


WORKLOADS = [Workload("backlog", small, order=10), Workload("big", big, order=20)]
