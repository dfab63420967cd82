"""The command line and the driver: the machine rows, every selected workload, the report."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from . import workloads
from .context import FULL, QUICK, Bench
from .report import machine, render_report
from .util import ROOT, now
from .workloads.dbcount import dbcount_helper


def run(b: Bench) -> int:
    chosen = workloads.registry()
    known = {w.name for w in chosen}
    only = set(b.args.only.split(",")) if b.args.only else None
    if only is not None and only - known:
        raise SystemExit(
            f"unknown workload(s) {', '.join(sorted(only - known))} (known: {', '.join(sorted(known))})"
        )
    chosen = [
        w
        for w in chosen
        if (w.name in only if only is not None else (w.quick or not b.quick))
        and not (w.ssh and b.args.no_ssh)
    ]
    started = now()
    sites_fs = subprocess.run(
        ["stat", "-f", "-c", "%T", str(b.sites)], capture_output=True, text=True, check=False
    ).stdout.strip()
    b.record(
        workload="machine",
        method="code",
        ok=True,
        problems=[],
        sites=str(b.sites),
        sites_fs=sites_fs,
        **b.code,
    )
    b.record(
        workload="machine", method="host", ok=True, problems=[], commit=b.code["commit"], lines=machine()
    )
    if not b.args.no_ssh:
        b.record(workload="machine", method="ssh true", ok=True, problems=[], **b.remote_command_cost())
        if any(w.ssh for w in chosen) and b.rtt_ms > 0 and not b.quick:
            cost = b.remote_command_cost(b.rtt_ms)
            b.record(workload="machine", method="ssh true (long link)", ok=True, problems=[], **cost)
    for workload in chosen:
        workload.run(b)
    b.record(
        workload="total",
        method="bench",
        seconds=round(now() - started, 1),
        ok=not b.failures,
        problems=b.failures,
    )
    report = render_report(b.results, quick=b.quick, sizes=b.sizes, reps=b.reps)
    md = (
        Path(b.args.md)
        if b.args.md
        else (b.out / "benchmarks-quick.md" if b.quick else ROOT / "docs" / "benchmarks.md")
    )
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(report)
    print(f"report: {md}", file=sys.stderr)
    if b.failures:
        print(f"{len(b.failures)} correctness failure(s):", file=sys.stderr)
        for failure in b.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None, *, doc: str = "") -> int:
    names = ",".join(w.name for w in workloads.registry())
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 repetition, correctness only")
    parser.add_argument("--reps", type=int, default=0, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {names}")
    parser.add_argument("--no-ssh", action="store_true", help="skip the loopback sshd transports")
    parser.add_argument(
        "--rtt",
        type=float,
        default=None,
        help="round trip of the long link in ms, emulated by a relay (default 100; 20 with --quick: a smoke)",
    )
    parser.add_argument(
        "--transports",
        default="",
        help="long-link transports, comma-separated (default stream,rsync+share,scp; benchlib/transports/)",
    )
    parser.add_argument(
        "--code",
        default="",
        help="measure this hdfmgr package directory instead of the checkout's (a before/after)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench-out"), help="results directory")
    parser.add_argument(
        "--sites",
        default="",
        help="where the measured sites live (default /dev/shm when it is a tmpfs, else --out)",
    )
    parser.add_argument("--md", default="", help="where to write the Markdown report")
    parser.add_argument("--keep", action="store_true", help="keep the sites (for inspection)")
    parser.add_argument("--render", default="", help="only rewrite the report from a results.jsonl")
    parser.add_argument("--dbcount-helper", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rtt is None:
        args.rtt = 20.0 if args.quick else 100.0
    if args.dbcount_helper:
        return dbcount_helper(args.dbcount_helper)
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines() if line.strip()]
        reps = 1 + max((r.get("rep", 0) for r in rows), default=0)
        md = Path(args.md) if args.md else ROOT / "docs" / "benchmarks.md"
        md.write_text(render_report(rows, quick=args.quick, sizes=QUICK if args.quick else FULL, reps=reps))
        print(f"report: {md}", file=sys.stderr)
        return 0
    bench = Bench(args)
    try:
        return run(bench)
    finally:
        bench.close()
