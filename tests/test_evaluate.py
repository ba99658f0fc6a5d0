"""train/evaluate.py on the tiny SD and a circle manifest annotated by the real pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import manifests
from pipeline.annotate import run
from pipeline.config import AnnotateConfig
from demo.circles import write_circles
from tests.conftest import ROOT
from train import evaluate, grids

pytestmark = pytest.mark.slow  # generates with a ControlNet and the base alone

SCRIPT = str(ROOT / "train" / "evaluate.py")
TILE = 128  # 64 px samples are scaled up to this in the grid


@pytest.fixture(scope="module")
def circle_manifest(local_ray, tmp_path_factory) -> Path:
    """Six raw circles annotated with canny at 64 px."""
    root = tmp_path_factory.mktemp("circles")
    write_circles(root / "raw", 6, size=64, seed=0)
    run(AnnotateConfig(input=str(root / "raw"), output=str(root / "manifest"), resolution=64))
    return root / "manifest"


@pytest.fixture(scope="module")
def controlnets(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """Train.py-style output folders: ``fresh`` (zero convolutions, as from_unet makes it) and
    ``perturbed`` (zero convolutions randomised, so the condition changes the images)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    root = tmp_path_factory.mktemp("controlnets")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    torch.manual_seed(0)
    fresh = ControlNetModel.from_unet(unet)
    fresh.save_pretrained(root / "fresh" / "controlnet")
    with torch.no_grad():
        for block in [*fresh.controlnet_down_blocks, fresh.controlnet_mid_block]:
            block.weight.normal_(0, 0.5)
    fresh.save_pretrained(root / "perturbed" / "controlnet")
    return {"fresh": root / "fresh", "perturbed": root / "perturbed"}


def argv(controlnet: Path, sd: Path, manifest: Path, out: Path, *extra: str) -> list[str]:
    return ["--controlnet", str(controlnet), "--pretrained_model_name_or_path", str(sd), "--manifest", str(manifest),
            "--condition", "canny", "--output_dir", str(out), "--num_inference_steps", "2", *extra]


def grid_columns(path: Path, rows: int, tile: int = TILE) -> list[list[np.ndarray]]:
    """The grid's tiles as [sample][tile] arrays (condition, with ControlNet, base alone)."""
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(rows, 3, tile, columns=4)
    assert sheet.shape == (where.size[1], where.size[0], 3)
    return [[sheet[y:y + tile, x:x + tile] for x, y in (where.origin(r, c) for c in range(3))] for r in range(rows)]


def test_writes_metrics_and_grid(controlnets, tiny_sd, circle_manifest, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main(argv(controlnets["fresh"], tiny_sd, circle_manifest, out,
                              "--num_samples", "3", "--task", "circle")) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["num_samples"] == 3 and result["condition"] == "canny" and result["task"] == "circle"
    names = {"edge_f1", "circle_iou", "colour_accuracy"}
    for side in ("controlnet", "base"):
        assert set(result[side]) == names
        assert all(0.0 <= v <= 1.0 for v in result[side].values())
    ids = sorted(manifests.read(str(circle_manifest), columns=["id"])["id"])[:3]
    assert [s["id"] for s in result["samples"]] == ids  # the first N ok rows by id
    assert all(s["caption"].endswith("background") for s in result["samples"])
    assert result["settings"]["annotator_params"]["low"] == 100  # the manifest's own canny settings
    tiles = grid_columns(out / result["grid"], rows=3)
    # A fresh ControlNet's zero convolutions add nothing: with the same seed and prompt both
    # columns are the same image, so the metrics agree too.
    assert all(np.array_equal(row[1], row[2]) for row in tiles)
    assert result["controlnet"] == result["base"]
    # The condition column shows the manifest's map (the outline, white on black).
    assert set(np.unique(tiles[0][0])) <= {0, 255} and tiles[0][0].max() == 255


def test_uses_the_controlnet_and_is_deterministic(controlnets, tiny_sd, circle_manifest, tmp_path):
    results = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert evaluate.main(argv(controlnets["perturbed"], tiny_sd, circle_manifest, out, "--num_samples", "2",
                                  "--resolution", "32", "--seed", "5")) == 0
        result = json.loads((out / "metrics.json").read_text())
        result.pop("seconds")
        results.append((result, (out / "grid.png").read_bytes()))
    assert results[0] == results[1]  # same flags, same numbers and pixels
    assert set(results[0][0]["controlnet"]) == {"edge_f1"}
    tiles = grid_columns(tmp_path / "a" / "grid.png", rows=2)
    assert not np.array_equal(tiles[0][1], tiles[0][2])  # the condition changes the image


def test_bad_flags_fail_fast_with_exit_2(controlnets, tiny_sd, circle_manifest, tmp_path, capsys):
    def fails(args: list[str], message: str) -> None:
        assert evaluate.main(args) == 2
        assert message in capsys.readouterr().err

    out = tmp_path / "out"
    fails(argv(tmp_path / "nowhere", tiny_sd, circle_manifest, out), "--controlnet")
    no_index = tmp_path / "not_sd"
    no_index.mkdir()
    fails(argv(controlnets["fresh"], no_index, circle_manifest, out), "model_index.json")
    fails(argv(controlnets["fresh"], tmp_path / "missing" / "sd", circle_manifest, out), "no such folder")
    fails(argv(controlnets["fresh"], tiny_sd, tmp_path, out), "_manifest.json")
    fails(argv(controlnets["fresh"], tiny_sd, circle_manifest, out)[:-2] + ["--condition", "depth"], "cond_depth")
    stacked = tmp_path / "stacked"
    shutil.copytree(controlnets["fresh"], stacked)
    config = json.loads((stacked / "controlnet" / "config.json").read_text())
    (stacked / "controlnet" / "config.json").write_text(json.dumps({**config, "conditioning_channels": 6}))
    fails(argv(stacked, tiny_sd, circle_manifest, out), "6 condition channels")
    assert not out.exists()
    for bad in (["--num_samples", "0"], ["--resolution", "30"], ["--num_inference_steps", "0"], ["--task", "x"]):
        with pytest.raises(SystemExit) as exc:
            evaluate.main(argv(controlnets["fresh"], tiny_sd, circle_manifest, out, *bad))
        assert exc.value.code == 2


def test_runs_by_path(tiny_sd, circle_manifest, tmp_path):
    """``python train/evaluate.py`` finds the project's packages; a bad folder is exit 2 with a hint."""
    done = subprocess.run([sys.executable, SCRIPT, *argv(tmp_path / "nowhere", tiny_sd, circle_manifest,
                                                         tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "no ControlNet there" in done.stderr and "Traceback" not in done.stderr
