"""Workloads: what the benchmark runs, one small module each.

A module here defines ``WORKLOADS``, a list of ``Workload(name, run, order=...)``; ``--only``
selects them by name and a full run runs them all in ``order``. Every module of this package
is found by itself, so adding a workload is adding one file. A workload's ``run(bench)`` measures
hdfmgr and the references it is compared with through the run context (context.py) and records
one row per measurement; every hdfmgr run checks its delivery (every file once, byte-identical,
all held) and a failure fails the whole benchmark.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..context import Bench


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[Bench], None]
    order: int = 100
    ssh: bool = False  # needs the sshd (skipped with --no-ssh)
    quick: bool = True  # part of --quick (which must stay under a minute)


def registry() -> list[Workload]:
    """Every workload of every module in this package, in run order."""
    found: list[Workload] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "WORKLOADS", []))
    return sorted(found, key=lambda w: (w.order, w.name))
