"""Validation samples: generate from held-out conditions with the modules already in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from train.controlnet_lora import trained_parameters


def validation_inputs(rows: Sequence[dict], conditions: Sequence[str], images: Sequence[str],
                      prompts: Sequence[str], resolution: int, stacked: bool = False) -> list[tuple[torch.Tensor, str]]:
    """(condition tensor 1xCxHxW in [0, 1], prompt) pairs: given files, else held-out rows (every condition,
    3 channels each, in order). ``stacked``: each given entry is a comma-separated file per condition, stacked
    as channels as in training (see ``config.validation_image_problem``)."""
    from train.config import validation_image_files
    from train.data import ManifestDataset

    if images:
        prompts = list(prompts) * len(images) if len(prompts) == 1 else list(prompts)
        out = []
        for entry, prompt in zip(images, prompts):
            files = validation_image_files(entry, stacked)
            maps = [np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution)), np.float32) / 255
                    for f in files]
            out.append((torch.from_numpy(np.concatenate(maps, axis=2)).permute(2, 0, 1)[None], prompt))
        return out
    dataset = ManifestDataset(list(rows), conditions, resolution, seed=0, center_crop=True, random_flip=False,
                              proportion_empty_prompts=0.0)
    return [(ex["conditioning_pixel_values"][None], ex["caption"]) for ex in (dataset[i] for i in range(len(dataset)))]


@torch.no_grad()
def generate(base: Any, controlnet: torch.nn.Module, inputs: list[tuple[torch.Tensor, str]], per_input: int,
             seed: int, steps: int = 20, mode: int | None = None) -> list[list[Image.Image]]:
    """Images for each input, from the family's pipeline assembled from the in-memory modules (no second
    copy of the base); ``mode``: the union slot/mode of the one condition the inputs give."""
    return sample_inputs(base, controlnet, inputs, per_input, seed, steps, mode)


@torch.no_grad()
def generate_in_place(base: Any, controlnet: torch.nn.Module, ema: Any, inputs: list[tuple[torch.Tensor, str]],
                      per_input: int, seed: int, steps: int = 20, mode: int | None = None) -> list[list[Image.Image]]:
    """Families with large ControlNets (SDXL, SD3, Flux): sample with the trained ControlNet itself, not a
    copy: the EMA weights are swapped in and back, and the family's ``sampling`` hooks cast its inputs and
    residuals between fp32 and the base's dtype."""
    params = trained_parameters(controlnet)  # what the EMA holds
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        with base.family.sampling(base, controlnet):
            return sample_inputs(base, controlnet, inputs, per_input, seed, steps, mode)
    finally:
        if ema is not None:
            ema.restore(params)


def sample_inputs(base: Any, controlnet: torch.nn.Module, inputs: list[tuple[torch.Tensor, str]], per_input: int,
                  seed: int, steps: int, mode: int | None) -> list[list[Image.Image]]:
    """Each input's images, from one pipeline assembled for the whole validation."""
    pipe = base.family.validation_pipeline(base, controlnet)
    device = base.denoiser.device
    results = []
    for cond, prompt in inputs:
        generator = torch.Generator(device=device).manual_seed(seed)  # each input from the same noise
        results.append(base.family.sample(pipe, base, cond.to(device), prompt, per_input, generator, steps, mode))
    return results


def grid(inputs: list[tuple[torch.Tensor, str]], samples: list[list[Image.Image]], path: Path) -> Path:
    """PNG grid: each row is its condition (every 3-channel map of a stacked input, in order) | generated
    images."""
    rows = []
    for (cond, _), images in zip(inputs, samples):
        c = (cond[0].permute(1, 2, 0).float().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
        maps = [Image.fromarray(np.ascontiguousarray(c[:, :, i:i + 3])) for i in range(0, c.shape[2] - 2, 3)]
        tiles = maps + [im.resize((c.shape[1], c.shape[0])) for im in images]
        row = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height))
        x = 0
        for t in tiles:
            row.paste(t, (x, 0))
            x += t.width
        rows.append(row)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
