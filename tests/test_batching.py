"""Unit tests for hdfmgr.batching: which ready files leave together."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hdfmgr.batching import COMMIT_RECORD_BYTES, Candidate, ReadyQueue, arg_budget, byte_share

BIG = 1 << 30  # a budget that never limits


def queue(*items: tuple[str, float]) -> ReadyQueue:
    q = ReadyQueue()
    for rel, since in items:
        q.add(Candidate(rel, 100, since))
    return q


def rels(batch: list[Candidate]) -> list[str]:
    return [c.rel for c in batch]


def cost(rel: str, path_bytes: int) -> int:
    """What one file costs in argv: in the transfer its absolute path, its NUL and its
    pointer; in the commit its name twice and a record (the larger counts)."""
    size = len(os.fsencode(rel))
    return max(path_bytes + size + 1 + 8, 2 * size + COMMIT_RECORD_BYTES)


def test_commit_arguments_bound_a_batch_of_long_names() -> None:
    """A short buffer prefix does not let the commit's arguments (names twice) overflow."""
    names = [f"d/{'n' * 200}{i:04d}" for i in range(100)]
    q = queue(*((n, float(i)) for i, n in enumerate(names)))
    budget = 10_000
    batch = q.take_batch(chunk_size=1000, budget=budget, path_bytes=1)
    commit_bytes = sum(2 * len(c.rel) + COMMIT_RECORD_BYTES for c in batch)
    assert 0 < len(batch) < 100 and commit_bytes <= budget


def test_candidate_directory() -> None:
    assert Candidate("a/b/c.fits", 1, 0.0).directory == "a/b"
    assert Candidate("top.fits", 1, 0.0).directory == ""


def test_empty_queue() -> None:
    q = ReadyQueue()
    assert len(q) == 0
    assert q.take_batch(chunk_size=10, budget=BIG, path_bytes=10) == []


def test_oldest_first_within_a_directory() -> None:
    q = queue(("d/c", 3.0), ("d/a", 1.0), ("d/b", 2.0))
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["d/a", "d/b", "d/c"]
    assert len(q) == 0


def test_one_directory_per_batch_oldest_directory_first() -> None:
    q = queue(("new/1", 5.0), ("old/1", 1.0), ("new/2", 6.0), ("old/2", 7.0), ("top", 3.0))
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["old/1", "old/2"]
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["top"]
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["new/1", "new/2"]
    assert q.take_batch(chunk_size=10, budget=BIG, path_bytes=5) == []


def test_oldest_directory_is_judged_by_its_oldest_file_not_its_first_added() -> None:
    """A retried file comes back with its original age after newer siblings were queued."""
    q = ReadyQueue()
    q.add(Candidate("a/new", 1, 50.0))
    q.add(Candidate("b/mid", 1, 30.0))
    q.add(Candidate("a/retried", 1, 10.0))  # the oldest file of all
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["a/retried", "a/new"]
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["b/mid"]


def test_nested_directories_are_separate() -> None:
    q = queue(("a/x", 1.0), ("a/b/y", 2.0), ("a/b/z", 3.0))
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["a/x"]
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)) == ["a/b/y", "a/b/z"]


def test_chunk_size_is_respected() -> None:
    q = queue(*((f"d/{i:02d}", float(i)) for i in range(25)))
    sizes = []
    while len(q):
        batch = q.take_batch(chunk_size=10, budget=BIG, path_bytes=5)
        sizes.append(len(batch))
    assert sizes == [10, 10, 5]


def test_chunk_size_one() -> None:
    q = queue(("d/a", 1.0), ("d/b", 2.0))
    assert rels(q.take_batch(chunk_size=1, budget=BIG, path_bytes=5)) == ["d/a"]
    assert rels(q.take_batch(chunk_size=1, budget=BIG, path_bytes=5)) == ["d/b"]


def test_argv_budget_is_respected() -> None:
    names = [f"dir/file-{i:03d}.fits" for i in range(50)]
    q = queue(*((n, float(i)) for i, n in enumerate(names)))
    path_bytes = len("/data/buffer/")
    budget = 7 * cost(names[0], path_bytes) + 3  # room for seven, not eight
    batch = q.take_batch(chunk_size=1000, budget=budget, path_bytes=path_bytes)
    assert rels(batch) == names[:7]
    assert sum(cost(c.rel, path_bytes) for c in batch) <= budget


def test_budget_exactly_filled() -> None:
    q = queue(("d/a", 1.0), ("d/b", 2.0), ("d/c", 3.0))
    budget = cost("d/a", 10) + cost("d/b", 10)
    assert rels(q.take_batch(chunk_size=10, budget=budget, path_bytes=10)) == ["d/a", "d/b"]


def test_budget_counts_bytes_not_characters() -> None:
    wide = "d/" + "é" * 10  # 20 bytes in UTF-8, 10 characters
    q = queue((wide, 1.0), ("d/" + "ü" * 10, 2.0))
    budget = cost(wide, 0) + 5
    assert len(q.take_batch(chunk_size=10, budget=budget, path_bytes=0)) == 1


