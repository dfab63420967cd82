"""How fast the operator's queries answer on a database of 1,000,000 files.

Builds a SQLite audit trail of N file rows (mostly held, a backlog of waiting and failed ones,
one batch per 100 files) with the daemon's own schema, then times ``hdfmgr status``,
``hdfmgr status --json`` and ``hdfmgr files --state failed`` as whole commands (process start
included), medians of ``--reps``. The reference measured in the same run is the cheapest
possible full answer: the count by state of the source (``SELECT state, COUNT(*) ... WHERE
source = ... GROUP BY state``, what ``status`` itself must at least read) in a bare sqlite3
process. Usage::

    scripts/bench-status [--files 1000000] [--reps 3] [--md FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from hdfmgr import config as config_mod
from hdfmgr import db as dbm


def build(root: Path, files: int) -> Path:
    for d in ("buffer", "holding"):
        (root / d).mkdir(parents=True, exist_ok=True)
    cfg = {
        "handoff": {"buffer": "buffer", "holding": "holding"},
        "endpoint": {
            "buffer": "/ep/buffer",
            "staging": "/ep/staging",
            "commands": {"transfer": "cp {batch} {dest}", "remote": 'sh -c "{command}"'},
        },
        "database": {"engine": "sqlite:///handoff.db"},
        "general": {"name": "bench"},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    config = config_mod.load(path)
    db = dbm.connect(config)
    dbm.create_schema(db)
    rng = random.Random(1)
    now = time.time()
    p = db.param
    batch_rows = []
    file_rows = []
    for i in range(files):
        t = now - (files - i) * 0.05
        state = "held"
        if i >= files - 2000:
            state = rng.choice(["ready", "failed", "staging"])
        size = rng.randint(10_000_000, 100_000_000)
        rel = f"night{i // 10000:04d}/img{i:07d}.fits"
        file_rows.append(
            (
                "bench",
                rel.encode(),
                rel,
                size,
                int(t * 1e9),
                i,
                state,
                1,
                0.0,
                t,
                t,
                t,
                t + 1 if state == "held" else None,
                t + 1.1 if state == "held" else None,
                "x" * 128,
                i // 100 + 1,
            )
        )
        if i % 100 == 0:
            failed = rng.random() < 0.01
            batch_rows.append(
                (
                    "bench",
                    "/ep/staging/hdfmgr.bench.0",
                    t,
                    t + 1,
                    100,
                    100 * size,
                    0.01,
                    0.5,
                    0.2,
                    5e8,
                    "failed" if failed else "committed",
                    "transport" if failed else None,
                    255 if failed else 0,
                    "ssh: connect: Connection refused" if failed else None,
                    "scp ...",
                    0 if failed else 100,
                )
            )
    with db.atomic():
        db.cursor().executemany(
            'INSERT INTO "batches" ("source","staging_dir","started_at","finished_at","files","bytes",'
            '"hash_seconds","transfer_seconds","commit_seconds","rate","status","error_class","returncode",'
            f'"stderr","command","committed") VALUES ({", ".join([p] * 16)})',
            batch_rows,
        )
        db.cursor().executemany(
            'INSERT INTO "files" ("source","relpath","name","size","mtime_ns","inode","state","attempts",'
            '"next_try","detected_at","ready_at","updated_at","committed_at","held_at","checksum",'
            f'"last_batch") VALUES ({", ".join([p] * 16)})',
            file_rows,
        )
    db.execute_sql("ANALYZE")
    db.close()
    return path


def timed(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=600)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed ({result.returncode}): {result.stderr.decode()[-500:]}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--md", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hdfmgr-bench-status-"))
    t0 = time.perf_counter()
    config = build(root, args.files)
    built = time.perf_counter() - t0
    py = sys.executable
    reference = [
        py,
        "-c",
        "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); print(c.execute(sys.argv[2]).fetchall())",
        str(root / "handoff.db"),
        "SELECT state, COUNT(*) FROM files WHERE source = 'bench' GROUP BY state",
    ]
    commands = {
        "reference: bare sqlite3 count by state": reference,
        "hdfmgr status": [py, "-m", "hdfmgr", "status", str(config)],
        "hdfmgr status --json": [py, "-m", "hdfmgr", "status", "--json", str(config)],
        "hdfmgr files --state failed --limit 50": [
            py,
            "-m",
            "hdfmgr",
            "files",
            "--state",
            "failed",
            "--limit",
            "50",
            str(config),
        ],
    }
    times = {
        name: statistics.median(timed(argv, root) for _ in range(args.reps))
        for name, argv in commands.items()
    }
    ref = times["reference: bare sqlite3 count by state"]
    lines = [
        f"## Operator queries on {args.files:,} files (`scripts/bench-status`)",
        "",
        f"SQLite database of {args.files:,} file rows and {args.files // 100:,} batches, built in "
        f"{built:.1f} s; whole commands timed from process start, medians of {args.reps}.",
        "",
        "| command | median s | ratio to reference |",
        "|---|---:|---:|",
    ]
    for name, value in times.items():
        lines.append(f"| {name} | {value:.3f} | {value / ref:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.md:
        Path(args.md).write_text(text)
    for p in root.iterdir():
        if p.is_file():
            p.unlink()
    for d in ("buffer", "holding"):
        os.rmdir(root / d)
    os.rmdir(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
