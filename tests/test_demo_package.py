"""demo/ holds the demo-only code (circles, the tiny base's recipe, the report): the product packages never
import it, so they install and run without it, and train/ reads manifests, never pipeline/ code."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "demo"


def product_packages() -> list[str]:
    """The top-level packages pyproject.toml installs, demo/ left out."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    names = sorted({pattern.rstrip("*").rstrip(".") for pattern in include} - {DEMO})
    assert names and all((ROOT / name / "__init__.py").is_file() for name in names), names
    return names


def module_of(path: Path) -> str:
    """The file's dotted name, ``__init__`` kept, so its package is everything before the last part."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imports(source: str, module: str) -> set[str]:
    """Every module ``source`` (the file named ``module``, see ``module_of``) imports, lazy and TYPE_CHECKING
    ones included, relative imports resolved; ``from a import b`` yields both ``a`` and ``a.b``."""
    package = module.split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level] if node.level else []  # level 1: the file's package
            origin = ".".join(base + ([node.module] if node.module else []))
            found.update([origin] if origin else [])
            found.update(f"{origin}.{alias.name}" if origin else alias.name for alias in node.names)
    return found


def reaches(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def product_files() -> list[Path]:
    return [path for name in product_packages() for path in sorted((ROOT / name).rglob("*.py"))]


@pytest.mark.parametrize("source, module, found", [
    ("import demo", "train.metrics", {"demo"}),
    ("def f():\n    from demo.circles import circle\n", "train.metrics", {"demo.circles", "demo.circles.circle"}),
    ("from demo import report", "pipeline.annotate", {"demo", "demo.report"}),
    ("from .. import demo", "train.families.flow", {"train", "train.demo"}),  # a train module, not demo/
    ("from ... import demo", "train.families.flow", {"demo"}),
    ("from . import demo", "train.__init__", {"train", "train.demo"}),
    ("from .. import demo", "train.__init__", {"demo"}),
    ("if TYPE_CHECKING:\n    import demo.samples as s\n", "manifests.io", {"demo.samples"}),
    ("import numpy\nfrom train.metrics import CIRCLE_PALETTE", "train.x", {"numpy", "train.metrics",
                                                                          "train.metrics.CIRCLE_PALETTE"}),
])
def test_the_import_scan_finds_every_form_of_import(source, module, found):
    assert imports(source, module) == found


def test_no_product_package_imports_demo():
    offenders = {module_of(path): sorted(reaches(imports(path.read_text(), module_of(path)), DEMO))
                 for path in product_files()}
    assert {m: names for m, names in offenders.items() if names} == {}


def test_train_imports_nothing_from_pipeline():
    """The manifest on disk is the only hand-off between annotation and training."""
    files = sorted((ROOT / "train").rglob("*.py"))
    offenders = {module_of(p): sorted(reaches(imports(p.read_text(), module_of(p)), "pipeline")) for p in files}
    assert {m: names for m, names in offenders.items() if names} == {}


def test_the_demo_modules_are_in_demo_and_gone_from_the_product():
    for name in ("circles", "samples", "tiny_base", "report"):
        assert (ROOT / DEMO / f"{name}.py").is_file(), name
    for old in ("pipeline/samples.py", "train/tiny_base.py", "train/report.py"):
        assert not (ROOT / old).exists(), old


def test_no_demo_function_is_over_60_lines():
    long = [f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in sorted((ROOT / DEMO).rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60]
    assert long == []


def test_the_circle_task_metrics_read_back_what_the_demo_draws():
    """The colours and caption format live with the metric (train/metrics.py); the demo draws with them."""
    import numpy as np

    from demo.circles import circle
    from train import metrics

    for index in range(24):
        image, caption = circle(3, index, 64)
        colours = metrics.caption_colours(caption)
        assert colours is not None and set(colours) <= set(metrics.CIRCLE_PALETTE)
        rgb = np.asarray(image)
        assert metrics.image_colours(rgb) == colours and metrics.colour_match(rgb, caption) == 1.0
