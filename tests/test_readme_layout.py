"""The README's Layout section names every module of the product packages (and no module that is gone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("annotators", "captioners", "demo", "manifests", "pipeline", "train")


def layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Layout"):]
    return section[section.index("```") + 3:section.index("```", section.index("```") + 3)]


def test_every_product_module_is_named_in_the_layout():
    block = layout_block()
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__init__.py" and path.parent == ROOT / package:
                continue
            name = path.name if path.name != "__init__.py" else f"{path.parent.name}/"
            if not re.search(rf"(?<![\w/]){re.escape(name)}", block):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"README Layout does not name: {missing}"


def test_the_layout_names_no_module_that_is_gone():
    block = layout_block()
    named = set(re.findall(r"(?<![\w/])([a-z_0-9]+\.py)\b", block))
    present = {p.name for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    present |= {p.name for p in (ROOT / "bench").glob("*.py")}
    assert named - present == set()
