"""``hdfmgr report``: a PNG of throughput, backlog and latency from the audit trail."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pytest

from hdfmgr import config as config_mod
from hdfmgr import db as dbm
from hdfmgr import report
from tests.audit_data import file_row, insert_files
from tests.site import Site


def night(now: float) -> list[dict]:
    """24 h of a camera: a file every 20 s, 8 MB; the endpoint down from 10 h to 8 h ago."""
    rng = random.Random(7)
    rows = []
    outage = (now - 10 * 3600, now - 8 * 3600)
    for i in range(24 * 180):
        detected = now - 24 * 3600 + i * 20
        committed = detected + rng.uniform(0.5, 3.0)
        if outage[0] <= detected < outage[1]:
            committed = outage[1] + (detected - outage[0]) / 20  # the backlog drains at 20 files/s
        name = f"n/{i:05d}.fits"
        if committed > now - 60:
            rows.append(file_row("cam1", name, state="ready", size=8_000_000, detected=detected))
        else:
            rows.append(file_row("cam1", name, size=8_000_000, detected=detected, committed=committed))
    return rows


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    site.configure(name="cam1")
    database = dbm.connect(config_mod.load(site.config_path))
    dbm.create_schema(database)
    return site


def test_series(site: Site) -> None:
    now = time.time()
    insert_files(night(now))
    data = report.series("cam1", since=now - 24 * 3600, until=now, bins=24)
    assert data["committed"] == sum(1 for r in night(now) if r["committed_at"] is not None)
    assert data["backlog"][0] <= 1 and max(data["backlog"]) == pytest.approx(360, abs=2)
    assert data["backlog"][16] == pytest.approx(360, abs=2)  # the end of the outage (8 h ago)
    assert data["files_per_s"][15] == 0  # an hour inside the outage: nothing committed
    assert data["latency_p50"][3] < 3.0
    assert data["latency_max"][16] > 3600
    assert math.isnan(data["latency_p50"][15])  # no commit in that hour: no latency


def test_report_command_writes_a_png(site: Site) -> None:
    insert_files(night(time.time()))
    out = site.root / "report.png"
    result = site.hdfmgr("report", "--since", "24h", "--output", str(out), str(site.config_path))
    assert result.returncode == 0, result.stderr
    assert "report: " in result.stdout and "files" in result.stdout
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    bad = site.hdfmgr("report", "--since", "later", "--output", str(out), str(site.config_path))
    assert bad.returncode == 64
