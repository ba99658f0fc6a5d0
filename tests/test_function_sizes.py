"""Every function in the product packages fits on a screen (60 lines at most, docstring included): long ones
are split into named steps. bench/ and tests/ aside."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("annotators", "captioners", "demo", "manifests", "pipeline", "train")
LIMIT = 60


def long_functions(path: Path) -> list[str]:
    """``name (lines)`` of each function or method in ``path`` over LIMIT lines."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            if lines > LIMIT:
                found.append(f"{node.name} ({lines} lines)")
    return found


def test_the_packages_checked_are_the_ones_pyproject_installs():
    text = (ROOT / "pyproject.toml").read_text()
    assert all(f'"{package}*"' in text for package in PACKAGES)


@pytest.mark.parametrize("module", sorted(str(p.relative_to(ROOT)) for package in PACKAGES
                                          for p in (ROOT / package).rglob("*.py")))
def test_no_product_function_is_over_60_lines(module):
    assert long_functions(ROOT / module) == []
