"""``python -m loadtests.costs`` measures a real server and a real bare ASGI app."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsm.settings import default_module
from loadtests.costs import measure


def test_every_call_of_a_transaction_is_measured() -> None:
    if not Path(default_module()).is_file():
        pytest.skip("SoftHSM2 is not installed: run 'make test' to install it")
    costs = measure(5)
    steps = [name for name in costs if name.startswith(("POST", "GET /device"))]
    assert len(steps) == 4
    # CPU time is counted in clock ticks: a few cheap calls may round to nothing, never
    # below; five complete transactions always show.
    assert all(cost >= 0 for cost in costs.values())
    assert costs["complete transaction (the four calls)"] > 0
    assert costs["complete transaction (the four calls)"] == pytest.approx(
        sum(costs[name] for name in steps)
    )
