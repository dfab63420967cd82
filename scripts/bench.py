#!/usr/bin/env python3
"""Benchmark hdfmgr against the bulk-copy floor, the naive per-file way and lsyncd.

Run it through ``scripts/bench`` (which provides the project's virtualenv)::

    scripts/bench --quick        small sizes, one repetition, correctness only (< 1 minute)
    scripts/bench                the full run; writes docs/benchmarks.md
    scripts/bench --only backlog,trickle --reps 5
    scripts/bench --only visit,bigvisit,slowtrickle --rtt 100     the long link

Every measurement starts from a fresh site (buffer, holding, endpoint staging and buffer,
SQLite database, a configuration in the seed's format) and starts the real ``hdfmgr-watch`` as a
subprocess. The sites live on /dev/shm when it is a tmpfs (``--sites`` to choose): on a shared
disk, the disk's noise would swamp the ratios. A drain is timed from the moment the process is started to
the moment the last file is in the endpoint buffer *and* out of the local buffer.

The references run in the same invocation on the same files:

* floor: one ``rsync -a`` (or ``cp -r``, ``scp -r``) of the whole tree into staging plus one
  ``mv`` (over ssh: one ``ssh ... mv``). No verification, no records, no holding.
* naive: one transfer and one remote ``mv`` per file, as a simple polling manager works, then
  a local rename into holding. Capped in time; a capped run is extrapolated from its rate and
  marked so.
* lsyncd (when installed): ``default.rsync`` with ``delay = 1`` into the endpoint buffer. It
  does not move files to holding; only arrival is compared.
* bound (small-file backlog): the per-file work the local target includes and nothing else
  (``BOUND_SCRIPT``), in one process. Its CPU time divided by the cores is the least time any
  tool doing that work could take here; hdfmgr runs also record their own CPU time and the
  consumer's, which shares the cores with them. "bound with the guarantees' own work" adds
  what the delivery guarantees require per file of any tool (writer checks, pins, the flush,
  the file's states in the database), done the same cheapest way.
* ideal rsync+share (small-file backlog): the ssh target's work as a bare pipeline
  (``IDEAL_SSH_METHOD``), timed end to end: what the 1.5x target leaves for a daemon.

Every figure is reported as a ratio to the floor of the same run. A consumer watches the
endpoint buffer with inotify: one thread stamps each file as it appears (the arrival times),
and for hdfmgr runs a second one reads and hashes every arrived file at once: a file that is
not byte-identical then counts as "partial seen", and one written in place as such.

Over the long link (``--rtt MS``, default 100) every ssh connection goes through a relay on
127.0.0.1 that releases each chunk half a round trip after reading it, both ways
(benchlib/relay.py); its floor is P parallel cold ``tar c | ssh 'tar x'`` streams plus one
``ssh mv``, P the number of slots (benchlib/workloads/longlink.py).

The code is the package ``scripts/benchlib`` (see its ``__init__``): a workload or a transport
is one small module in ``benchlib/workloads/`` or ``benchlib/transports/``.

Results: one JSON line per measurement on stdout and in ``bench-out/results.jsonl``; a Markdown
report (``docs/benchmarks.md``, or ``bench-out/benchmarks-quick.md`` with ``--quick``).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):  # benchlib; tests.sshd_fixture
    if path not in sys.path:
        sys.path.append(path)

from benchlib.consumer import ArrivalWatcher  # noqa: E402 - re-exported for tests
from benchlib.main import main  # noqa: E402
from benchlib.util import now  # noqa: E402

__all__ = ["ArrivalWatcher", "main", "now"]

if __name__ == "__main__":
    sys.exit(main(doc=__doc__ or ""))
