"""train/evaluate.py on a run train.py made: it defaults to what the run trained with (base, manifest,
condition, resolution, duplicates policy, task, held-out rows, from train_summary.json), warns when a flag
given differs or rows the run trained on are scored, and never replaces an evaluation without --overwrite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_evaluate import circle_manifest  # noqa: F401 - the fixture
from tests.test_train import train_args
from train import evaluate

pytestmark = pytest.mark.slow  # trains a tiny run, then generates with it

FAST = ["--num_inference_steps", "2"]


@pytest.fixture(scope="module")
def trained_run(circle_manifest, tiny_sd, tmp_path_factory) -> Path:  # noqa: F811
    """Two steps at 32 px on the circles, duplicates kept, 3 rows held out, the circle task."""
    from train.train import main

    out = tmp_path_factory.mktemp("run") / "circles"
    args = train_args(circle_manifest, tiny_sd, out, "--max_train_steps", "2", "--num_validation_rows", "3",
                      "--validation_task", "circle", "--validation_steps", "2", "--num_validation_images", "1")
    args[args.index("--resolution") + 1] = "32"
    assert main(args) == 0
    return out


def metrics_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_defaults_come_from_the_run(trained_run, circle_manifest, tiny_sd, capsys):  # noqa: F811
    record = json.loads((trained_run / "train_summary.json").read_text())["run"]
    assert record["resolution"] == 32 and record["keep_duplicates"] is True and len(record["held_out_ids"]) == 3
    assert evaluate.main(["--controlnet", str(trained_run), *FAST]) == 0  # nothing else given
    assert "warning" not in capsys.readouterr().err
    result = metrics_of(trained_run / "eval")
    assert [s["id"] for s in result["samples"]] == record["held_out_ids"]  # exactly the rows it held out
    assert result["rows_trained_on"] == 0
    assert result["settings"]["resolution"] == 32 and result["settings"]["keep_duplicates"] is True
    assert result["task"] == "circle" and "circle_iou" in result["controlnet"]
    assert Path(result["manifest"]).samefile(circle_manifest)
    assert Path(result["pretrained_model_name_or_path"]).samefile(tiny_sd)


def test_an_existing_evaluation_is_kept_without_overwrite(trained_run, capsys, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main(["--controlnet", str(trained_run), "--output_dir", str(out), *FAST]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    assert evaluate.main(["--controlnet", str(trained_run), "--output_dir", str(out), "--seed", "3", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(out) in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    assert evaluate.main(["--controlnet", str(trained_run), "--output_dir", str(out), "--seed", "3", "--overwrite",
                          *FAST]) == 0
    assert metrics_of(out)["settings"]["seed"] == 3


def test_flags_that_differ_from_the_run_are_used_with_a_warning(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--controlnet", str(trained_run), "--output_dir", str(out), "--resolution", "64",
                          "--num_samples", "5", *FAST]) == 0
    err = capsys.readouterr().err
    assert "--resolution 64 differs from the run's 32" in err
    assert "2 of the 5 rows evaluated were trained on" in err  # 3 held out, 2 more that it trained on
    result = metrics_of(out)
    assert result["settings"]["resolution"] == 64 and result["num_samples"] == 5 and result["rows_trained_on"] == 2
    assert "evaluate: 100%" in err  # the progress bar over the samples, on stderr


def test_a_controlnet_without_a_run_record_needs_the_flags(tmp_path, capsys):
    folder = tmp_path / "elsewhere" / "controlnet"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    assert evaluate.main(["--controlnet", str(folder.parent)]) == 2
    err = capsys.readouterr().err
    assert "--pretrained_model_name_or_path --manifest --condition" in err and "train_summary.json" in err
