"""Prometheus metrics, computed from the audit trail.

Two ways to expose them (README, "Metrics"):

* ``general.metrics_port``: ``hdfmgr-watch`` serves ``/metrics`` over HTTP on
  ``general.metrics_address`` (127.0.0.1 unless configured). Each scrape reads only what
  changed in the database since the previous one (indexed by ``committed_at`` and
  ``finished_at``), so it costs milliseconds whatever the size of the database; the first
  scrape reads the whole history once, so counters continue across restarts.
* ``hdfmgr metrics CONFIG --output FILE``: the same families written atomically for
  node-exporter's textfile collector (run it from a timer), or printed without ``--output``.
  It needs nothing but the database, so it also covers every host of a central PostgreSQL
  database (``--all``).

The daemon does not record its circuit breaker; ``hdfmgr_breaker_open`` is derived from the
latest batches (see :func:`hdfmgr.status.breaker`) unless the pipeline reports the real state
through :func:`breaker_state`.

Families (label ``source`` on each):

=========================================== ========= ==============================================
name                                        type      meaning
=========================================== ========= ==============================================
hdfmgr_files_committed_total                counter   files verified and moved into the endpoint
hdfmgr_bytes_committed_total                counter   their bytes
hdfmgr_failures_total{error_class}          counter   files whose attempt failed, by error class
hdfmgr_batches_total{status}                counter   finished batches: committed, partial, failed
hdfmgr_backlog_files / _bytes               gauge     files waiting (ready, failed, in flight)
hdfmgr_backlog_oldest_age_seconds           gauge     age of the oldest waiting file (0 if none)
hdfmgr_quarantined_files                    gauge     files that need an operator (hdfmgr retry)
hdfmgr_breaker_open                         gauge     1 when the endpoint is considered unreachable
hdfmgr_last_commit_timestamp_seconds        gauge     Unix time of the last commit (0 if never)
hdfmgr_batch_duration_seconds               histogram batch start to finish (hash, transfer, commit)
hdfmgr_latency_seconds                      histogram detection (close-write) to commit, per file
=========================================== ========= ==============================================

State owned: none of the daemon's: every figure is read from the audit trail when scraped; the
breaker gauge is the one value pushed in.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import peewee as pw
from prometheus_client import CollectorRegistry, generate_latest, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from . import status
from .db import FileRecord, State, TransferBatch

log = logging.getLogger("hdfmgr")

BATCH_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
LATENCY_BUCKETS = (
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)


@dataclass
class Histogram:
    """Cumulative-at-export bucket counts that can also be added to in bulk (from SQL)."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def add(self, cumulative: list[int], count: int, total: float) -> None:
        """Add SQL results: ``cumulative[i]`` values <= bounds[i], ``count`` values in all."""
        previous = 0
        for i, c in enumerate(cumulative):
            self.counts[i] += c - previous
            previous = c
        self.counts[-1] += count - previous
        self.total += total

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out


@dataclass
class SourceStats:
    files: int = 0
    bytes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    batch_seconds: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    backlog_files: int = 0
    backlog_bytes: int = 0
    backlog_oldest_age: float = 0.0
    quarantined: int = 0
    breaker_open: bool = False
    last_commit: float = 0.0
    # Database watermarks: rows up to these were counted.
    files_mark: float = float("-inf")
    batches_mark: float = float("-inf")


