"""kill -9 at random moments of a steady flow, many times in a row, then drain: the invariants.

* every file reaches the endpoint buffer byte-identical;
* no partial file is ever visible there to a consumer that ingests files the instant they
  appear;
* a file is in holding only after it was committed at the endpoint;
* no file is delivered twice (with a local endpoint there is no window at all: the remote
  script cannot outlive the daemon's session);
* the database and the filesystem agree at the end.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

from hdfmgr.endpoint import RECEIPT
from tests.site import Consumer, Site, content, wait_for


def test_kill9_loop_keeps_every_invariant(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("HDFMGR_KILL_SEED", "20261127")))
    site = Site(tmp_path / "site")
    # Slow the commands a little so that kills land inside transfers and commits too.
    site.configure(
        transfer="sh -c 'sleep 0.05; cp \"$@\"' sh {batch} {dest}",
        remote='sh -c "sleep 0.03; {command}"',
        chunk_size=5,
        num_threads=2,
        retry_initial=0.1,
        retry_max=0.5,
    )
    names = [f"n{i // 40}/img{i:04d}.fits" for i in range(160)]
    consumer = Consumer(site.ep_buffer)
    consumer.start()

    def write_steadily() -> None:
        for rel in names:
            site.write(rel, content(rel))
            time.sleep(0.02)  # the camera's pace

    writer = threading.Thread(target=write_steadily, daemon=True)
    writer.start()
    violations: list[str] = []
    kills = 0
    try:
        for _ in range(12):
            daemon = site.start()
            time.sleep(rng.uniform(0.05, 0.7))  # the fault's timing, not a synchronisation
            daemon.kill()
            kills += 1
            held = set(site.held())
            visible = {
                os.path.relpath(os.path.join(d, n), site.ep_buffer)
                for d, _, ns in os.walk(site.ep_buffer)
                for n in ns
            }
            early = held - visible - set(consumer.arrivals)
            if early:
                violations.append(f"held before committed: {sorted(early)[:5]}")
        writer.join(30)
        daemon = site.start()
        try:
            wait_for(lambda: set(site.held()) == set(names), 60, "drain after the kills")
            wait_for(lambda: len(set(consumer.arrivals)) == len(names), 20, "consumer")
        finally:
            assert daemon.stop() == 0
    finally:
        consumer.stop_event.set()
        consumer.join(5)

    assert kills == 12
    assert not violations, violations
    assert not consumer.bad, f"partial or wrong content seen at the endpoint: {consumer.bad[:5]}"
    assert sorted(consumer.arrivals) == sorted(names), "missing or duplicate deliveries"
    assert site.held() == {rel: content(rel) for rel in names}
    assert site.waiting() == {}
    batches = dict(site.query("select status, count(*) from batches group by status"))
    assert "running" not in batches, batches  # killed runs' batches are closed as interrupted
    states = site.query("select state, count(*) from files group by state")
    assert states == [("held", len(names))], states
    # The current slots' receipts stay (each commit replaces its slot's; the next run sweeps them).
    left = [p for p in site.staging.rglob("*") if p.is_file() and not p.name.endswith(RECEIPT)]
    assert not left, f"files left in staging: {left[:5]}"
