"""Which ready files go out together. Pure logic, no I/O.

A batch is planned only when a transfer slot is free. Files that became ready while every slot
was busy therefore leave together in the next batch: at idle a file leaves alone and at once,
under load batches grow by themselves, and no fixed delay is ever added.

All files of a batch share one relative directory, because the transfer command has one
``{dest}`` and a flat staging directory: two files with one basename never meet there.

State owned: none (pure): the ready queue itself is owned by :mod:`hdfmgr.schedule`; this
module only plans batches from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A ready file: its path relative to the buffer, its size and when it became ready."""

    rel: str
    size: int
    since: float

    @property
    def directory(self) -> str:
        return os.path.dirname(self.rel)


#: Argument bytes one file costs the commit beyond its name twice: a checksum, separators.
COMMIT_RECORD_BYTES = 140


def arg_budget(env_bytes: int | None = None) -> int:
    """Bytes of argv one command may use: half of ARG_MAX less the environment, for safety."""
    try:
        arg_max = os.sysconf("SC_ARG_MAX")
    except (ValueError, OSError):
        arg_max = 128 * 1024
    if env_bytes is None:
        env_bytes = sum(len(k) + len(v) + 2 for k, v in os.environb.items())
    return max(16 * 1024, arg_max // 2 - env_bytes - 4096)


def byte_share(ready: int, slots: int, max_bytes: int | None) -> int | None:
    """The most data one batch may take when ``ready`` bytes wait and ``slots`` slots are free.

    Equal shares, in as few rounds over the slots as ``max_bytes`` allows: 768 MiB on two
    slots with a 256 MiB cap go as four batches of 192 MiB (two rounds, both slots busy to
    the end), not as 256 + 256 + 256 MiB with one slot idle during the third. ``None``: no
    limit (one slot and no cap). At least one file always goes, whatever the share.
    """
    slots = max(1, slots)
    if max_bytes is None:
        return None if slots == 1 else max(1, -(-ready // slots))
    rounds = max(1, -(-ready // (slots * max_bytes)))
    return max(1, min(max_bytes, -(-ready // (slots * rounds))))


class ReadyQueue:
    """Ready files per directory, oldest first, with the batch planner on top."""

    def __init__(self) -> None:
        self._by_dir: dict[str, dict[str, Candidate]] = {}
        self._count = 0
        self._bytes = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, rel: str) -> bool:
        return rel in self._by_dir.get(os.path.dirname(rel), {})

    def add(self, item: Candidate) -> None:
        files = self._by_dir.setdefault(item.directory, {})
        old = files.get(item.rel)
        if old is None:
            self._count += 1
        else:
            self._bytes -= old.size
        self._bytes += item.size
        files[item.rel] = item

    @property
    def bytes(self) -> int:
        """The data of every ready file."""
        return self._bytes

    def remove(self, rel: str) -> None:
        directory = os.path.dirname(rel)
        files = self._by_dir.get(directory)
        gone = files.pop(rel, None) if files is not None else None
        if gone is not None:
            self._count -= 1
            self._bytes -= gone.size
            if not files:
                del self._by_dir[directory]

    def take_batch(
        self,
        *,
        chunk_size: int,
        budget: int,
        path_bytes: int,
        spread: bool = False,
        max_bytes: int | None = None,
        slots: int = 1,
    ) -> list[Candidate]:
        """Remove and return the next batch: the oldest file and its oldest siblings.

        With ``spread`` the batch goes on into the next-oldest directories until it is full,
        taking only files whose basename is not in the batch yet (the staging slot is flat);
        a file left out waits for the next batch. ``budget`` is the argv space for file
        arguments and ``path_bytes`` the length of the absolute prefix each relative path
        gets; the batch stops before either limit. The remote commit gets each name as an
        argument too, so a file's cost is whichever of the two commands it weighs more in.
        ``max_bytes`` bounds the data of one batch (at least one file always goes), so that
        large files spread over the transfer slots instead of queueing behind one another in
        a single batch.

        ``slots`` is the number of transfer slots free now, this batch's included: the batch
        then takes at most its share of the ready data (``byte_share``), so that a visit
        already in the buffer travels over every free slot at once. Over a long link one ssh
        channel is limited by its window, and a second slot left idle halves the throughput.
        """
        if not self._by_dir:
            return []
        max_bytes = byte_share(self._bytes, slots, max_bytes)
        # By its oldest file, not its first added: a retried file comes back with its old age.
        oldest = {d: min(c.since for c in files.values()) for d, files in self._by_dir.items()}
        directories = (
            sorted(oldest, key=oldest.__getitem__) if spread else [min(oldest, key=oldest.__getitem__)]
        )
        batch: list[Candidate] = []
        names: set[str] = set()
        used = 0
        data = 0
        full = False
        for directory in directories:
            for item in sorted(self._by_dir[directory].values(), key=lambda c: c.since):
                rel_bytes = len(item.rel.encode("utf-8", "surrogateescape"))
                # The transfer's argv, or the commit's (name twice, a size or a checksum).
                cost = max(path_bytes + rel_bytes + 1 + 8, 2 * rel_bytes + COMMIT_RECORD_BYTES)
                too_big = max_bytes is not None and data + item.size > max_bytes
                if batch and (len(batch) >= chunk_size or used + cost > budget or too_big):
                    full = True
                    break
                name = os.path.basename(item.rel)
                if name in names:
                    continue
                names.add(name)
                batch.append(item)
                used += cost
                data += item.size
            if full:
                break
        for item in batch:
            self.remove(item.rel)
        return batch
