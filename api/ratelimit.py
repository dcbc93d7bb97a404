"""Rate limits on the device API: per client address and per device, answered with 429.

Each limit is a token bucket: ``per_second`` tokens a second up to ``burst``; a request
takes one, and a request that finds none is refused with 429 ``TooManyRequests`` and a
``Retry-After`` of the time until the next token.

The address limit is checked before anything else of the request is read: a flood of
forged requests from one address is refused before it costs a signature verification.
The device limit is checked after the request's signature is verified, so that it counts
only what the device itself sent: were it keyed on the *claimed* authenticator id, anyone
could exhaust a victim phone's budget by sending junk in its name.

Buckets live in the process (with ``--workers N`` a client gets up to N times the rate, one
bucket per process) and at most ``size`` of them at once: the least recently used bucket
is dropped first, which forgets the client that has been quiet the longest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from tapsign_sdk.problems import TooManyRequests

K = TypeVar("K", bound=Hashable)


class RateLimit(Generic[K]):
    def __init__(
        self,
        per_second: float,
        burst: int,
        *,
        what: str,
        size: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``per_second`` 0 switches the limit off."""
        self.per_second = per_second
        self.burst = burst
        self.refused = 0
        self._what = what
        self._size = size
        self._clock = clock
        #: key → (tokens left, when they were counted)
        self._buckets: OrderedDict[K, tuple[float, float]] = OrderedDict()

    def take(self, key: K) -> None:
        """Take a token for ``key``, or raise :class:`TooManyRequests`."""
        if self.per_second <= 0:
            return
        now = self._clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            self.refused += 1
            raise TooManyRequests(
                f"too many requests from this {self._what}: slow down",
                retry_after=(1.0 - tokens) / self.per_second,
            )
        self._buckets[key] = (tokens - 1.0, now)
        while len(self._buckets) > self._size:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)
