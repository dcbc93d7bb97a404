from __future__ import annotations

from engine.recent import Recent


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_record_is_kept_for_its_seconds_and_then_read_afresh() -> None:
    ticks = Ticks()
    recent: Recent[str, int] = Recent(seconds=1.0, size=10, clock=ticks)
    recent.put("a", 1)
    ticks.now += 0.9
    assert recent.get("a") == 1
    ticks.now += 0.2
    assert recent.get("a") is None
    assert recent.get("never") is None


def test_the_oldest_record_leaves_when_full() -> None:
    recent: Recent[str, int] = Recent(seconds=60.0, size=2, clock=Ticks())
    recent.put("a", 1)
    recent.put("b", 2)
    recent.put("a", 3)  # written again: now the newest
    recent.put("c", 4)
    assert recent.get("b") is None
    assert (recent.get("a"), recent.get("c")) == (3, 4)


def test_forget_drops_a_record_at_once() -> None:
    recent: Recent[str, int] = Recent(seconds=60.0, size=2, clock=Ticks())
    recent.put("a", 1)
    recent.forget("a")
    recent.forget("not there")
    assert recent.get("a") is None
