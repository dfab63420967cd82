"""The long link's part of the report: ratios to the tar|ssh floor of the same run, the trickle's
latencies, and the verdicts on the long-link targets. Pure: rows in, text out."""

from __future__ import annotations

import statistics
from typing import Any

By = dict[tuple[str, str], list[dict[str, Any]]]

FLOOR = "floor tar→ssh"
VISITS = ("long visit", "long big visit")

#: (key, description, limit): the targets over the long link.
TARGETS = [
    ("long_visit", "Visit over the long link, rsync (or a stream transfer): ≤ 1.0x the floor", 1.0),
    ("long_bigvisit", "Big visit over the long link: ≥ 0.9x the floor's throughput", 0.9),
    ("long_trickle_p50", "Trickle 2 files/s x 1 MiB over the long link: latency p50 ≤ 0.5 s", 0.5),
    ("long_trickle_p95", "Trickle 2 files/s x 1 MiB over the long link: latency p95 ≤ 1.0 s", 1.0),
]


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def floor_seconds(by: By, workload: str) -> float | None:
    return _med(by.get((workload, FLOOR), []), "seconds")


def ratios(by: By, workload: str) -> dict[str, float]:
    """Median seconds of each hdfmgr transport divided by the median floor."""
    fl = floor_seconds(by, workload)
    out = {}
    for (w, method), rows in by.items():
        if w == workload and method.startswith("hdfmgr ") and fl:
            sec = _med(rows, "seconds")
            if sec is not None:
                out[method] = sec / fl
    return out


def section(by: By) -> list[str]:
    """The long-link tables, or nothing when no long-link workload ran."""
    workloads = [w for w in VISITS if (w, FLOOR) in by]
    trickles = sorted({w for (w, _) in by if w.startswith("long trickle")})
    if not workloads and not trickles:
        return []
    rtt = next((r.get("rtt_ms") for (w, _), rs in by.items() if w.startswith("long ") for r in rs), None)
    lines = [
        f"## Long link: {_fmt(rtt, 0)} ms round trip (a relay delays every chunk by half of it each way)",
        "",
        "Every ssh connection of these runs goes through the relay (`scripts/benchlib/relay.py`). The"
        " floor is P = 2 (the slots) parallel cold `tar c | ssh 'tar x'` streams, balanced by bytes,"
        " then one `ssh` running the `mv`s; hdfmgr is timed from process start to the last file in the"
        " endpoint buffer and out of the local buffer. Ratios, not seconds, are the figures to quote:"
        " the machine's two cores are shared with other work while it runs.",
        "",
    ]
    for r in by.get(("machine", "ssh true (long link)"), []):
        lines += [
            f"One remote command through the relay (`ssh host true`, median of 5): "
            f"{r['new_connection_seconds']:.3f} s on a new connection, {r['shared_seconds']:.3f} s on a"
            " shared one.",
            "",
        ]
    for workload in workloads:
        rows0 = by[(workload, FLOOR)]
        lines += [
            f"### {workload[5:].capitalize()}: {rows0[0]['files']} files",
            "",
            "| method | median s | ratio to floor | throughput vs floor | runs | batches | correct |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        fl = floor_seconds(by, workload)
        methods = [FLOOR, *sorted(m for w, m in by if w == workload and m != FLOOR)]
        for method in methods:
            rows = by[(workload, method)]
            sec = _med(rows, "seconds")
            ratio = sec / fl if sec and fl else None
            ok = all(r.get("ok", True) for r in rows)
            lines.append(
                f"| {method} | {_fmt(sec, 3)} | {_fmt(ratio)}x | {_fmt(1 / ratio if ratio else None)}x "
                f"| {len(rows)} | {_fmt(_med(rows, 'batches'), 0)} | {'yes' if ok else 'NO'} |"
            )
        lines.append("")
    for workload in trickles:
        lines += [
            f"### {workload[5:].capitalize()} (latency: close → in the endpoint buffer)",
            "",
            "| method | p50 s | p95 s | max s | runs | correct |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for method in sorted(m for (w, m) in by if w == workload):
            rows = by[(workload, method)]
            ok = all(r.get("ok", True) for r in rows)
            lines.append(
                f"| {method} | {_fmt(_med(rows, 'latency_p50'), 3)} | {_fmt(_med(rows, 'latency_p95'), 3)} "
                f"| {_fmt(_med(rows, 'latency_max'), 3)} | {len(rows)} | {'yes' if ok else 'NO'} |"
            )
        lines.append("")
    return lines


def judge(key: str, by: By) -> tuple[str, bool | None]:
    """Measured text and pass (None: not measured). The best rsync or stream transport counts."""
    if key in ("long_visit", "long_bigvisit"):
        found = ratios(by, "long visit" if key == "long_visit" else "long big visit")
        text = "; ".join(f"{m[7:]}: {r:.2f}x the floor's time" for m, r in sorted(found.items())) or "–"
        eligible = [r for m, r in found.items() if not m.startswith("hdfmgr scp")]
        if not eligible:
            return text, None
        best = min(eligible)
        return text, (best <= 1.0 if key == "long_visit" else 1 / best >= 0.9)
    if key.startswith("long_trickle_"):
        q = key.rsplit("_", 1)[1]
        limit = 0.5 if q == "p50" else 1.0
        parts, values = [], []
        for (w, m), rows in sorted(by.items()):
            if w.startswith("long trickle"):
                v = _med(rows, f"latency_{q}")
                if v is not None:
                    parts.append(f"{m[7:]}: {v:.3f} s")
                    if not m.startswith("hdfmgr scp"):
                        values.append(v)
        return ("; ".join(parts) or "–"), (min(values) <= limit if values else None)
    return "–", None
