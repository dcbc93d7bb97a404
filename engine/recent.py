"""Records read from the database moments ago, kept for a short while.

Access keys and devices are looked up on every request that presents them, and a status
answer names the user; a transaction does each several times within a second. Keeping what
was read for ``seconds`` spares those reads. The price is bounded staleness: a revoked
access key or a locked device may still authenticate a request in this process for up to
that long, unless the change notice that makes every process forget them all (engine/
peers.py, ``on_records``) arrives first, as it does within milliseconds. An answer's device
status is always read afresh when the answer is stored (engine/actors.py), so a locked
device's signature never counts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    def __init__(
        self, *, seconds: float, size: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._seconds = seconds
        self._size = size
        self._clock = clock
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < self._clock():
            del self._entries[key]
            return None
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()

    def put(self, key: K, value: V) -> None:
        self._entries[key] = (self._clock() + self._seconds, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
