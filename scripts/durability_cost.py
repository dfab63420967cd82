"""What ``synchronous=FULL`` costs the daemon's database writes, against ``NORMAL``.

Runs the writes of one delivered batch (insert the files, start the batch, the COMMITTING
checkpoint, the outcome) through the daemon's own Recorder, many times, on a SQLite file in
WAL mode, once per setting, alternating, and prints the time per batch and the ratio.

    .venv/bin/python scripts/durability_cost.py [--batches N] [--files F] [--dir DIR]

The database goes in DIR (default: a temporary directory beside this checkout, on the same
disk the daemon's database would use); a tmpfs would hide the cost of the syncs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import peewee as pw

from hdfmgr import db as dbm
from hdfmgr.deliver import BatchJob, BatchReport
from hdfmgr.endpoint import StagedFile
from hdfmgr.record import Recorder
from hdfmgr.settle import Snapshot


def run(path: str, synchronous: str, batches: int, files: int) -> float:
    """Seconds per batch for ``batches`` batches of ``files`` files."""
    database = pw.SqliteDatabase(
        path,
        lock_type="IMMEDIATE",
        pragmas={"journal_mode": "wal", "synchronous": synchronous, "foreign_keys": 1},
    )
    dbm.proxy.initialize(database)
    database.connect()
    dbm.create_schema(database)
    recorder = Recorder(database, "bench")
    t0 = time.perf_counter()
    for b in range(batches):
        wall = time.time()
        items = [(f"d/f{b}-{i}.fits", Snapshot(1000, b * files + i, b * files + i)) for i in range(files)]
        ids = recorder.insert(items, wall)
        batch = recorder.start_batch("/staging/slot0", ids, 1000 * files, wall)
        recorder.committing(batch, ids, [(i, "0" * 128) for i in ids], wall)
        staged = [StagedFile(rel, "/buffer/" + rel, 1000) for rel, _ in items]
        job = BatchJob(batch, 0, "/staging/slot0", staged, dict(items), prepare=False)
        recorder.finish_batch(
            BatchReport(job, wall), committed=[], held=ids, failures=[], checksums=[], wall=wall
        )
    elapsed = time.perf_counter() - t0
    database.close()
    return elapsed / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--files", type=int, default=1, help="files per batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parent.parent))
    args = parser.parse_args()
    top = tempfile.mkdtemp(prefix=".durability-", dir=args.dir)
    try:
        best: dict[str, float] = {}
        for r in range(args.rounds):
            for setting in ("normal", "full"):
                path = os.path.join(top, f"{setting}-{r}.db")
                seconds = run(path, setting, args.batches, args.files)
                best[setting] = min(best.get(setting, float("inf")), seconds)
        print(
            f"{args.batches} batches of {args.files} file(s): NORMAL {best['normal'] * 1e3:.2f} ms/batch, "
            f"FULL {best['full'] * 1e3:.2f} ms/batch, ratio {best['full'] / best['normal']:.2f}x"
        )
    finally:
        shutil.rmtree(top)


if __name__ == "__main__":
    main()
