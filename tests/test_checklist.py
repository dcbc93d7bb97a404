"""docs/discussion/reliability.md maps every item of the PSD2 checklist to the tests that
prove it: every item is there, and every test it names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = ROOT / "docs" / "discussion" / "reliability.md"
ITEMS = 23


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


def test_every_checklist_item_is_mapped_and_every_named_test_exists() -> None:
    text = DOCUMENT.read_text(encoding="utf-8")
    table = text[text.index("## The PSD2 checklist") :]
    rows = re.findall(r"^\| (\d+) ", table, flags=re.MULTILINE)
    assert [int(row) for row in rows] == list(range(1, ITEMS + 1))
    named = re.findall(r"(tests/[\w/]+\.py)::(\w+)", table)
    assert len(named) >= 30
    missing = [f"{path}::{name}" for path, name in named if name not in _tests_in(ROOT / path)]
    assert missing == []
