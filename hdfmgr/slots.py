"""The slot pool: the endpoint's staging slots, one state each, and what ``status`` shows of them.

State owned: for each slot, one :class:`SlotState` (free, transfer, committing, suspended),
whether its staging directory is known to be there and clean (so that a batch need not
prepare it), and the details ``hdfmgr status`` prints. A slot whose commit reply was lost is
suspended: its directory is the evidence of what that commit did, so nothing may use it
until the reconciliation (:mod:`hdfmgr.recovery`) has listed it.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any


class SlotState(StrEnum):
    FREE = "free"
    TRANSFER = "transfer"  # a batch is preparing, hashing or transferring
    COMMITTING = "committing"  # its verify-and-mv may be renaming files now
    SUSPENDED = "suspended"  # its commit's reply was lost: waiting for a listing


class SlotPool:
    """``count`` slots; the lowest free one is taken first."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._state = {slot: SlotState.FREE for slot in range(count)}
        self._clean = dict.fromkeys(range(count), False)
        self._free = list(range(count - 1, -1, -1))
        #: Suspended slots by staging directory (the listing names directories).
        self._suspended: dict[str, int] = {}
        self.info: dict[int, dict[str, Any]] = {
            slot: {"slot": slot, "state": "free"} for slot in range(count)
        }
        #: Something ``status`` shows changed since it was last published.
        self.changed = True

    def free(self) -> int:
        return len(self._free)

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def _set(self, slot: int, state: SlotState, **details: Any) -> None:
        self._state[slot] = state
        self.info[slot] = {"slot": slot, "state": state.value, **details}
        self.changed = True

    def take(self) -> int:
        """A free slot for a batch (then :meth:`transfer` says which)."""
        slot = self._free.pop()
        self._state[slot] = SlotState.TRANSFER
        return slot

    def transfer(self, slot: int, *, batch: int, files: int, nbytes: int, due: float) -> None:
        """Its batch's details; ``due`` is when ``status`` calls the slot stuck."""
        self._set(
            slot, SlotState.TRANSFER, batch=batch, files=files, bytes=nbytes, since=time.time(), due=due
        )

    def needs_prepare(self, slot: int) -> bool:
        return not self._clean[slot]

    def committing(self, slot: int, *, batch: int, files: int, due: float) -> None:
        info = self.info.get(slot, {})
        self._set(
            slot,
            SlotState.COMMITTING,
            batch=batch,
            files=info.get("files", files),
            bytes=info.get("bytes", 0),
            since=time.time(),
            due=due,
        )

    def finished(self, slot: int, *, clean: bool, prepared: bool) -> None:
        """Its batch is over and its directory's state is known: free again."""
        self._clean[slot] = clean and (prepared or self._clean[slot])
        self._free.append(slot)
        self._set(slot, SlotState.FREE)

    def suspend(self, slot: int, staging_dir: str, *, batch: int, files: int, reason: str) -> None:
        """Its commit's reply was lost: out of use until its directory is listed."""
        self._clean[slot] = False
        self._suspended[staging_dir] = slot
        self._set(slot, SlotState.SUSPENDED, batch=batch, files=files, since=time.time(), reason=reason)

    def listing_failed(self, reason: str) -> None:
        for slot in self._suspended.values():
            self.info[slot]["reason"] = reason
        self.changed = bool(self._suspended) or self.changed

    def listed(self, staging_dir: str) -> None:
        """Its directory was listed: usable again (prepared afresh by its next batch)."""
        slot = self._suspended.pop(staging_dir, None)
        if slot is not None:
            self._clean[slot] = False
            self._free.append(slot)
            self._set(slot, SlotState.FREE)

    def all_dirty(self) -> None:
        """After an outage nothing is known of the slot directories: prepare each again."""
        self._clean = dict.fromkeys(self._clean, False)

    def swept(self, prepared: int) -> None:
        """The start-up sweep created the first ``prepared`` slot directories, empty (no
        batch runs meanwhile: dispatch waits for it)."""
        for slot in range(prepared):
            if self._state[slot] is SlotState.FREE:
                self._clean[slot] = True

    def published(self) -> list[dict[str, Any]]:
        self.changed = False
        return [self.info[slot] for slot in sorted(self.info)]
