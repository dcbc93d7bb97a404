"""The device API's token buckets (api/ratelimit.py), on a clock the test moves."""

from __future__ import annotations

import pytest

from api.ratelimit import RateLimit
from tapsign_sdk.problems import TooManyRequests


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_then_the_rate_then_refusals_with_the_wait() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(2.0, 3, what="device", clock=clock)
    for _ in range(3):
        limit.take("a")
    with pytest.raises(TooManyRequests) as refused:
        limit.take("a")
    assert refused.value.status == 429
    assert refused.value.retry_after == pytest.approx(0.5)
    assert "device" in str(refused.value)
    limit.take("b")  # another key has its own bucket
    clock.now += 0.5  # one token back at 2/s
    limit.take("a")
    with pytest.raises(TooManyRequests):
        limit.take("a")
    clock.now += 60  # refills to the burst, not beyond
    for _ in range(3):
        limit.take("a")
    with pytest.raises(TooManyRequests):
        limit.take("a")
    assert limit.refused == 3


def test_refused_requests_do_not_postpone_the_next_token() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(1.0, 1, what="client address", clock=clock)
    limit.take("a")
    for _ in range(5):
        clock.now += 0.1
        with pytest.raises(TooManyRequests):
            limit.take("a")
    clock.now += 0.5
    limit.take("a")


def test_zero_rate_is_off() -> None:
    limit: RateLimit[str] = RateLimit(0.0, 1, what="device")
    for _ in range(1000):
        limit.take("a")
    assert limit.refused == 0


def test_at_most_size_buckets_and_the_quietest_goes_first() -> None:
    clock = Clock()
    limit: RateLimit[str] = RateLimit(1.0, 1, what="device", size=2, clock=clock)
    limit.take("a")
    limit.take("b")
    with pytest.raises(TooManyRequests):
        limit.take("a")  # touches a: b is now the quietest
    limit.take("c")
    assert len(limit) == 2
    with pytest.raises(TooManyRequests):
        limit.take("a")  # a was kept
    limit.take("b")  # b was forgotten and starts full
