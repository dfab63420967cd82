"""Prometheus metrics: computed from the database, scraped and parsed with prometheus-client.

The database tests run against SQLite and a real PostgreSQL (``engine`` fixture); the
end-to-end test scrapes a running daemon's /metrics on 127.0.0.1.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hdfmgr import config as config_mod
from hdfmgr import metrics
from tests.audit_data import batch, file_row, insert_files, recording_site
from tests.site import Site, wait_for


@pytest.fixture
def site(tmp_path: Path, engine: str | None) -> Iterator[Site]:
    with recording_site(tmp_path, engine) as made:
        yield made


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def populate(now: float) -> None:
    insert_files(
        [
            # Latencies 0.3, 3, 40 s (buckets 0.5, 5, 60).
            file_row("cam1", "a.fits", size=100, detected=now - 100.3, committed=now - 100),
            file_row("cam1", "b.fits", size=200, detected=now - 63, committed=now - 60),
            file_row("cam1", "c.fits", size=300, detected=now - 50, committed=now - 10),
            file_row("cam1", "w1.fits", state="ready", size=1000, detected=now - 30),
            file_row("cam1", "w2.fits", state="failed", size=500, detected=now - 20),
            file_row("cam1", "q.fits", state="quarantined", detected=now - 20),
            file_row("cam2", "x.fits", size=7, detected=now - 5, committed=now - 4),
        ]
    )
    batch("cam1", started=now - 101, seconds=0.2, files=1, nbytes=100)
    batch("cam1", started=now - 62, seconds=3.0, files=1, nbytes=200)
    batch(
        "cam1",
        started=now - 40,
        seconds=1.0,
        status="partial",
        files=3,
        committed=1,
        error_class="verification",
        stderr="b2sum mismatch",
    )
    batch(
        "cam1",
        started=now - 30,
        seconds=20.0,
        status="failed",
        files=2,
        committed=0,
        error_class="transport",
        returncode=255,
    )
    batch("cam1", started=now - 25, seconds=0.1, status="failed", files=1, committed=0)  # a local failure
    batch("cam2", started=now - 5, seconds=0.5)


def test_exposition_from_the_database(site: Site) -> None:
    now = time.time()
    populate(now)
    result = site.hdfmgr("metrics", str(site.config_path))
    assert result.returncode == 0, result.stderr
    m = samples(result.stdout)
    assert value(m, "hdfmgr_files_committed_total", source="cam1") == 3
    assert value(m, "hdfmgr_bytes_committed_total", source="cam1") == 600
    assert value(m, "hdfmgr_failures_total", source="cam1", error_class="verification") == 2
    assert value(m, "hdfmgr_failures_total", source="cam1", error_class="transport") == 2
    assert value(m, "hdfmgr_failures_total", source="cam1", error_class="local") == 1
    assert value(m, "hdfmgr_batches_total", source="cam1", status="committed") == 2
    assert value(m, "hdfmgr_batches_total", source="cam1", status="failed") == 2
    assert value(m, "hdfmgr_backlog_files", source="cam1") == 2
    assert value(m, "hdfmgr_backlog_bytes", source="cam1") == 1500
    assert value(m, "hdfmgr_backlog_oldest_age_seconds", source="cam1") == pytest.approx(30, abs=2)
    assert value(m, "hdfmgr_quarantined_files", source="cam1") == 1
    assert value(m, "hdfmgr_breaker_open", source="cam1") == 0  # one transport failure < threshold 3
    assert value(m, "hdfmgr_last_commit_timestamp_seconds", source="cam1") == pytest.approx(now - 10)
    assert value(m, "hdfmgr_latency_seconds_count", source="cam1") == 3
    assert value(m, "hdfmgr_latency_seconds_sum", source="cam1") == pytest.approx(43.3)
    assert value(m, "hdfmgr_latency_seconds_bucket", source="cam1", le="0.5") == 1
    assert value(m, "hdfmgr_latency_seconds_bucket", source="cam1", le="5.0") == 2
    assert value(m, "hdfmgr_latency_seconds_bucket", source="cam1", le="30.0") == 2
    assert value(m, "hdfmgr_latency_seconds_bucket", source="cam1", le="60.0") == 3
    assert value(m, "hdfmgr_latency_seconds_bucket", source="cam1", le="+Inf") == 3
    assert value(m, "hdfmgr_batch_duration_seconds_count", source="cam1") == 5
    assert value(m, "hdfmgr_batch_duration_seconds_bucket", source="cam1", le="0.25") == 2
    assert value(m, "hdfmgr_batch_duration_seconds_bucket", source="cam1", le="10.0") == 4
    assert value(m, "hdfmgr_batch_duration_seconds_bucket", source="cam1", le="30.0") == 5
    assert value(m, "hdfmgr_batch_duration_seconds_sum", source="cam1") == pytest.approx(24.3)
    assert not any(labels and dict(labels).get("source") == "cam2" for _, labels in m)

    everything = samples(site.hdfmgr("metrics", "--all", str(site.config_path)).stdout)
    assert value(everything, "hdfmgr_files_committed_total", source="cam2") == 1
    assert value(everything, "hdfmgr_files_committed_total", source="cam1") == 3

    out = site.root / "textfile" / "hdfmgr.prom"
    out.parent.mkdir()
    written = site.hdfmgr("metrics", "--output", str(out), str(site.config_path))
    assert written.returncode == 0 and written.stdout == ""
    from_file = samples(out.read_text())
    assert from_file.keys() == samples(result.stdout).keys()
    assert value(from_file, "hdfmgr_files_committed_total", source="cam1") == 3
    assert [p.name for p in out.parent.iterdir()] == ["hdfmgr.prom"]  # no temporary file left


def test_refresh_reads_only_what_is_new_and_breaker_override(site: Site) -> None:
    now = time.time()
    m = metrics.Metrics(["cam1"], breaker_threshold=2)
    m.refresh(now)
    assert m.stats["cam1"].files == 0
    populate(now)
    m.refresh(now)
    m.refresh(now)  # idempotent: nothing new
    s = m.stats["cam1"]
    assert (s.files, s.bytes, s.batches) == (3, 600, {"committed": 2, "partial": 1, "failed": 2})
    insert_files([file_row("cam1", "d.fits", size=50, detected=now - 2, committed=now - 1)])
    batch("cam1", started=now - 3, seconds=2.0, status="failed", error_class="timeout", files=1, committed=0)
    batch(
        "cam1", started=now - 2, seconds=0.5, status="failed", error_class="transport", files=1, committed=0
    )
    m.refresh(now)
    assert (s.files, s.bytes, s.latency.counts[-1]) == (4, 650, 0)
    assert s.failures["timeout"] == 1 and s.failures["transport"] == 3
    assert s.breaker_open  # two transport/timeout failures in a row, threshold 2
    m.set_breaker("cam1", "closed")  # the daemon's word wins over the derived state
    m.refresh(now)
    assert not s.breaker_open
    parsed = samples(metrics.generate_latest(metrics.registry_for(m)).decode())
    assert value(parsed, "hdfmgr_files_committed_total", source="cam1") == 4


def test_batch_done_api() -> None:
    m = metrics.Metrics(["cam9"])
    m.batch_done(
        "cam9",
        status="committed",
        seconds=1.5,
        committed_files=2,
        committed_bytes=2048,
        latencies=[0.7, 12.0],
        now=1000.0,
    )
    m.batch_done("cam9", status="failed", seconds=600.0, failures={"timeout": 3})
    m.set_backlog("cam9", files=3, nbytes=300, oldest_age=42.0)
    m.set_breaker("cam9", "open")
    parsed = samples(metrics.generate_latest(metrics.registry_for(m)).decode())
    assert value(parsed, "hdfmgr_files_committed_total", source="cam9") == 2
    assert value(parsed, "hdfmgr_failures_total", source="cam9", error_class="timeout") == 3
    assert value(parsed, "hdfmgr_batch_duration_seconds_bucket", source="cam9", le="2.5") == 1
    assert value(parsed, "hdfmgr_batch_duration_seconds_bucket", source="cam9", le="600.0") == 2
    assert value(parsed, "hdfmgr_latency_seconds_bucket", source="cam9", le="1.0") == 1
    assert value(parsed, "hdfmgr_backlog_oldest_age_seconds", source="cam9") == 42
    assert value(parsed, "hdfmgr_breaker_open", source="cam9") == 1
    assert value(parsed, "hdfmgr_last_commit_timestamp_seconds", source="cam9") == 1000


def test_daemon_serves_metrics_on_loopback(tmp_path: Path) -> None:
    site = Site(tmp_path)
    site.configure(name="cam1", metrics_port=0)  # 0: any free port; the daemon logs which
    daemon = site.start()
    try:
        line = wait_for(
            lambda: re.search(r"metrics: http://(127\.0\.0\.1):(\d+)/metrics", daemon.output()),
            10,
            "metrics address in the log",
        )
        url = f"http://127.0.0.1:{line.group(2)}/metrics"
        files = {f"n/{i}.fits": b"x" * (1000 + i) for i in range(12)}
        site.write_many(files)
        wait_for(lambda: site.held() == files, 20, "delivery")

        def scraped() -> dict:
            with urllib.request.urlopen(url, timeout=10) as response:
                return samples(response.read().decode())

        def counted() -> dict | None:
            s = scraped()
            return s if value(s, "hdfmgr_files_committed_total", source="cam1") == 12 else None

        m = wait_for(counted, 10, "12 files counted")
        assert value(m, "hdfmgr_bytes_committed_total", source="cam1") == sum(len(v) for v in files.values())
        assert value(m, "hdfmgr_latency_seconds_count", source="cam1") == 12
        assert value(m, "hdfmgr_backlog_files", source="cam1") == 0
        assert value(m, "hdfmgr_batch_duration_seconds_count", source="cam1") >= 1
        assert value(m, "hdfmgr_breaker_open", source="cam1") == 0
        again = scraped()  # incremental: the same totals, not doubled
        assert value(again, "hdfmgr_files_committed_total", source="cam1") == 12
    finally:
        assert daemon.stop() == 0


def test_metrics_keys_are_validated(tmp_path: Path) -> None:
    site = Site(tmp_path)
    cfg = config_mod.load(site.config_path)
    assert (cfg.metrics_port, cfg.metrics_address) == (None, "127.0.0.1")
    site.configure(metrics_port=70000)
    with pytest.raises(config_mod.ConfigError, match=r"general\.metrics_port: 70000 is out of range"):
        config_mod.load(site.config_path)
    site.configure(metrics_port=9464, metrics_address=["127.0.0.1"])
    with pytest.raises(config_mod.ConfigError, match=r"general\.metrics_address: must be a string"):
        config_mod.load(site.config_path)