class Metrics:
    """The metric state of one or more sources, and a prometheus-client collector over it.

    Feed it with :meth:`refresh` (from the database) or, from a process that has the numbers
    at hand, with :meth:`batch_done`, :meth:`set_backlog` and :meth:`set_breaker`.
    ``sources`` None means every source in the database.
    """

    def __init__(
        self,
        sources: Iterable[str] | None = None,
        *,
        refresh_on_collect: bool = False,
        breaker_threshold: int = 3,
    ) -> None:
        self.sources = list(sources) if sources is not None else None
        self.refresh_on_collect = refresh_on_collect
        self.breaker_threshold = breaker_threshold
        self.stats: dict[str, SourceStats] = {}
        self.breaker_reported: dict[str, bool] = {}
        self.lock = threading.Lock()

    def _stats(self, source: str) -> SourceStats:
        return self.stats.setdefault(source, SourceStats())

    # ------------------------------------------------------------------ feeding by hand

    def batch_done(
        self,
        source: str,
        *,
        status: str,
        seconds: float,
        committed_files: int = 0,
        committed_bytes: int = 0,
        failures: Mapping[str, int] | None = None,
        latencies: Iterable[float] = (),
        now: float | None = None,
    ) -> None:
        with self.lock:
            s = self._stats(source)
            s.batches[status] = s.batches.get(status, 0) + 1
            s.batch_seconds.observe(seconds)
            s.files += committed_files
            s.bytes += committed_bytes
            for error_class, n in (failures or {}).items():
                s.failures[error_class] = s.failures.get(error_class, 0) + n
            for latency in latencies:
                s.latency.observe(latency)
            if committed_files:
                s.last_commit = time.time() if now is None else now

    def set_backlog(self, source: str, *, files: int, nbytes: int, oldest_age: float | None) -> None:
        with self.lock:
            s = self._stats(source)
            s.backlog_files, s.backlog_bytes, s.backlog_oldest_age = files, nbytes, oldest_age or 0.0

    def set_breaker(self, source: str, state: str) -> None:
        """The pipeline's real breaker state (closed, open, probing); wins over the derived one."""
        with self.lock:
            self.breaker_reported[source] = state != "closed"
            self._stats(source).breaker_open = state != "closed"

    # ------------------------------------------------------------------ feeding from the database

    def refresh(self, now: float | None = None) -> None:
        """Add what the database recorded since the last refresh; recompute the gauges."""
        now = time.time() if now is None else now
        with self.lock:
            for source in self.sources if self.sources is not None else status.sources():
                self._refresh_source(source, now)

    def _refresh_source(self, source: str, now: float) -> None:
        s = self._stats(source)
        # Committed files since the watermark: counts, bytes, latency buckets, in one query.
        latency = FileRecord.committed_at - FileRecord.detected_at
        where = (FileRecord.source == source) & (FileRecord.committed_at > _mark(s.files_mark))
        row = (
            FileRecord.select(
                pw.fn.COUNT(FileRecord.id),
                pw.fn.SUM(FileRecord.size),
                pw.fn.MAX(FileRecord.committed_at),
                pw.fn.SUM(latency),
                *_bucket_sums(latency, LATENCY_BUCKETS),
            )
            .where(where)
            .tuples()
            .get()
        )
        count, nbytes, last, total, *cumulative = row
        if count:
            s.files += count
            s.bytes += int(nbytes or 0)
            s.latency.add([int(c or 0) for c in cumulative], count, float(total or 0.0))
            s.files_mark = last
            s.last_commit = max(s.last_commit, last)
        # Finished batches since the watermark: statuses, failed files by class, durations.
        duration = TransferBatch.finished_at - TransferBatch.started_at
        where = (TransferBatch.source == source) & (TransferBatch.finished_at > _mark(s.batches_mark))
        row = (
            TransferBatch.select(
                pw.fn.COUNT(TransferBatch.id),
                pw.fn.MAX(TransferBatch.finished_at),
                pw.fn.SUM(duration),
                *_bucket_sums(duration, BATCH_BUCKETS),
            )
            .where(where)
            .tuples()
            .get()
        )
        count, last, total, *cumulative = row
        if count:
            s.batch_seconds.add([int(c or 0) for c in cumulative], count, float(total or 0.0))
            for batch_status, n in (
                TransferBatch.select(TransferBatch.status, pw.fn.COUNT(TransferBatch.id))
                .where(where)
                .group_by(TransferBatch.status)
                .tuples()
            ):
                s.batches[batch_status] = s.batches.get(batch_status, 0) + n
            # A batch's failed files share its error class; files that changed under a batch
            # without an error class are local failures.
            error_class = pw.fn.COALESCE(TransferBatch.error_class, "local")
            for cls, n in (
                TransferBatch.select(error_class, pw.fn.SUM(TransferBatch.files - TransferBatch.committed))
                .where(where & TransferBatch.status.in_(["failed", "partial"]))
                .group_by(error_class)
                .tuples()
            ):
                s.failures[cls] = s.failures.get(cls, 0) + int(n or 0)
            s.batches_mark = last
        backlog = status.backlog(source, now=now)
        s.backlog_files, s.backlog_bytes = backlog["files"], backlog["bytes"]
        s.backlog_oldest_age = max(0.0, backlog["oldest_age_seconds"] or 0.0)
        s.quarantined = (
            FileRecord.select(pw.fn.COUNT(FileRecord.id))
            .where((FileRecord.source == source) & (FileRecord.state == State.QUARANTINED.value))
            .scalar()
            or 0
        )
        if source not in self.breaker_reported:
            s.breaker_open = status.breaker(source, threshold=self.breaker_threshold)["state"] == "open"

    # ------------------------------------------------------------------ prometheus-client collector

    def collect(self) -> Iterator[Any]:
        if self.refresh_on_collect:
            try:
                self.refresh()
            except pw.PeeweeException as exc:  # the database is away: serve what we have
                log.warning("metrics: cannot read the database: %s", exc)
        with self.lock:
            stats = sorted(self.stats.items())
            src = ["source"]
            c, g = CounterMetricFamily, GaugeMetricFamily
            families = [
                c("hdfmgr_files_committed", "Files verified and moved into the endpoint buffer.", labels=src),
                c("hdfmgr_bytes_committed", "Bytes of the committed files.", labels=src),
                c(
                    "hdfmgr_failures",
                    "Files whose delivery attempt failed, by error class.",
                    labels=[*src, "error_class"],
                ),
                c("hdfmgr_batches", "Finished batches by outcome.", labels=[*src, "status"]),
                g("hdfmgr_backlog_files", "Files waiting to be delivered.", labels=src),
                g("hdfmgr_backlog_bytes", "Bytes waiting to be delivered.", labels=src),
                g(
                    "hdfmgr_backlog_oldest_age_seconds",
                    "Age of the oldest waiting file (0 when none waits).",
                    labels=src,
                ),
                g("hdfmgr_quarantined_files", "Files that need an operator (hdfmgr retry).", labels=src),
                g(
                    "hdfmgr_breaker_open",
                    "1 when the endpoint is considered unreachable (derived from the "
                    "latest batches unless the daemon reports it).",
                    labels=src,
                ),
                g(
                    "hdfmgr_last_commit_timestamp_seconds",
                    "Unix time of the last commit (0 if never).",
                    labels=src,
                ),
            ]
            (
                files,
                nbytes,
                failures,
                batches,
                backlog_files,
                backlog_bytes,
                oldest,
                quarantined,
                breaker,
                last,
            ) = families
            durations = HistogramMetricFamily(
                "hdfmgr_batch_duration_seconds", "Batch duration, start to finish.", labels=src
            )
            latencies = HistogramMetricFamily(
                "hdfmgr_latency_seconds",
                "Per file, detection (close-write) to commit in the endpoint buffer.",
                labels=src,
            )
            for source, s in stats:
                files.add_metric([source], s.files)
                nbytes.add_metric([source], s.bytes)
                for cls, n in sorted(s.failures.items()):
                    failures.add_metric([source, cls], n)
                for batch_status, n in sorted(s.batches.items()):
                    batches.add_metric([source, batch_status], n)
                backlog_files.add_metric([source], s.backlog_files)
                backlog_bytes.add_metric([source], s.backlog_bytes)
                oldest.add_metric([source], s.backlog_oldest_age)
                quarantined.add_metric([source], s.quarantined)
                breaker.add_metric([source], 1.0 if s.breaker_open else 0.0)
                last.add_metric([source], s.last_commit)
                durations.add_metric([source], s.batch_seconds.buckets(), s.batch_seconds.total)
                latencies.add_metric([source], s.latency.buckets(), s.latency.total)
        yield from families
        yield durations
        yield latencies


