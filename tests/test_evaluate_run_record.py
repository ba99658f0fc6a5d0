"""evaluate.py reads the run's defaults from train_summary.json: a record it cannot use (moved folders, a
damaged or hand-edited file) is one line saying what to pass, never a traceback or a message about a flag
the user did not give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from train import evaluate


def run_folder(tmp_path: Path, summary: dict) -> Path:
    """A run folder as train.py leaves it, as far as evaluate's checks before loading read it."""
    out = tmp_path / "run"
    (out / "controlnet").mkdir(parents=True)
    (out / "controlnet" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    (out / "train_summary.json").write_text(json.dumps(summary))
    return out


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = err.strip().splitlines()
    return line


def test_a_moved_manifest_or_base_names_the_run_record_and_the_flag(tmp_path, capsys):
    gone = tmp_path / "moved"
    out = run_folder(tmp_path, {"conditions": ["canny"], "run": {
        "pretrained_model_name_or_path": str(gone / "sd"), "manifest": str(gone / "manifest"),
        "conditions": ["canny"], "resolution": 64, "keep_duplicates": False, "held_out_ids": ["a"]}})
    assert evaluate.main(["--controlnet", str(out)]) == 2
    line = error_line(capsys)
    assert str(gone / "manifest") in line and str(gone / "sd") in line and "train_summary.json" in line
    assert "pass --pretrained_model_name_or_path --manifest" in line


@pytest.mark.parametrize("run", [
    5,
    {"manifest": 5, "pretrained_model_name_or_path": ["x"], "conditions": "canny"},
    {"manifest": None, "conditions": [1, 2], "resolution": "64", "keep_duplicates": "yes", "held_out_ids": [1]},
])
def test_a_damaged_run_record_is_treated_as_missing(tmp_path, capsys, run):
    out = run_folder(tmp_path, {"run": run})
    assert evaluate.main(["--controlnet", str(out)]) == 2
    line = error_line(capsys)
    assert "train_summary.json" in line and "--manifest" in line and "--pretrained_model_name_or_path" in line


def test_recorded_values_of_the_wrong_type_are_not_used():
    settings = evaluate.run_settings({"run": {"resolution": True, "keep_duplicates": 1, "task": 3, "manifest": "m",
                                              "held_out_ids": ["a", None], "conditions": ["canny", "depth"]}})
    assert settings == {"manifest": "m", "condition": "canny,depth"}
