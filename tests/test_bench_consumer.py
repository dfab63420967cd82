"""The benchmark's consumer: the correctness check of every benchmark run rests on it.

It must stamp a file when it appears (not when a busy consumer gets round to it), and it must
catch what a real endpoint manager would suffer from: wrong bytes at the moment a file
appears, and files written in place instead of renamed in.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import time
from pathlib import Path
from types import ModuleType

from tests.site import wait_for

ROOT = Path(__file__).resolve().parent.parent


def load_bench() -> ModuleType:
    """The benchmark's consumer module (scripts/benchlib/consumer.py)."""
    scripts = str(ROOT / "scripts")
    if scripts not in sys.path:
        sys.path.append(scripts)
    return importlib.import_module("benchlib.consumer")


def digest(data: bytes) -> str:
    return hashlib.blake2b(data).hexdigest()


def test_the_consumer_stamps_arrivals_and_catches_wrong_and_in_place_files(tmp_path: Path) -> None:
    bench = load_bench()
    buffer, staging = tmp_path / "buffer", tmp_path / "staging"
    buffer.mkdir()
    (staging / "night").mkdir(parents=True)
    expected = {
        "good.fits": digest(b"good"),
        "wrong.fits": digest(b"the right bytes"),
        "in-place.fits": digest(b"in place"),
        "night/a.fits": digest(b"a"),
        "night/b.fits": digest(b"b"),
    }
    watcher = bench.ArrivalWatcher(buffer, expected, ingest=True)
    watcher.start()
    try:
        (staging / "good.fits").write_bytes(b"good")
        (staging / "wrong.fits").write_bytes(b"other bytes")
        (staging / "night" / "a.fits").write_bytes(b"a")
        (staging / "night" / "b.fits").write_bytes(b"b")
        before = bench.now()
        os.rename(staging / "good.fits", buffer / "good.fits")
        os.rename(staging / "wrong.fits", buffer / "wrong.fits")
        os.rename(staging / "night", buffer / "night")  # a whole directory moved in
        (buffer / "in-place.fits").write_bytes(b"in place")  # visible while being written
        watcher.expect(len(expected))
        assert watcher.complete.wait(10), watcher.arrivals
        after = bench.now()
    finally:
        watcher.stop()  # and let the consumer finish every file
    assert set(watcher.arrivals) == set(expected)
    assert all(before <= t <= after for t in watcher.arrivals.values())
    assert watcher.partial == ["wrong.fits"]
    assert watcher.in_place == 1
    assert watcher.unexpected == []


def test_a_busy_consumer_does_not_delay_the_arrival_stamps(tmp_path: Path, monkeypatch) -> None:
    bench = load_bench()
    buffer, staging = tmp_path / "buffer", tmp_path / "staging"
    buffer.mkdir()
    staging.mkdir()
    names = [f"f{i}.fits" for i in range(5)]
    expected = {name: digest(name.encode()) for name in names}
    slow_hash = bench.b2_file

    def slow(path: str) -> str:
        time.sleep(0.5)  # the consumer is busy with every file
        return slow_hash(path)

    monkeypatch.setattr(bench, "b2_file", slow)
    watcher = bench.ArrivalWatcher(buffer, expected, ingest=True)
    watcher.start()
    try:
        for name in names:
            (staging / name).write_bytes(name.encode())
        started = bench.now()
        for name in names:
            os.rename(staging / name, buffer / name)
        watcher.expect(len(names))
        wait_for(watcher.complete.is_set, 10, "all five arrivals stamped")
        stamped = bench.now()
    finally:
        watcher.stop()
        finished = bench.now()
    # Hashing the five took 2.5 s; stamping them did not wait for it.
    assert stamped - started < 1.0, stamped - started
    assert finished - started >= 2.5
    assert max(watcher.arrivals.values()) - started < 1.0
    assert watcher.partial == [] and set(watcher.arrivals) == set(names)
