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

from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import TypeVar
from uuid import UUID

from tapsign_sdk.problems import Overloaded

K = TypeVar("K", bound=Hashable)


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


class LongPolls:
    """Bounds the status long-polls held at once: per transaction (its status token) and per
    client address. A long-poll beyond either bound is not held: it is answered at once with
    the current status, as if it had not asked to wait, so that nobody can park thousands of
    requests on the server with one status token."""

    def __init__(self, *, per_transaction: int, per_address: int) -> None:
        self.per_transaction = per_transaction
        self.per_address = per_address
        self._transactions: Counter[UUID] = Counter()
        self._addresses: Counter[str] = Counter()
        self.waiting = 0
        #: Long-polls answered at once because a bound was reached.
        self.not_held = 0

    @contextmanager
    def hold(self, transaction: UUID, address: str) -> Iterator[bool]:
        """Whether this long-poll may wait (True) or must be answered at once (False)."""
        if (
            self._transactions[transaction] >= self.per_transaction
            or self._addresses[address] >= self.per_address
        ):
            self.not_held += 1
            yield False
            return
        self._transactions[transaction] += 1
        self._addresses[address] += 1
        self.waiting += 1
        try:
            yield True
        finally:
            self.waiting -= 1
            _release(self._transactions, transaction)
            _release(self._addresses, address)


def _release(counts: Counter[K], key: K) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]
