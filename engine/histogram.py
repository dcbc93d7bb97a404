"""Histograms for ``/metrics`` (api/metrics.py): counts of observations per bucket, their
sum and number, per label value, as Prometheus's histogram type wants them."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence

#: Seconds: requests (long-polls wait up to 30 s) and complete transactions (a person
#: answers in seconds to minutes).
REQUEST_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSACTION_SECONDS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Signatures per verifier batch (at most ``[verifier] max_batch``, 128 by default).
BATCH_SIZES = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)


class Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        #: Observations in each bucket alone (not cumulative); above the last bound: none.
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        index = bisect_left(self.bounds, value)
        if index < len(self.counts):
            self.counts[index] += times
        self.sum += value * times
        self.count += times

    def buckets(self) -> Iterator[tuple[str, int]]:
        """``(le, cumulative count)``, ending with ``+Inf``."""
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=True):
            running += count
            yield format(bound, "g"), running
        yield "+Inf", self.count


class Histograms:
    """One :class:`Histogram` per set of labels, rendered (``kind="payment"``, or "")."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.by_label: dict[str, Histogram] = {}

    def observe(self, labels: str, value: float, times: int = 1) -> None:
        histogram = self.by_label.get(labels)
        if histogram is None:
            histogram = self.by_label[labels] = Histogram(self.bounds)
        histogram.observe(value, times)
