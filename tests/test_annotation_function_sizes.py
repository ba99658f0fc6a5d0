"""No function over 60 lines in the annotation half's product code (manifests/, pipeline/): a longer one is
split into named steps, so each reads in one screen."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def long_functions(package: str) -> list[str]:
    """``path:function (lines)`` for each function (methods and nested ones included) over ``MAX_LINES``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    return found


def test_the_check_counts_a_long_function(tmp_path, monkeypatch):
    body = "\n".join(f"    x{k} = {k}" for k in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    assert long_functions("pkg") == [f"pkg/m.py:long ({MAX_LINES + 1} lines)"]


@pytest.mark.parametrize("package", ["manifests", "pipeline"])
def test_no_function_is_over_60_lines(package):
    assert not long_functions(package)
