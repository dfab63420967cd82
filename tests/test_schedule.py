"""Unit tests for the scheduler, the slot pool and the file table's transition rules.

The scheduler is pure logic over ``now``: every test drives it with a fake clock (plain
numbers), never sleeping.
"""

from __future__ import annotations

import random

import pytest

from hdfmgr.files import (
    COMMITTED,
    COMMITTING,
    FAILED,
    GONE,
    HELD,
    NEW,
    QUARANTINED,
    READY,
    STAGING,
    TRANSITIONS,
    FileTable,
    IllegalTransition,
    Known,
)
from hdfmgr.schedule import Pending, Scheduler
from hdfmgr.slots import SlotPool, SlotState


def scheduler(*, once: bool = False, threshold: int = 3) -> Scheduler:
    return Scheduler(
        retry_initial=1.0, retry_max=60.0, breaker_threshold=threshold, once=once, rng=random.Random(7)
    )


# ---------------------------------------------------------------------- scheduler


def test_a_retry_comes_back_when_it_is_due_and_not_before() -> None:
    sched = scheduler()
    sched.retry_at("a.fits", 10.0)
    assert sched.release(9.9, lambda rel: True) == []
    assert sched.deadlines() == [10.0]
    assert sched.release(10.0, lambda rel: True) == ["a.fits"]
    assert sched.deadlines() == []


def test_a_retry_of_a_file_no_longer_failed_is_dropped() -> None:
    sched = scheduler()
    sched.retry_at("a.fits", 1.0)
    assert sched.release(2.0, lambda rel: False) == []
    assert not sched.retry_heap


def test_a_rescan_never_retries_it_drops_every_retry_at_once() -> None:
    sched = scheduler(once=True)
    sched.retry_at("a.fits", 1000.0)
    assert sched.deadlines() == []  # a rescan does not wait for a retry
    assert sched.release(0.0, lambda rel: True) == []
    assert not sched.retry_heap


def test_after_an_outage_every_backed_off_retry_is_due_now() -> None:
    sched = scheduler()
    sched.retry_at("a.fits", 500.0)
    sched.retry_at("b.fits", 5.0)
    sched.endpoint_back(now=20.0)
    assert sorted(sched.release(20.0, lambda rel: True)) == ["a.fits", "b.fits"]


def test_groups_and_new_batches_take_turns() -> None:
    sched = scheduler()
    delay, pieces = sched.regroup(None, ["a", "b", "c"])
    assert delay > 0 and [(p.rels, alone) for p, alone in pieces] == [(["a", "b", "c"], False)]
    sched.add_group(pieces[0][0], due=delay)
    sched.enqueue("new.fits", 10, since=0.0)
    sched.release(delay, lambda rel: True)
    assert sched.may_dispatch()
    assert sched.next_is_group()  # a due group first ...
    group_id, group = sched.take_group()
    assert group.rels == ["a", "b", "c"]
    assert not sched.next_is_group()  # ... then a new batch
    sched.rides(batch_id=42, group_id=group_id)
    assert sched.landed(42) is group
    assert sched.landed(42) is None  # a first try carries no group


def test_a_group_is_split_only_once_other_batches_got_through() -> None:
    sched = scheduler()
    _, pieces = sched.regroup(None, ["a", "b"])
    group = pieces[0][0]
    for _ in range(5):  # the link fails everything: the group stays whole
        sched.health.record(False)
        _, pieces = sched.regroup(group, group.rels)
        assert len(pieces) == 1 and pieces[0][0].rels == ["a", "b"]
    for _ in range(40):  # others get through now
        sched.health.record(True)
    halves = []
    for _ in range(10):
        _, pieces = sched.regroup(group, group.rels)
        if len(pieces) == 2:
            halves = [p.rels for p, _ in pieces]
            break
    assert halves == [["a"], ["b"]]


def test_the_breaker_stops_dispatch_and_its_probe_is_a_deadline() -> None:
    sched = scheduler(threshold=1)
    sched.enqueue("a.fits", 1, since=0.0)
    assert sched.may_dispatch()
    assert sched.breaker.record_transport_failure(100.0, jitter=0.5)
    assert not sched.may_dispatch()
    assert sched.deadlines() == [sched.breaker.probe_at] and sched.breaker.probe_at > 100.0


@pytest.mark.parametrize(
    "pending",
    [Pending(in_flight=1), Pending(settling=2), Pending(in_doubt=True), Pending(sweeping=True)],
)
def test_a_rescan_is_not_drained_while_anything_is_pending(pending: Pending) -> None:
    assert not scheduler(once=True).drained(pending)


def test_a_rescan_is_drained_when_nothing_is_left_to_do() -> None:
    sched = scheduler(once=True)
    assert sched.drained(Pending())
    sched.enqueue("a.fits", 1, since=0.0)
    assert not sched.drained(Pending())


# ---------------------------------------------------------------------- slot pool


def test_a_slot_prepares_until_its_directory_is_known_clean() -> None:
    pool = SlotPool(2)
    slot = pool.take()
    assert slot == 0 and pool.state(0) is SlotState.TRANSFER and pool.needs_prepare(0)
    pool.finished(0, clean=True, prepared=True)
    assert pool.state(0) is SlotState.FREE and not pool.needs_prepare(0)
    pool.take()
    pool.finished(0, clean=False, prepared=False)  # a failed batch leaves copies behind
    assert pool.needs_prepare(0)


def test_a_suspended_slot_is_out_of_use_until_its_directory_is_listed() -> None:
    pool = SlotPool(1)
    slot = pool.take()
    pool.suspend(slot, "/staging/s0", batch=3, files=2, reason="commit reply lost")
    assert pool.free() == 0 and pool.state(slot) is SlotState.SUSPENDED
    pool.listing_failed("listing failed, next in 4 s")
    assert pool.published()[0]["reason"] == "listing failed, next in 4 s"
    pool.listed("/staging/s0")
    assert pool.free() == 1 and pool.state(slot) is SlotState.FREE and pool.needs_prepare(slot)


def test_after_an_outage_every_slot_is_prepared_again() -> None:
    pool = SlotPool(2)
    pool.swept(2)
    assert not pool.needs_prepare(0) and not pool.needs_prepare(1)
    pool.all_dirty()
    assert pool.needs_prepare(0) and pool.needs_prepare(1)


# ---------------------------------------------------------------------- file table


def test_the_transition_table_knows_no_way_out_of_done_and_none_around_committing() -> None:
    assert HELD not in TRANSITIONS  # done is final
    assert TRANSITIONS[NEW] == {READY}
    # A file reaches the endpoint buffer only through COMMITTING, recorded before the mv.
    assert [s for s, targets in TRANSITIONS.items() if COMMITTED in targets] == [COMMITTING]
    # Held only once delivered.
    assert [s for s, targets in TRANSITIONS.items() if HELD in targets] == [COMMITTED]
    assert GONE in TRANSITIONS[QUARANTINED]


@pytest.mark.parametrize(("state", "target"), [(READY, COMMITTED), (STAGING, HELD), (FAILED, COMMITTING)])
def test_an_illegal_transition_is_refused(state: str, target: str) -> None:
    table = FileTable()
    table._known["a.fits"] = Known(1, 10, 1, 2, state)
    with pytest.raises(IllegalTransition, match=r"a\.fits"):
        table._move(["a.fits"], target)
    assert table["a.fits"].state == state
