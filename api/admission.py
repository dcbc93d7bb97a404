"""Shedding load: new transactions are refused with 503 while the server is saturated.

Every request counts as *active* from the moment its body has arrived until its answer is
ready, except while a status long-poll only waits. When ``limit`` requests are active, the
routes that start a transaction (enrolment, approval, signature) answer 503 ``Overloaded``
with ``Retry-After`` at once. Everything else is still served: the phone's fetch and
answer and the relying party's status calls finish the transactions already started, and
their number is bounded by those transactions. Under a sustained overload latency
therefore stays near ``limit`` / throughput and memory stays flat, instead of both growing
with the queue (docs/discussion/performance.md has the measurement).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from engine.errors import Overloaded


class Admission:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self.shed = 0

    @contextmanager
    def serving(self, *, starts: bool) -> Iterator[None]:
        """Count the request as active; refuse it first if it ``starts`` a transaction
        while the server is saturated."""
        if starts and self.active >= self.limit:
            self.shed += 1
            raise Overloaded("tapsign is at capacity: retry the transaction shortly")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside :meth:`serving`: the request only waits (long-poll) and costs nothing."""
        self.active -= 1
        try:
            yield
        finally:
            self.active += 1
