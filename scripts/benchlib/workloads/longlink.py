"""The long link: every ssh connection through the relay (``--rtt MS``, default 100).

Three workloads, each against the floor measured in the same run:

* ``visit``: one camera visit already in the buffer (189 x 256 KiB);
* ``bigvisit``: a big visit (24 x 32 MiB);
* ``slowtrickle``: a camera closing 1 MiB files at 2 files/s; latency from close to the endpoint
  buffer (p50, p95), as a daemon sees a night.

The floor: P parallel cold ``tar c | ssh 'tar x'`` streams into P staging directories (the
files balanced by bytes), then one ``ssh`` running the ``mv`` into the endpoint buffer, where
P is the number of slots (``general.num_threads``). It pays new connections and no
verification, records or holding; a daemon with warm connections could beat it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

from ..consumer import ArrivalWatcher
from ..context import Bench
from ..site import Site
from ..transports import Link
from ..util import now
from . import Workload
from .trickle import make_writer

#: Slots: hdfmgr's default ``general.num_threads``, which the runs keep.
SLOTS = 2
#: Transports measured over the long link unless ``--transports`` says otherwise: the built-in
#: stream, rsync with connection sharing, and the seed's own ``scp -Bpq {batch}`` template.
DEFAULT_TRANSPORTS = ("stream", "rsync+share", "scp")
FLOOR = "floor tar→ssh"


def balanced(rels: list[str], sizes: dict[str, int], parts: int) -> list[list[str]]:
    """``rels`` in ``parts`` groups of about equal bytes (largest first, each to the lightest)."""
    groups: list[list[str]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for rel in sorted(rels, key=lambda r: (-sizes[r], r)):
        i = loads.index(min(loads))
        groups[i].append(rel)
        loads[i] += sizes[rel]
    return [sorted(g) for g in groups if g]


def run_tar_floor(
    b: Bench, workload: str, rep: int, tree: tuple[Path, dict[str, str]], link: Link
) -> dict[str, Any]:
    """P cold ``tar | ssh tar`` streams at once, then one ``ssh`` with the ``mv``s."""
    tag = f"{workload}-floor-{rep}"
    site = Site(b.work / tag)
    b.link_tree(tree[0], tree[1], site.buffer)
    rels = sorted(tree[1])
    sizes = {r: os.path.getsize(site.buffer / r) for r in rels}
    groups = balanced(rels, sizes, SLOTS)
    server = link.server
    ssh = [*b.ssh_argv(False, server), "--", server.destination]
    watcher = ArrivalWatcher(site.ep_buffer)
    watcher.start()
    watcher.expect(len(rels))
    problems: list[str] = []
    t0 = now()
    streams = []
    for i, group in enumerate(groups):
        slot = f"{site.staging}/floor.{i}"
        tar = subprocess.Popen(
            ["tar", "-C", str(site.buffer), "-cf", "-", "--", *group], stdout=subprocess.PIPE
        )
        untar = f"mkdir -p {shlex.quote(slot)} && tar -C {shlex.quote(slot)} -xf -"
        streams.append((tar, subprocess.Popen([*ssh, untar], stdin=tar.stdout, stderr=subprocess.PIPE)))
        assert tar.stdout is not None
        tar.stdout.close()  # the ssh holds it now
    for tar, untar in streams:
        _, err = untar.communicate()
        if tar.wait() != 0 or untar.returncode != 0:
            problems.append(f"stream failed: {err[-300:]!r}")
    script = []
    for top in sorted({os.path.dirname(r) for r in rels}):
        script.append(shlex.join(["mkdir", "-p", "--", f"{site.ep_buffer}/{top}"]))
    for i, group in enumerate(groups):
        by_top: dict[str, list[str]] = {}
        for r in group:
            by_top.setdefault(os.path.dirname(r), []).append(f"{site.staging}/floor.{i}/{r}")
        script += [
            shlex.join(["mv", "-t", f"{site.ep_buffer}/{top}", "--", *ps]) for top, ps in by_top.items()
        ]
    mv = subprocess.run([*ssh, "sh"], input="\n".join(script).encode(), capture_output=True, check=False)
    if mv.returncode != 0:
        problems.append(f"mv failed: {mv.stderr[-300:]!r}")
    arrived = watcher.complete.wait(120)
    elapsed = (max(watcher.arrivals.values()) if watcher.arrivals else now()) - t0
    watcher.stop()
    if not arrived:
        problems.append(f"only {watcher.count()} of {len(rels)} arrived")
    return b.finish_reference(
        site, tag, problems, elapsed, workload=workload, method=FLOOR, family="tar-ssh", rep=rep,
        files=len(rels), streams=len(groups), rtt_ms=link.rtt_ms,
    )  # fmt: skip


def transports(b: Bench) -> list[str]:
    if b.args.transports:
        return b.args.transports.split(",")
    return ["stream", "rsync+share"] if b.quick else list(DEFAULT_TRANSPORTS)


def drain(b: Bench, workload: str, tree: tuple[Path, dict[str, str]]) -> None:
    link = b.link(b.rtt_ms)
    for rep in range(b.reps):
        run_tar_floor(b, workload, rep, tree, link)
        for name in transports(b):
            b.run_hdfmgr(workload, b.transport(name, b.rtt_ms), rep, tree=tree)


def visit(b: Bench) -> None:
    s = b.sizes
    drain(
        b,
        "long visit",
        b.cached_tree(f"visit-{s.visit_count}x{s.visit_size}", 1, s.visit_count, s.visit_size),
    )


def bigvisit(b: Bench) -> None:
    s = b.sizes
    tree = b.cached_tree(
        f"bigvisit-{s.bigvisit_count}x{s.bigvisit_size}", 1, s.bigvisit_count, s.bigvisit_size
    )
    drain(b, "long big visit", tree)


def slowtrickle(b: Bench) -> None:
    s = b.sizes
    workload = f"long trickle {s.slow_rate:g}/s"
    writer = make_writer(s.slow_rate, s.slow_seconds, s.slow_size)
    for rep in range(b.reps):
        for name in transports(b):
            b.run_hdfmgr(workload, b.transport(name, b.rtt_ms), rep, writer=writer)


WORKLOADS = [
    Workload("visit", visit, order=50, ssh=True),
    Workload("bigvisit", bigvisit, order=51, ssh=True, quick=False),
    Workload("slowtrickle", slowtrickle, order=52, ssh=True, quick=False),
]