def test_non_utf8_names_are_measured_as_bytes() -> None:
    name = "d/" + os.fsdecode(b"\xff\xfe-raw")
    q = queue((name, 1.0), ("d/other", 2.0))
    assert rels(q.take_batch(chunk_size=10, budget=cost(name, 0), path_bytes=0)) == [name]


def test_at_least_one_file_even_over_budget() -> None:
    q = queue(("d/" + "x" * 500, 1.0), ("d/y", 2.0))
    batch = q.take_batch(chunk_size=10, budget=10, path_bytes=100)
    assert len(batch) == 1 and batch[0].rel.startswith("d/x")
    assert rels(q.take_batch(chunk_size=10, budget=10, path_bytes=100)) == ["d/y"]


def test_add_is_idempotent_and_updates() -> None:
    q = ReadyQueue()
    q.add(Candidate("d/a", 1, 5.0))
    q.add(Candidate("d/a", 2, 5.0))
    assert len(q) == 1
    [item] = q.take_batch(chunk_size=10, budget=BIG, path_bytes=0)
    assert item.size == 2


def test_remove_and_contains() -> None:
    q = queue(("d/a", 1.0), ("d/b", 2.0), ("e/c", 3.0))
    assert "d/a" in q and "e/c" in q
    assert "d/zzz" not in q and "zzz" not in q
    q.remove("d/a")
    q.remove("d/a")  # twice is harmless
    q.remove("never/added")
    assert "d/a" not in q
    assert len(q) == 2
    q.remove("e/c")
    assert len(q) == 1
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=0)) == ["d/b"]
    assert len(q) == 0 and "d/b" not in q


def test_taken_files_leave_the_queue() -> None:
    q = queue(("d/a", 1.0), ("d/b", 2.0))
    q.take_batch(chunk_size=1, budget=BIG, path_bytes=0)
    assert "d/a" not in q and "d/b" in q and len(q) == 1


@settings(max_examples=200, deadline=None)
@given(
    items=st.dictionaries(
        st.tuples(st.sampled_from(["", "a", "a/b", "c d"]), st.text("xyz-é", min_size=1, max_size=6)),
        st.floats(0, 1000, allow_nan=False),
        max_size=40,
    ),
    chunk_size=st.integers(1, 8),
    budget=st.integers(0, 400),
    path_bytes=st.integers(0, 30),
)
def test_batches_partition_the_queue(
    items: dict[tuple[str, str], float], chunk_size: int, budget: int, path_bytes: int
) -> None:
    q = ReadyQueue()
    expected = {}
    for (directory, name), since in items.items():
        rel = f"{directory}/{name}" if directory else name
        q.add(Candidate(rel, 1, since))
        expected[rel] = since
    taken: list[str] = []
    while True:
        before = len(q)
        batch = q.take_batch(chunk_size=chunk_size, budget=budget, path_bytes=path_bytes)
        if not batch:
            assert before == 0
            break
        assert len(q) == before - len(batch)
        assert 1 <= len(batch) <= chunk_size
        assert len({c.directory for c in batch}) == 1
        if len(batch) > 1:
            assert sum(cost(c.rel, path_bytes) for c in batch) <= budget
        # the batch starts with the oldest file still queued
        remaining = {r: s for r, s in expected.items() if r not in taken}
        assert batch[0].since == min(remaining.values())
        assert [c.since for c in batch] == sorted(c.since for c in batch)
        taken.extend(c.rel for c in batch)
    assert sorted(taken) == sorted(expected)


def test_arg_budget_is_positive_and_below_arg_max() -> None:
    arg_max = os.sysconf("SC_ARG_MAX")
    budget = arg_budget()
    assert 0 < budget < arg_max
    assert budget >= 16 * 1024


def test_arg_budget_leaves_room_for_the_environment() -> None:
    assert arg_budget(env_bytes=0) > arg_budget(env_bytes=10_000)
    assert arg_budget(env_bytes=0) < os.sysconf("SC_ARG_MAX")


def test_arg_budget_has_a_floor() -> None:
    assert arg_budget(env_bytes=1 << 40) == 16 * 1024


@pytest.mark.parametrize("error", [ValueError, OSError])
def test_arg_budget_without_sysconf(monkeypatch: pytest.MonkeyPatch, error: type[Exception]) -> None:
    def broken(name: str) -> int:
        raise error(name)

    monkeypatch.setattr(os, "sysconf", broken)
    assert 16 * 1024 <= arg_budget(env_bytes=0) < 128 * 1024


