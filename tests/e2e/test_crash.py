"""The crash test's short form (``make crashtest`` runs it longer; tests/e2e/crash.py)."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.crash import Crashtest


def test_sigkill_under_load_loses_no_approval(tmp_path: Path) -> None:
    report = Crashtest(tmp_path, clients=4, expiry=8, seed=2026).run(3, between=(1.0, 3.0))
    print("\n".join(report.lines()))
    assert report.cycles == 3
    assert report.outcomes["succeeded"] > 0
    assert report.outcomes["expired"] > 0
    assert report.problems == []
