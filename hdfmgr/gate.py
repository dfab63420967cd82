"""The start-up gate: what the endpoint provides, known before the first batch goes out.

State owned: whether the endpoint has been asked what the commit needs (its tools, ``b2sum
-z`` in checksum mode, a working ``flock`` on staging, its argument limit), and when to ask
again if it could not be reached. ``run`` asks once before anything else and refuses an unfit
endpoint in one line; an endpoint that cannot be reached then is no reason to stop, but no
batch leaves until it has answered (its argument limit caps every batch: a batch built
without it could be split by the endpoint's ``xargs`` and never commit). The question is
asked again, with backoff, off the loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from .endpoint import Endpoint, EndpointUnfit, ErrorClass, classify
from .replies import Requirements
from .runner import CommandResult

log = logging.getLogger("hdfmgr")


class Gate:
    """Dispatch waits here until the endpoint has said what it provides."""

    def __init__(
        self,
        endpoint: Endpoint,
        verify: str,
        *,
        backoff: Callable[[int], float],
        limit: Callable[[int], None],
        in_background: Callable[[str, Callable[[Callable[[int], None]], tuple[Any, ...]]], None],
    ) -> None:
        self.endpoint = endpoint
        self.verify = verify
        self.backoff = backoff
        self.limit = limit
        self.in_background = in_background
        self.open = False
        self.asking = False
        self.failures = 0
        self.next_ask = 0.0

    def ask_now(self) -> None:
        """At start, on the loop's thread: the answer decides whether ``run`` starts at all."""
        self.answer(*self.endpoint.requirements(), first=True)

    def due(self, now: float) -> bool:
        return not self.open and not self.asking and now >= self.next_ask

    def ask(self) -> None:
        self.asking = True
        self.in_background(
            "hdfmgr-probe", lambda started: ("requirements", *self.endpoint.requirements(started))
        )

    def hurry(self, now: float) -> None:
        self.next_ask = min(self.next_ask, now)

    def answer(self, result: CommandResult, found: Requirements | None, *, first: bool = False) -> None:
        """Apply what the probe found; raises :class:`EndpointUnfit` for an endpoint that
        cannot run the commit (at start, or once it first answers)."""
        self.asking = False
        if found is None:
            if classify(result) not in (ErrorClass.TRANSPORT, ErrorClass.TIMEOUT):
                # It answered, but not as this version's probe does: the commit program
                # itself still moves nothing it cannot verify and lock.
                log.warning(
                    "could not check what the endpoint provides (%s); checking it at each commit",
                    result.describe(),
                )
                self.open = True
                return
            self.failures += 1
            log.log(
                logging.WARNING if first else logging.DEBUG,
                "could not check what the endpoint provides (%s); no batch leaves until it answers",
                result.describe(),
            )
            self.next_ask = time.monotonic() + (0.0 if first else self.backoff(self.failures))
            return
        problems = found.problems(self.verify)
        if problems:
            raise EndpointUnfit(
                f"endpoint cannot run the commit (verify: {self.verify}): "
                + "; ".join(problems)
                + " (see 'hdfmgr doctor')"
            )
        if found.arg_max:
            self.limit(found.arg_max)
        if self.failures:
            log.info("the endpoint answered: it can run the commit (verify: %s)", self.verify)
        self.open = True
