"""What the commit program's flushes cost per batch: the program as it runs, against the same
program with ``sync`` replaced by ``true``.

The commit program (hdfmgr/remote/commit.sh) flushes the verified copies before the first
rename and each final directory after its ``mv``, so that a power cut on the endpoint cannot
empty a delivered file or undo its rename. This runs the program itself, through the constant
bootstrap as the daemon starts it, on a staging slot and an endpoint buffer in DIR, for a few
batch shapes; per run the copies are written afresh (their data is dirty in the page cache, as
after a transfer) and the disk is synced first (``os.sync``), so that no run pays for the
previous one's writeback. Only the program is timed. "no flush" puts a ``sync`` that is
``true`` first on PATH: the same processes, no fsync. Two more variants, for comparison only,
put a ``sync`` first on PATH that runs the real one as ``sync -d`` (fdatasync per file) or
``sync -f`` (syncfs: the whole filesystem, once per name).

    .venv/bin/python scripts/commit_cost.py [--runs N] [--dir DIR ...]

DIR defaults to a directory beside this checkout (the disk the endpoint would use) and
/dev/shm (tmpfs: its fsync costs nothing, so there the two differ only by noise). Prints one
table row per (DIR, batch): the median milliseconds of each variant (run in turn, round after
round) and the ratio of the program as it is (flush) to no flush.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from hdfmgr.endpoint import BOOTSTRAP, program
from hdfmgr.replies import StagedFile, commit_payload, parse_commit_output

#: Batch shapes: (files, bytes each).
SHAPES = [(1, 1 << 20), (100, 64 << 10), (10, 1 << 20)]


def one_commit(top: Path, files: int, size: int, path: str) -> float:
    """Stage ``files`` fresh copies of ``size`` bytes, then time one commit of them."""
    slot = top / "staging" / "slot"
    final = top / "buffer" / "night"
    for d in (slot, final):
        shutil.rmtree(d, ignore_errors=True)
    slot.mkdir(parents=True)
    final.mkdir(parents=True)
    os.sync()
    data = os.urandom(size)
    staged = []
    for i in range(files):
        name = f"f{i:04d}.fits"
        (slot / name).write_bytes(data)
        staged.append(StagedFile(f"night/{name}", f"/nowhere/{name}", size))
    payload, nrec, nplan = commit_payload([(str(final), staged)], "size", str(slot))
    text = program("commit.sh")
    argv = ["sh", "-c", BOOTSTRAP, "hdfmgr", str(len(text)), "hdfmgr-commit"]
    argv += [str(slot), "size", "10", "", str(nrec), str(nplan)]
    t0 = time.perf_counter()
    result = subprocess.run(
        argv, input=text.encode("ascii") + payload, capture_output=True, env={**os.environ, "PATH": path}
    )
    elapsed = time.perf_counter() - t0
    report = parse_commit_output(result.stdout)
    if result.returncode != 0 or report is None or len(report.moved) != files:
        raise SystemExit(f"the commit failed: {result.returncode} {result.stderr[-300:]!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per variant and batch")
    parser.add_argument("--dir", action="append", help="where staging and the buffer go (repeatable)")
    args = parser.parse_args()
    dirs = args.dir or [str(Path(__file__).resolve().parent.parent), "/dev/shm"]
    shims = Path(tempfile.mkdtemp(prefix="hdfmgr-sync-shims-"))
    real = shutil.which("sync") or "/bin/sync"
    system = os.environ["PATH"]
    variants = {"no flush": "", "flush": system, "sync -d": "-d", "sync -f": "-f"}
    for name, option in variants.items():
        if name in ("no flush", "sync -d", "sync -f"):
            d = shims / name.replace(" ", "")
            d.mkdir()
            (d / "sync").write_text(f'#!/bin/sh\nexec {real} {option} "$@"\n' if option else "#!/bin/sh\n")
            (d / "sync").chmod(0o755)
            variants[name] = f"{d}:{system}"
    print("| filesystem | batch | no flush | flush (sync --) | ratio | sync -d | sync -f |")
    print("|---|---|---|---|---|---|---|")
    try:
        for where in dirs:
            fstype = subprocess.run(
                ["findmnt", "-n", "-o", "FSTYPE", "-T", where], capture_output=True, text=True
            ).stdout.split("\n")[0]
            top = Path(tempfile.mkdtemp(prefix=".commit-cost-", dir=where))
            try:
                for files, size in SHAPES:
                    times: dict[str, list[float]] = {v: [] for v in variants}
                    for _ in range(args.runs):
                        for name, path in variants.items():
                            times[name].append(one_commit(top, files, size, path))
                    med = {v: statistics.median(t) for v, t in times.items()}
                    shape = f"{files} x {size >> 10} KiB"
                    print(
                        f"| {fstype} ({where}) | {shape} | {med['no flush'] * 1e3:.1f} ms "
                        f"| {med['flush'] * 1e3:.1f} ms | {med['flush'] / med['no flush']:.2f}x "
                        f"| {med['sync -d'] * 1e3:.1f} ms | {med['sync -f'] * 1e3:.1f} ms |",
                        flush=True,
                    )
            finally:
                shutil.rmtree(top)
    finally:
        shutil.rmtree(shims)


if __name__ == "__main__":
    main()