def test_spread_fills_the_batch_from_the_next_oldest_directories() -> None:
    q = ReadyQueue()
    for rel, since in [("old/a", 1.0), ("old/b", 2.0), ("new/c", 3.0), ("newer/a", 4.0), ("newer/d", 5.0)]:
        q.add(Candidate(rel, 1, since))
    batch = q.take_batch(chunk_size=10, budget=BIG, path_bytes=5, spread=True)
    # newer/a waits: the flat staging slot already has an "a" in this batch.
    assert rels(batch) == ["old/a", "old/b", "new/c", "newer/d"]
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5, spread=True)) == ["newer/a"]


def test_spread_respects_chunk_size_across_directories() -> None:
    q = ReadyQueue()
    for i in range(6):
        q.add(Candidate(f"d{i % 3}/f{i}", 1, float(i)))
    assert len(q.take_batch(chunk_size=4, budget=BIG, path_bytes=5, spread=True)) == 4
    assert len(q.take_batch(chunk_size=4, budget=BIG, path_bytes=5, spread=True)) == 2


def test_max_bytes_spreads_large_files_over_batches_but_always_sends_one() -> None:
    q = ReadyQueue()
    for i in range(5):
        q.add(Candidate(f"big/f{i}", 100, float(i)))
    assert len(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5, spread=True, max_bytes=250)) == 2
    q.add(Candidate("huge/h", 10_000, -1.0))
    assert rels(q.take_batch(chunk_size=10, budget=BIG, path_bytes=5, spread=True, max_bytes=250)) == [
        "huge/h"
    ]


def visit(count: int, size: int) -> ReadyQueue:
    q = ReadyQueue()
    for i in range(count):
        q.add(Candidate(f"night/img{i:05d}.fits", size, float(i)))
    return q


def test_a_visit_is_split_over_every_free_slot_balanced_by_bytes() -> None:
    """189 x 256 KiB already ready and two free slots: one batch each, not one batch for all
    (over a long link one ssh channel is window-limited and an idle slot halves throughput)."""
    q = visit(189, 256 * 1024)
    first = q.take_batch(chunk_size=5000, budget=BIG, path_bytes=10, spread=True, slots=2)
    second = q.take_batch(chunk_size=5000, budget=BIG, path_bytes=10, spread=True, slots=1)
    assert len(q) == 0
    assert {len(first), len(second)} == {94, 95}
    assert rels(first) == [f"night/img{i:05d}.fits" for i in range(94)]  # the oldest go first


@pytest.mark.parametrize("slots", [2, 3, 4, 8])
def test_unequal_files_are_shared_by_bytes_not_by_count(slots: int) -> None:
    q = ReadyQueue()
    sizes = [(i * 7919) % 1000 + 1 for i in range(300)]
    for i, size in enumerate(sizes):
        q.add(Candidate(f"d/f{i:04d}", size, float(i)))
    total = sum(sizes)
    loads = []
    for free in range(slots, 0, -1):
        loads.append(sum(c.size for c in q.take_batch(chunk_size=5000, budget=BIG, path_bytes=1, slots=free)))
    assert sum(loads) == total and len(q) == 0
    assert max(loads) - min(loads) <= 2 * max(sizes)


def test_a_share_always_takes_one_file_and_a_single_slot_takes_all() -> None:
    q = visit(3, 1000)
    assert len(q.take_batch(chunk_size=5000, budget=BIG, path_bytes=1, slots=8)) == 1
    assert len(q.take_batch(chunk_size=5000, budget=BIG, path_bytes=1, slots=1)) == 2


def test_the_ready_bytes_follow_adds_replacements_and_removals() -> None:
    q = visit(4, 1000)
    q.add(Candidate("night/img00001.fits", 50, 9.0))  # the same file again, now smaller
    q.remove("night/img00002.fits")
    q.remove("night/never.fits")
    assert q.bytes == 2050 and len(q) == 3
    q.take_batch(chunk_size=5000, budget=BIG, path_bytes=1)
    assert q.bytes == 0


def test_a_big_visit_goes_in_equal_batches_that_keep_every_slot_busy_to_the_end() -> None:
    """24 x 32 MiB with the 256 MiB cap on two slots: four batches of 192 MiB (two rounds),
    not 256 + 256 + 256 MiB, whose third batch would leave one slot idle."""
    mib = 1024 * 1024
    q = visit(24, 32 * mib)
    sizes = []
    free = 2
    while len(q):
        batch = q.take_batch(chunk_size=5000, budget=BIG, path_bytes=1, max_bytes=256 * mib, slots=free)
        sizes.append(sum(c.size for c in batch) // mib)
        free = 1  # the other slot is still busy when each later batch is planned
    assert sizes == [192, 192, 192, 192]


@pytest.mark.parametrize(
    ("ready", "slots", "cap", "share"),
    [
        (1000, 1, None, None),
        (1000, 2, None, 500),
        (1001, 2, None, 501),
        (100, 1, 256, 100),
        (768, 2, 256, 192),
        (600, 1, 256, 200),
        (0, 2, 256, 1),
    ],
)
def test_byte_share(ready: int, slots: int, cap: int | None, share: int | None) -> None:
    assert byte_share(ready, slots, cap) == share
