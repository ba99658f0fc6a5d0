"""The annotation job resolves its output location once per run (on S3 each resolve builds a new
filesystem object) and passes the resolved location down: the lock, the plan, the sink, the
duplicates pass and the summary all use that one."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from manifests import io as mio
from pipeline.annotate import run
from pipeline.config import AnnotateConfig


@pytest.fixture
def resolves(monkeypatch) -> list[str]:
    """Every path or URI resolved in this process, whichever module calls the resolver (``from manifests.io
    import resolve`` binds it under other names too). A ``Location`` handed to it is already resolved
    (it gives its own filesystem, nothing is built), so it does not count."""
    calls: list[str] = []
    real = mio.resolve

    def spy(uri_or_path):
        if not isinstance(uri_or_path, mio.Location):
            calls.append(str(uri_or_path))
        return real(uri_or_path)

    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").split(".")[0] in ("manifests", "pipeline")
                and getattr(module, "resolve", None) is real):
            monkeypatch.setattr(module, "resolve", spy)
    return calls


def images(folder: Path, count: int) -> Path:
    """``count`` distinct small photos-like images (noise, so no two are near duplicates)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(folder / f"img_{k:02d}.png")
    return folder


def under(output: Path, calls: list[str]) -> list[str]:
    root = str(output.resolve())
    return [c for c in calls if str(Path(c).resolve()).startswith(root)]


def test_a_run_resolves_its_output_once(local_ray, tmp_path, resolves):
    source = images(tmp_path / "in", 6)
    out = tmp_path / "out"
    config = AnnotateConfig(input=str(source), output=str(out), shard_size=2, resolution=64)
    summary = run(config)
    assert summary["counts"]["ok"] == 6
    assert len(under(out, resolves)) == 1, under(out, resolves)

    resolves.clear()  # a rerun with nothing to do, and one that redoes every shard
    run(config)
    assert len(under(out, resolves)) == 1, under(out, resolves)
    resolves.clear()
    run(AnnotateConfig(input=str(source), output=str(out), shard_size=2, resolution=64, overwrite=True))
    assert len(under(out, resolves)) == 1, under(out, resolves)
