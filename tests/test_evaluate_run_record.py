"""evaluate.py reads the run's defaults from train_summary.json: a record it cannot use (moved folders, a
damaged or hand-edited file) is one line saying what to pass, never a traceback or a message about a flag
the user did not give."""

from __future__ import annotations

import dataclasses
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


def test_rows_of_another_manifest_count_as_trained_on_only_where_the_runs_manifest_has_them(tmp_path):
    """Fresh outlines in a manifest of their own are held out whatever the run held out; a row whose id the run's
    manifest has too (the same file re-annotated) and that the run did not hold out was trained on."""
    from tests.test_manifest_io import make_rows, write_manifest

    run_manifest, fresh = tmp_path / "run_manifest", tmp_path / "fresh"
    write_manifest(run_manifest, [make_rows(10)])  # id0000..id0009; the run held out id0008, id0009
    write_manifest(fresh, [make_rows(4, start=100) + make_rows(1, start=2) + make_rows(1, start=9)])
    config = evaluate.EvalConfig(controlnet="run", pretrained_model_name_or_path="base", manifest=str(fresh),
                                 condition="canny", num_samples=6, output_dir="eval",
                                 held_out_ids=("id0008", "id0009"), run_manifest=str(run_manifest))
    ids = ["id0100", "id0101", "id0102", "id0103", "id0002", "id0009"]
    assert evaluate.trained_rows(config, ids) == ["id0002"]
    on_its_own = dataclasses.replace(config, manifest=str(run_manifest))
    assert evaluate.trained_rows(on_its_own, ["id0001", "id0008", "id0007"]) == ["id0001", "id0007"]
    gone = dataclasses.replace(config, run_manifest=str(tmp_path / "gone"))
    assert evaluate.trained_rows(gone, ids) == []
