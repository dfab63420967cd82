"""The trickle: a camera closing small files at a fixed rate; latency from close to arrival."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..context import Bench
from ..references import run_lsyncd
from ..site import Site, Writer
from ..util import b2, now
from . import Workload


def trickle(b: Bench) -> None:
    local = b.transport("local")
    sizes = b.sizes
    for rate in sizes.trickle_rates:
        workload = f"trickle {rate:g}/s"
        writer = make_writer(rate, sizes.trickle_seconds, sizes.trickle_size)
        for rep in range(b.reps):
            b.run_hdfmgr(workload, local, rep, writer=writer, count=b.quick)
            if b.lsyncd and rate <= 20:
                run_lsyncd(b, workload, "rsync", rep, writer=writer)
        if not b.quick:
            b.run_hdfmgr(workload, local, 0, writer=writer, count=True)


def make_writer(rate: float, seconds: float, size: int) -> Writer:
    """A camera: closes one ``size``-byte file every 1/rate s (absolute schedule), in place."""

    def write(
        site: Site, expected: dict[str, str], on_close: Callable[[str, float], None]
    ) -> dict[str, float]:
        closed: dict[str, float] = {}
        n = int(rate * seconds)
        pool = os.urandom(size + n)
        t0 = now()
        for i in range(n):
            due = t0 + i / rate
            delay = due - now()
            if delay > 0:
                time.sleep(delay)
            rel = f"night/img{i:06d}.fits"
            data = pool[i : i + size]
            expected[rel] = b2(data)
            with open(site.buffer / rel, "wb") as f:
                f.write(data)
            closed[rel] = now()
            on_close(rel, closed[rel])
        return closed

    return write


WORKLOADS = [Workload("trickle", trickle, order=30)]
