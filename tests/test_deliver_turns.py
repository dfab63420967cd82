"""Workers take turns on per-file loops of short calls, but hash large files side by side."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hdfmgr import deliver
from hdfmgr.deliver import LONG_CALL_BYTES, BatchJob, BatchReport, _hash
from hdfmgr.endpoint import StagedFile


def job(batch: int, tmp_path: Path, size: int) -> BatchJob:
    path = tmp_path / f"f{batch}.fits"
    path.write_bytes(b"x")
    files = [StagedFile(path.name, str(path), size)]
    return BatchJob(batch, batch, f"slot{batch}", files, {}, prepare=False, clean=False)


def both_inside_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: int) -> bool:
    """Hash one file in each of two batches at once; whether both hashes ever ran together."""
    meeting = threading.Barrier(2, timeout=1.0)
    met: list[bool] = []

    def meet_the_other(path: str) -> str:
        try:
            meeting.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return "digest"

    monkeypatch.setattr(deliver, "blake2b_file", meet_the_other)
    reports = [BatchReport(job(n, tmp_path, size), 0.0) for n in (1, 2)]
    threads = [threading.Thread(target=_hash, args=(r.job, r)) for r in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert all(r.checksums == {r.job.files[0].rel: "digest"} for r in reports)
    return any(met)


def test_small_files_are_hashed_one_batch_at_a_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert not both_inside_at_once(monkeypatch, tmp_path, size=4096)


def test_large_files_are_hashed_side_by_side(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert both_inside_at_once(monkeypatch, tmp_path, size=LONG_CALL_BYTES)


def test_a_failed_hash_gives_the_turn_back(tmp_path: Path) -> None:
    missing = BatchReport(job(1, tmp_path, 10), 0.0)
    os_path = Path(missing.job.files[0].path)
    os_path.unlink()
    _hash(missing.job, missing)
    assert missing.outcomes[os_path.name][0] == deliver.FAILED
    assert deliver._local_io.acquire(timeout=1)
    deliver._local_io.release()
