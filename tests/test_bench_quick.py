"""``scripts/bench --quick`` as a smoke test: every workload, transport and reference runs on
small sizes and the delivery is checked for correctness (no timing is asserted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(150)
def test_bench_quick_runs_and_every_delivery_is_correct(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    try:
        result = subprocess.run(
            [str(ROOT / "scripts" / "bench"), "--quick", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
    finally:
        # A bench killed at the timeout must not leave its daemons (own sessions) behind.
        kill_processes_mentioning(str(out))
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    hdfmgr = [r for r in rows if r["method"].startswith("hdfmgr")]
    assert {r["workload"] for r in hdfmgr} >= {"backlog small", "backlog big", "trickle 20/s"}
    assert {r["transport"] for r in hdfmgr} >= {"local", "scp+share", "rsync"}
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    # {batch} mode: a bounded number of commands per batch, never one per file.
    small = [r for r in hdfmgr if r["workload"] == "backlog small"]
    assert all(r["commands_per_batch_steady_max"] <= 3 for r in small)
    assert all(r["spawned_by_daemon"] < r["files"] for r in small)
    restart = [r for r in rows if r["method"] == "restart"]
    assert restart and all(r["rehashed"] == 0 for r in restart)
    # The mandatory-work bound: done, every file delivered, its CPU time measured and reported.
    bound = [r for r in rows if r["method"].startswith("bound")]
    assert bound and all(r["ok"] and r["cpu_seconds"] > 0 and r["cores"] >= 1 for r in bound)
    assert all(r["cpu_seconds"] > 0 and r["consumer_cpu_seconds"] > 0 for r in small)
    # The ssh target's work as a bare pipeline: done, every file delivered, reported.
    ideal = [r for r in rows if r["method"].startswith("ideal")]
    assert ideal and all(r["ok"] and r["files"] > 0 for r in ideal)
    # The long link (a smoke at 20 ms): the floor and hdfmgr through the relay, both delivering
    # every file.
    far = [r for r in rows if r["workload"] == "long visit"]
    assert {r["method"] for r in far} >= {"floor tar→ssh", "hdfmgr rsync+share", "hdfmgr stream"}
    assert all(r["ok"] and r["rtt_ms"] == 20 and r["files"] > 0 for r in far)
    report = (out / "benchmarks-quick.md").read_text()
    assert "that work alone needs at least" in report
    assert "The 1.5x target leaves" in report
    assert "## Long link: 20 ms round trip" in report


def kill_processes_mentioning(text: str) -> None:
    needle = text.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    os.kill(int(entry), signal.SIGKILL)
        except OSError:
            continue
