"""``python -m loadtests.costs`` measures a real server and a real bare ASGI app."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hsm.settings import default_module
from loadtests.costs import main

ROWS = [
    "bare Hypercorn ASGI app, GET /healthz",
    "tapsign GET /healthz",
    "POST /api/v1/approval (payment)",
    "GET /device/v1/operations/{id} (fetch)",
    "POST /device/v1/operations/{id}/answer",
    "POST /api/v1/status (final)",
    "complete transaction (the four calls)",
]


def test_costs_runs_complete_transactions_and_reports_every_call(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Every transaction must end ``succeeded`` (else the command fails), and each call is
    reported with its ratio to the bare app measured in the same run."""
    if not Path(default_module()).is_file():
        pytest.skip("SoftHSM2 is not installed: run 'make test' to install it")
    assert main(["--transactions", "5"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header == "server CPU per call, sequential, one client, 5 of each:"
    parsed = [
        re.fullmatch(r"  (.+?) +(\d+\.\d\d) ms +(\d+\.\d)x the bare app", row) for row in rows
    ]
    assert [match.group(1) for match in parsed if match] == ROWS