def _mark(value: float) -> float:
    return -1e300 if value == float("-inf") else value


def _bucket_sums(expr: pw.Node, bounds: Iterable[float]) -> list[pw.Node]:
    return [pw.fn.SUM(pw.Case(None, [(expr <= bound, 1)], 0)) for bound in bounds]


# ---------------------------------------------------------------------------------- exposition


def registry_for(metrics: Metrics) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


def exposition(sources: Iterable[str] | None, *, breaker_threshold: int = 3) -> bytes:
    """The text exposition of everything the database holds (``hdfmgr metrics``)."""
    metrics = Metrics(sources, breaker_threshold=breaker_threshold)
    metrics.refresh()
    return generate_latest(registry_for(metrics))


def write_textfile(path: str, sources: Iterable[str] | None, *, breaker_threshold: int = 3) -> None:
    """Write the exposition atomically (temporary file and rename) for node-exporter."""
    metrics = Metrics(sources, breaker_threshold=breaker_threshold)
    metrics.refresh()
    write_to_textfile(path, registry_for(metrics))


_current: Metrics | None = None


def serve(source: str, *, address: str, port: int, breaker_threshold: int = 3) -> Any:
    """Serve this source's metrics on http://address:port/metrics from a daemon thread.

    Returns the server (``.server_address`` has the bound port when ``port`` is 0).
    """
    global _current
    metrics = Metrics([source], refresh_on_collect=True, breaker_threshold=breaker_threshold)
    server, _thread = start_http_server(port, addr=address, registry=registry_for(metrics))
    _current = metrics
    return server


def breaker_state(source: str, state: str) -> None:
    """Pipeline hook: report the circuit breaker's real state (no-op without a metrics server)."""
    if _current is not None:
        _current.set_breaker(source, state)
