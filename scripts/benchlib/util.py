"""Small helpers every part of the benchmark uses: clocks, polling, hashing, process figures."""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: The repository (scripts/benchlib/util.py -> the top).
ROOT = Path(__file__).resolve().parent.parent.parent

KiB = 1024
MiB = 1024 * KiB


def now() -> float:
    return time.monotonic()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until truthy; return its value, or None after ``timeout`` s."""
    deadline = now() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if now() > deadline:
            return None
        time.sleep(interval)


def count_files(top: Path) -> int:
    n = 0
    for _dirpath, _dirs, names in os.walk(top):
        n += len(names)
    return n


def has_files(top: Path) -> bool:
    """Whether any file is left under ``top``; stops at the first one.

    The drain's end is polled every few milliseconds while the daemon's last holding moves run
    on the same cores: a full walk of a 10,000-file tree per poll would load them itself.
    """
    stack = [str(top)]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except OSError:
            continue
        with entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    return True
    return False


def b2(data: bytes) -> str:
    return hashlib.blake2b(data).hexdigest()


def b2_file(path: str) -> str:
    """Bare ``os.read``: on 4 KiB files the cheapest way (the consumer's CPU counts, see BOUND_SCRIPT)."""
    digest = hashlib.blake2b()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, MiB):
            digest.update(chunk)
    finally:
        os.close(fd)
    return digest.hexdigest()


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a running process, in KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time of a live process and of the children it has waited for (/proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def run_quiet(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False, **kw)


def must(argv: list[str], **kw: Any) -> None:
    result = run_quiet(argv, **kw)
    if result.returncode != 0:
        raise RuntimeError(
            f"{argv[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
        )


def slope(samples: list[tuple[float, int]]) -> float:
    """Least-squares growth of the backlog in files per second over the second half."""
    half = samples[len(samples) // 2 :]
    xs = [t for t, _ in half]
    ys = [b for _, b in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def default_sites(out: Path, need: int) -> Path:
    """/dev/shm when it is a tmpfs with ``need`` bytes free, else ``out``.

    On a RAM filesystem the ratios measure the software: on this machine's shared disk one
    ``cp -r`` of the small tree took from 0.14 s to 2.4 s within minutes.
    """
    shm = Path("/dev/shm")
    try:
        kind = subprocess.run(
            ["stat", "-f", "-c", "%T", str(shm)], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        st = os.statvfs(shm)
    except OSError:
        return out
    roomy = st.f_bavail * st.f_frsize >= need
    return shm if kind == "tmpfs" and roomy and os.access(shm, os.W_OK) else out
