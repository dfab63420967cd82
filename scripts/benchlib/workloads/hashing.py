"""hdfmgr's BLAKE2b of large files against b2sum (a helper: part of the big workload)."""

from __future__ import annotations

import os
from pathlib import Path

from ..context import Bench
from ..util import must, now


def hashing(b: Bench, tree: tuple[Path, dict[str, str]]) -> None:
    """hdfmgr's BLAKE2b of large files against b2sum on the same (cached) files."""
    from hdfmgr.checksum import blake2b_file

    paths = [str(tree[0] / rel) for rel in sorted(tree[1])]
    for rep in range(b.reps):
        t0 = now()
        digests = [blake2b_file(p) for p in paths]
        ours = now() - t0
        t0 = now()
        must(["b2sum", *paths])
        theirs = now() - t0
        ok = digests == [tree[1][rel] for rel in sorted(tree[1])]
        if not ok:
            b.fail("hashing: blake2b_file digest differs from the expected one")
        total = sum(os.path.getsize(p) for p in paths)
        b.record(
            workload="hashing",
            method="blake2b_file vs b2sum",
            rep=rep,
            files=len(paths),
            bytes=total,
            seconds=round(ours, 4),
            b2sum_seconds=round(theirs, 4),
            relative_speed=round(theirs / ours, 3),
            ok=ok,
            problems=[],
        )
