"""Workers take turns on per-file loops of short calls, but handle large files side by side."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from hdfmgr import deliver
from hdfmgr.deliver import COMMITTED, LONG_CALL_BYTES, BatchJob, BatchReport, _hash, _hold
from hdfmgr.detect import snapshot
from hdfmgr.endpoint import StagedFile
from hdfmgr.holding import HoldResult, Outcome


def job(batch: int, tmp_path: Path, size: int) -> BatchJob:
    path = tmp_path / f"f{batch}.fits"
    path.write_bytes(b"x")
    files = [StagedFile(path.name, str(path), size)]
    snap = snapshot(str(path))
    assert snap is not None
    return BatchJob(batch, batch, f"slot{batch}", files, {path.name: snap}, prepare=False)


def both_inside_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, step: str, size: int, patience: float
) -> bool:
    """Run ``step`` on one file in each of two batches at once; whether both ever met inside
    (each waits ``patience`` seconds for the other there)."""
    meeting = threading.Barrier(2, timeout=patience)
    met: list[bool] = []

    def meet_the_other(path_or_rel: str, *sent: object) -> Any:
        try:
            meeting.wait()
            met.append(True)
        except threading.BrokenBarrierError:
            met.append(False)
        return HoldResult(Outcome.HELD, "done") if sent else "done"

    reports = [BatchReport(job(n, tmp_path, size), 0.0) for n in (1, 2)]
    if step == "hash":
        monkeypatch.setattr(deliver, "blake2b_file", meet_the_other)
        threads = [threading.Thread(target=_hash, args=(r.job, r)) for r in reports]
    else:
        for r in reports:
            r.outcomes[r.job.files[0].rel] = (COMMITTED, None)
        threads = [threading.Thread(target=_hold, args=(r.job, r, meet_the_other)) for r in reports]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for r in reports:
        assert (r.checksums if step == "hash" else r.held) == {r.job.files[0].rel: "done"}
    return any(met)


@pytest.mark.parametrize("step", ["hash", "hold"])
def test_small_files_are_handled_one_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, step: str
) -> None:
    assert not both_inside_at_once(monkeypatch, tmp_path, step, size=4096, patience=1.0)


@pytest.mark.parametrize("step", ["hash", "hold"])
def test_large_files_are_handled_side_by_side(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, step: str
) -> None:
    # They meet as soon as both are in: the long patience only covers a slow start.
    assert both_inside_at_once(monkeypatch, tmp_path, step, size=LONG_CALL_BYTES, patience=20.0)


def test_a_failed_hash_gives_the_turn_back(tmp_path: Path) -> None:
    missing = BatchReport(job(1, tmp_path, 10), 0.0)
    os_path = Path(missing.job.files[0].path)
    os_path.unlink()
    _hash(missing.job, missing)
    assert missing.outcomes[os_path.name][0] == deliver.CHANGED  # vanished: it settles again
    assert deliver._local_io.acquire(timeout=1)
    deliver._local_io.release()
