"""The annotation half's import graph: no import cycle in manifests/ and pipeline/ (imports inside
functions and under TYPE_CHECKING included), no product module imported inside a function there (a lazy
import kept only for an optional heavy dependency, never to dodge a cycle), and ``manifests`` exporting
every name the README uses from it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The project's own top-level packages (an import of one of them is between product modules).
PRODUCT = ("manifests", "pipeline", "annotators", "captioners", "train", "demo")
CHECKED = ("manifests", "pipeline")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PRODUCT if (ROOT / package).is_dir()
           for p in sorted((ROOT / package).rglob("*.py"))}


def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The product modules an import statement loads (``from manifests import io`` loads manifests.io)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif node.module and node.level == 0:
        names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                 for a in node.names]
    else:
        names = []
    return [n for n in names if n in MODULES]


def imports(module: str) -> list[tuple[str, bool]]:
    """(imported product module, whether the import is inside a function) for each import in ``module``."""
    found = []

    def walk(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((t, in_function) for t in targets(child) if t != module)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(MODULES[module].read_text()), False)
    return found


def cycle_through(module: str, graph: dict[str, set[str]]) -> list[str] | None:
    """An import path from ``module`` back to itself in ``graph`` (``module`` first and last), or None."""
    seen: set[str] = set()
    stack = [[module]]
    while stack:
        path = stack.pop()
        for target in sorted(graph.get(path[-1], ())):
            if target == module:
                return path + [module]
            if target not in seen:
                seen.add(target)
                stack.append(path + [target])
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert cycle_through("a", {"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle_through("a", {"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert cycle_through("a", {"a": {"b"}, "b": {"c"}, "c": {"b"}}) is None  # b <-> c: not through a


def test_manifests_and_pipeline_have_no_import_cycle_even_through_lazy_imports():
    graph = {m: {t for t, _ in imports(m)} for m in MODULES}
    cycles = [cycle_through(m, graph) for m in sorted(graph) if m.split(".")[0] in CHECKED]
    assert not any(cycles), "import cycles: " + "; ".join(" -> ".join(c) for c in cycles if c)


@pytest.mark.parametrize("package", CHECKED)
def test_no_product_module_is_imported_inside_a_function(package):
    lazy = [f"{m} imports {t} inside a function" for m in MODULES if m.split(".")[0] == package
            for t, in_function in imports(m) if in_function]
    assert not lazy, "; ".join(lazy)


def test_every_name_the_readme_uses_from_manifests_is_exported():
    import manifests

    used = set(re.findall(r"\bmanifests\.([A-Za-z_]\w*)\(", (ROOT / "README.md").read_text()))
    assert {"read", "hf_dataset"} <= used
    missing = sorted(n for n in used if n not in manifests.__all__ or not callable(getattr(manifests, n, None)))
    assert not missing, f"README uses manifests.{missing} but manifests does not export it"
