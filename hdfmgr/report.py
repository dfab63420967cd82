"""``hdfmgr report``: throughput, backlog and latency over time, as a PNG, from the audit trail.

Needs matplotlib (the ``report`` extra). Everything comes from the ``files`` table:
throughput from ``committed_at`` and sizes, latency as ``committed_at - detected_at``, and the
backlog at time t as the files detected by t and not yet committed (nor given up) at t.

State owned: none: a plot drawn from the audit trail.
"""

from __future__ import annotations

import math
import time
from typing import Any

from .db import FileRecord, State


def series(source: str | None, *, since: float, until: float, bins: int = 96) -> dict[str, Any]:
    """Per-bin throughput, latency percentiles and the backlog curve between since and until."""
    f = FileRecord
    query = f.select(f.detected_at, f.committed_at, f.size, f.state, f.updated_at).where(
        (FileRecord.detected_at <= until)
        & (FileRecord.committed_at.is_null() | (FileRecord.committed_at >= since))
    )
    if source is not None:
        query = query.where(FileRecord.source == source)
    width = (until - since) / bins
    files = [0] * bins
    nbytes = [0] * bins
    latencies: list[list[float]] = [[] for _ in range(bins)]
    arrivals: list[float] = []
    departures: list[float] = []
    for detected, committed, size, state, updated in query.tuples():
        arrivals.append(detected)
        if committed is not None:
            departures.append(committed)
            if committed >= since:
                i = min(bins - 1, int((committed - since) / width))
                files[i] += 1
                nbytes[i] += size
                latencies[i].append(committed - detected)
        elif state in (State.QUARANTINED.value, State.HELD.value):
            departures.append(updated)  # given up (or retired) without a commit
    arrivals.sort()
    departures.sort()
    edges = [since + i * width for i in range(bins + 1)]
    centers = [since + (i + 0.5) * width for i in range(bins)]
    backlog = [_count_le(arrivals, t) - _count_le(departures, t) for t in edges]
    return {
        "since": since,
        "until": until,
        "width": width,
        "centers": centers,
        "edges": edges,
        "files_per_s": [n / width for n in files],
        "mb_per_s": [b / width / 1e6 for b in nbytes],
        "latency_p50": [_percentile(v, 50) for v in latencies],
        "latency_p95": [_percentile(v, 95) for v in latencies],
        "latency_max": [max(v) if v else math.nan for v in latencies],
        "backlog": backlog,
        "committed": sum(files),
        "bytes": sum(nbytes),
    }


def _count_le(sorted_values: list[float], t: float) -> int:
    from bisect import bisect_right

    return bisect_right(sorted_values, t)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def plot(data: dict[str, Any], output: str, *, title: str) -> None:
    """Three panels sharing the time axis: throughput, backlog, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import datetime as dt

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    def when(ts: list[float]) -> list[dt.datetime]:
        return [dt.datetime.fromtimestamp(t) for t in ts]

    centers, edges = when(data["centers"]), when(data["edges"])
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True, constrained_layout=True)
    fig.suptitle(title)
    bar_width = data["width"] / 86400.0 * 0.9
    ax1.bar(centers, data["mb_per_s"], width=bar_width, color="tab:blue", label="MB/s")
    ax1.set_ylabel("MB/s committed")
    twin = ax1.twinx()
    twin.plot(centers, data["files_per_s"], color="tab:orange", linewidth=1.2, label="files/s")
    twin.set_ylabel("files/s")
    ax1.set_title(
        f"throughput: {data['committed']} files, {data['bytes'] / 1e9:.2f} GB "
        f"(bins of {_duration(data['width'])})",
        fontsize=10,
        loc="left",
    )
    handles = ax1.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    ax2.step(edges, data["backlog"], where="post", color="tab:red")
    ax2.fill_between(edges, data["backlog"], step="post", color="tab:red", alpha=0.2)
    ax2.set_ylabel("files waiting")
    ax2.set_title("backlog (detected, not yet committed)", fontsize=10, loc="left")
    ax2.set_ylim(bottom=0)
    ax3.plot(centers, data["latency_p50"], marker=".", color="tab:green", label="median")
    ax3.plot(centers, data["latency_p95"], marker=".", color="tab:purple", label="95th percentile")
    ax3.plot(centers, data["latency_max"], linestyle=":", color="gray", label="max")
    ax3.set_ylabel("seconds")
    ax3.set_title("latency: close-write to commit, per file", fontsize=10, loc="left")
    if any(v > 0 for v in data["latency_max"] if not math.isnan(v)):
        ax3.set_yscale("log")
    ax3.legend(loc="upper left", fontsize=8)
    ax3.xaxis.set_major_formatter(mdates.ConciseDateFormatter(ax3.xaxis.get_major_locator()))
    ax3.set_xlim(edges[0], edges[-1])
    for ax in (ax1, ax2, ax3):
        ax.grid(True, alpha=0.3)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def make(source: str | None, output: str, *, since: float, until: float | None = None) -> dict[str, Any]:
    until = time.time() if until is None else until
    data = series(source, since=since, until=until)
    stamp = "%Y-%m-%d %H:%M"
    title = (
        f"hdfmgr {source or 'all sources'}: {time.strftime(stamp, time.localtime(since))} to "
        f"{time.strftime(stamp, time.localtime(until))}"
    )
    plot(data, output, title=title)
    return data
