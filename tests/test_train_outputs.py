"""What a finished training run prints and writes for its user: a short summary on the terminal, and a
model card whose snippet runs as printed and whose epoch count is what was trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains a tiny model

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3, 2


@pytest.fixture(scope="module")
def finished_run(demo_manifest, tiny_sd, tmp_path_factory):
    """A 3-step run started from another folder, with the base and output given as relative paths
    (as users type them); returns (output folder, what main printed)."""
    import contextlib
    import io

    from train.train import main

    here = tmp_path_factory.mktemp("elsewhere")
    argv = ["--manifest", str(demo_manifest), "--condition", "canny",
            "--pretrained_model_name_or_path", os.path.relpath(tiny_sd, here), "--output_dir", "run",
            "--resolution", "64", "--train_batch_size", str(BATCH), "--max_train_steps", str(STEPS),
            "--validation_steps", str(STEPS), "--num_validation_rows", "2", "--checkpointing_steps", "100",
            "--seed", "3", "--report_to", "none", "--keep_duplicates"]
    printed = io.StringIO()
    old = Path.cwd()
    os.chdir(here)
    try:
        with contextlib.redirect_stdout(printed):
            assert main(argv) == 0
    finally:
        os.chdir(old)
    return here / "run", printed.getvalue()


def test_the_end_of_a_run_prints_a_short_summary_and_keeps_the_figures_in_the_file(finished_run):
    out, printed = finished_run
    lines = printed.strip().splitlines()
    assert 2 <= len(lines) <= 6, printed  # not one line per trained row index
    assert f"trained {STEPS} steps" in lines[0] and "final loss" in lines[0]
    assert any("edge_f1" in line for line in lines)  # the final validation's scores
    assert str(out / "train_summary.json").endswith(lines[-1].split()[-1])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["figures"]["ranks"][0]["rows"]  # the full record stays in the file


def test_the_model_card_snippet_runs_as_printed_from_the_repository_root(finished_run):
    out, _ = finished_run
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "load_image" in snippet and "num_inference_steps" in snippet
    snippet = snippet.replace('image.save("sample.png")', f"image.save({str(out / 'sample.png')!r})")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from PIL import Image

    assert Image.open(out / "sample.png").size == (64, 64)


def test_the_model_card_reports_the_epochs_trained(finished_run):
    out, _ = finished_run
    summary = json.loads((out / "train_summary.json").read_text())
    rows = summary["figures"]["train_rows"]
    epochs = round(STEPS * BATCH / rows, 2)  # one process, no accumulation
    assert summary["figures"]["epochs"] == epochs
    card = (out / "README.md").read_text()
    assert f'"num_train_epochs": {epochs}' in card and f"- epochs: {epochs}" in card
