"""The family registry (train/families/): every family listed, each a concrete adapter in its own module,
no family importing another, and no import cycle anywhere in train/ (lazy imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


TRAIN_MODULES = {module_name(p): p for p in sorted((ROOT / "train").rglob("*.py"))}


def imported(module: str) -> set[str]:
    """The train/ modules ``module`` imports anywhere in its file (top level, in functions, under TYPE_CHECKING)."""
    found = set()
    for node in ast.walk(ast.parse(TRAIN_MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # ``from train import cache`` imports the module train.cache, ``from train.cache import X`` train.cache
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in TRAIN_MODULES else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in TRAIN_MODULES and n != module)
    return found


def test_the_registry_lists_every_family_as_a_concrete_adapter_named_like_its_key():
    from train.adapter import FamilyAdapter
    from train.family_specs import FAMILY_NAMES
    from train.families import FAMILIES

    assert set(FAMILIES) == set(FAMILY_NAMES)
    for name, adapter in FAMILIES.items():
        assert issubclass(adapter, FamilyAdapter) and adapter.name == name
        made = adapter(256)  # abstract methods left out would make this a TypeError
        assert made.resolution == 256


def test_the_abstract_adapter_cannot_be_used_and_names_what_a_family_left_out():
    from train.adapter import FamilyAdapter
    from train.families.unet import SDAdapter

    with pytest.raises(TypeError):
        FamilyAdapter(512)
    partial = type("Partial", (FamilyAdapter,), {k: getattr(SDAdapter, k) for k in FamilyAdapter.__abstractmethods__
                                                 if k != "loss"})
    with pytest.raises(TypeError, match="loss"):
        partial(512)


def test_a_family_added_to_the_registry_is_the_one_load_base_uses(monkeypatch, tmp_path):
    from train import models
    from train.families import FAMILIES
    from train.families.unet import SDAdapter

    loaded = []

    class Toy(SDAdapter):
        name = "toy"

        def load(self, path):
            loaded.append((path, self.resolution))
            return "the toy base"

    monkeypatch.setitem(FAMILIES, "toy", Toy)
    monkeypatch.setattr(models, "detect_family", lambda path: "toy")
    monkeypatch.setattr(models, "base_folder_problem", lambda path, family: None)
    assert models.load_base(str(tmp_path), 64) == "the toy base"
    assert loaded == [(str(tmp_path), 64)]


def test_no_family_module_imports_another_family_or_the_registry():
    from train.families import FAMILIES

    families = {adapter.__module__ for adapter in FAMILIES.values()}
    assert len(families) >= 2
    for module in families:
        assert not imported(module) & (families - {module} | {"train.families"}), module


def test_train_has_no_import_cycle_even_through_lazy_imports():
    graph = {module: imported(module) for module in TRAIN_MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            assert target not in path, f"import cycle: {' -> '.join(path[path.index(target):] + [target])}"
            if target not in done:
                visit(target, path + [target])
        done.add(module)

    for module in sorted(graph):
        visit(module, [module])


def test_each_train_module_imports_first_in_a_fresh_interpreter():
    """Each module imported first (our modules dropped from ``sys.modules`` in between, torch kept), so the
    order of our own imports is the one that module starts; and each family module alone in its own process."""
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(TRAIN_MODULES)!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'train' or m.startswith('train.')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("train.families.unet", "train.families.flow", "train.families"):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert run.returncode == 0, f"import {name}: {run.stderr[-3000:]}"
