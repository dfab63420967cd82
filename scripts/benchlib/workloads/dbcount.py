"""Database statements and transactions per batch, counted inside one rescan run (a helper:
part of the backlog workload)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..context import Bench
from ..site import Site
from ..util import ROOT


def dbcount(b: Bench, tree: tuple[Path, dict[str, str]]) -> None:
    """Database statements and transactions per batch, counted inside a rescan run."""
    site = Site(b.work / "dbcount")
    b.link_tree(tree[0], tree[1], site.buffer)
    site.configure(b.transport("local"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--dbcount-helper", str(site.config)],
        capture_output=True,
        text=True,
        env=b.env(None),
        timeout=600,
        cwd=site.root,
        check=False,
    )
    try:
        counts = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        b.fail(f"dbcount helper failed: {result.stderr[-2000:]}")
        return
    b.discard(site)
    batches = max(1, counts["batches"])
    b.record(
        workload="backlog small",
        method="db writes (rescan)",
        files=len(tree[1]),
        batches=counts["batches"],
        transactions=counts["transactions"],
        statements=counts["statements"],
        transactions_per_batch=round(counts["transactions"] / batches, 2),
        statements_per_batch=round(counts["statements"] / batches, 1),
        statements_per_file=round(counts["statements"] / max(1, len(tree[1])), 2),
        ok=counts["outcome"] == "drained",
        problems=[],
    )


def dbcount_helper(config_path: str) -> int:
    """Run one rescan pass in this process, counting database statements and commits."""
    import peewee as pw

    from hdfmgr import config as config_mod
    from hdfmgr.pipeline import Pipeline

    counts = {"statements": 0, "transactions": 0}
    execute_sql = pw.Database.execute_sql
    commit = pw.Database.commit

    def counting_execute(self: Any, sql: str, params: Any = None, *args: Any, **kw: Any) -> Any:
        if not sql.lstrip().upper().startswith(("SELECT", "PRAGMA")):
            counts["statements"] += 1
        return execute_sql(self, sql, params, *args, **kw)

    def counting_commit(self: Any) -> Any:
        counts["transactions"] += 1
        return commit(self)

    pw.Database.execute_sql = counting_execute  # type: ignore[method-assign]
    pw.Database.commit = counting_commit  # type: ignore[method-assign]
    pipeline = Pipeline(config_mod.load(config_path), once=True)
    outcome = pipeline.run()
    print(json.dumps({**counts, "batches": pipeline.counters.batches, "outcome": outcome.value}))
    return 0
