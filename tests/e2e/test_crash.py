"""The crash test's short form (``make crashtest`` runs it longer; tests/e2e/crash.py): one
server on SQLite, and three hosts on one PostgreSQL database killed one at a time."""

from __future__ import annotations

from pathlib import Path

from tests.e2e.crash import Crashtest
from tests.e2e.serving import postgres_schema


def test_sigkill_under_load_loses_no_approval(tmp_path: Path) -> None:
    report = Crashtest(tmp_path, clients=4, expiry=8, seed=2026).run(3, between=(1.0, 3.0))
    print("\n".join(report.lines()))
    assert report.cycles == 3
    assert report.outcomes["succeeded"] > 0
    assert report.outcomes["expired"] > 0
    assert report.problems == []


def test_sigkill_of_one_host_after_another_loses_no_approval(tmp_path: Path) -> None:
    with postgres_schema() as database:
        report = Crashtest(
            tmp_path, clients=4, expiry=8, seed=2026, hosts=3, database_url=database
        ).run(3, between=(1.0, 3.0))
    print("\n".join(report.lines()))
    assert report.cycles == 3
    assert report.outcomes["succeeded"] > 0
    assert report.outcomes["expired"] > 0
    assert report.problems == []
