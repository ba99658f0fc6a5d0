"""One validation pass (train/validation.py ``run_validation``) driven by the run it belongs to: the grids it
writes (train/grids.py, the one grid writer), what each condition is scored on, and the TensorBoard image;
with a stand-in family, so no model is built."""

from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


class PaintingFamily:
    """A family whose pipeline paints sample k of each input in COLOURS[k] at ``size`` px, recording each call."""

    samples_in_place = True

    def __init__(self, size: int):
        self.size, self.calls = size, []

    def sampling(self, base, controlnet):
        return contextlib.nullcontext()

    def validation_pipeline(self, base, controlnet):
        return "pipe"

    def sample(self, pipe, base, cond, prompt, per_input, generator, steps, mode):
        self.calls.append({"channels": cond.shape[1], "prompt": prompt, "mode": mode})
        return [Image.new("RGB", (self.size, self.size), COLOURS[k]) for k in range(per_input)]


class Tracker:
    name = "tensorboard"

    def __init__(self):
        self.images = []
        self.writer = types.SimpleNamespace(add_image=lambda tag, image, step, dataformats: self.images.append(
            (tag, image.shape, step)))


def run_for(tmp_path: Path, maps: list[list[tuple[int, int, int]]], condition: tuple[str, ...], union: bool = False,
            sample_size: int = 8, scorer=None):
    """A run validating on --validation_image files (one entry per sample, a map per condition) whose family
    paints its samples; what ``run_validation`` reads from a ``Run``, nothing more."""
    from train.config import TrainConfig

    entries = []
    for k, colours in enumerate(maps):
        files = []
        for c, colour in enumerate(colours):
            files.append(tmp_path / f"map-{k}-{c}.png")
            Image.new("RGB", (8, 8), colour).save(files[-1])
        entries.append(",".join(map(str, files)))
    config = TrainConfig(manifest="m", condition=condition, union=union, pretrained_model_name_or_path="sd",
                         output_dir=str(tmp_path / "out"), resolution=8, num_validation_images=2,
                         validation_image=tuple(entries), validation_prompt=("a prompt",))
    base = types.SimpleNamespace(family=PaintingFamily(sample_size), denoiser=types.SimpleNamespace(device=torch.device("cpu")))
    return types.SimpleNamespace(config=config, base=base, held_out=[], seed=0, weight_dtype=torch.float32,
                                 scorer=scorer)


def strip(colours: list[tuple[int, int, int]], samples: int = 2, size: int = 8) -> np.ndarray:
    """The expected grid row: each map, then each painted sample, tiles edge to edge."""
    tiles = [np.full((size, size, 3), c, np.uint8) for c in colours]
    tiles += [np.full((size, size, 3), COLOURS[k], np.uint8) for k in range(samples)]
    return np.concatenate(tiles, axis=1)


def test_a_pass_reads_the_run_and_writes_the_grid_the_tensorboard_image_and_the_scores(tmp_path):
    from train.validation import run_validation

    scored = []

    def scorer(inputs, samples, label, step, trackers, maps, view):
        scored.append((view.condition, len(inputs), [len(s) for s in samples], label, step, maps))

    run = run_for(tmp_path, [[(255, 255, 255)], [(0, 0, 0)]], ("canny",), scorer=scorer)
    tracker = Tracker()
    paths = run_validation(run, torch.nn.Linear(1, 1), None, "000003", (tracker,), 3)
    assert [p.name for p in paths] == ["step-000003.png"]
    sheet = np.asarray(Image.open(paths[0]))
    assert np.array_equal(sheet, np.concatenate([strip([(255, 255, 255)]), strip([(0, 0, 0)])], axis=0))
    assert [c["prompt"] for c in run.base.family.calls] == ["a prompt", "a prompt"]
    assert scored == [("canny", 2, [2, 2], "000003", 3, None)]  # given images: scored on what the model saw
    assert tracker.images == [("validation", sheet.shape, 3)]
    # the final pass on the exported weights: no trackers, no step
    assert [p.name for p in run_validation(run, torch.nn.Linear(1, 1), None, "final")] == ["step-final.png"]
    assert scored[-1][3:5] == ("final", None)


def test_a_stacked_run_samples_once_and_a_union_run_once_per_condition(tmp_path):
    from train.validation import run_validation

    stacked = run_for(tmp_path, [[(255, 255, 255), (90, 90, 90)]], ("canny", "invert"))
    (path,) = run_validation(stacked, torch.nn.Linear(1, 1), None, "000001")
    assert [c["channels"] for c in stacked.base.family.calls] == [6]
    assert np.array_equal(np.asarray(Image.open(path)), strip([(255, 255, 255), (90, 90, 90)]))

    union = run_for(tmp_path, [[(255, 255, 255)]], ("canny", "invert"), union=True)
    paths = run_validation(union, torch.nn.Linear(1, 1), None, "000001")
    assert [p.name for p in paths] == ["step-000001-canny.png", "step-000001-invert.png"]
    assert [(c["channels"], c["mode"]) for c in union.base.family.calls] == [(3, 0), (3, 1)]


def test_samples_of_another_size_are_drawn_at_the_conditions_size(tmp_path):
    """The grid's tiles are the condition's size: larger samples are scaled down to it (bicubic)."""
    from train.validation import run_validation

    run = run_for(tmp_path, [[(255, 255, 255)]], ("canny",), sample_size=16)
    (path,) = run_validation(run, torch.nn.Linear(1, 1), None, "000001")
    assert np.array_equal(np.asarray(Image.open(path)), strip([(255, 255, 255)]))


def test_the_plain_style_writes_tiles_edge_to_edge_and_no_text(tmp_path):
    """The one grid writer without names or captions (validation grids): nothing but the tiles."""
    from train import grids

    tiles = [[np.full((8, 8, 3), (10 * s + 1, 40 * t + 1, 200), np.uint8) for t in range(3)] for s in range(2)]
    path = grids.contact_sheet(tiles, ["a caption"] * 2, ["c", "a", "b"], tmp_path / "g.png", columns=1,
                               min_tile=0, style=grids.PLAIN)
    sheet = np.asarray(Image.open(path))
    assert np.array_equal(sheet, np.concatenate([np.concatenate(row, axis=1) for row in tiles], axis=0))


def test_the_run_is_built_with_keywords():
    """``Run`` has 19 fields: built by position, a swapped pair would go unnoticed."""
    from train.loop import Run

    with pytest.raises(TypeError):
        Run(*range(len(dataclasses.fields(Run))))
