"""Manifest rows -> training batches: same crop and flip for image and condition, seeded.

Every random choice (row order, crop, flip, empty prompt) is a function of (seed, epoch, row), so a
resumed run sees exactly the batches an uninterrupted one would, and ranks split rows disjointly.
"""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

import manifests
from manifests.duplicates import DUPLICATES_FILE, duplicate_ids
from manifests.schema import cond_column
from train import row_cache

log = logging.getLogger("train")


def check_conditions(manifest: str, conditions: Sequence[str], cache_dir: str | None = None) -> dict[str, Any]:
    """The manifest's summary, after checking it has every requested condition column and that its
    shards are all there and readable (FileNotFoundError / ValueError naming the shard otherwise)."""
    summary = manifests.read_manifest_json(manifest)
    available = [c for c in summary.get("columns", []) if c.startswith("cond_")]
    missing = [c for c in conditions if cond_column(c) not in available]
    if missing:
        names = ", ".join(c.removeprefix("cond_") for c in available) or "none"
        raise ValueError(f"{manifest} has no condition {', '.join(missing)}; it has: {names} "
                         f"(annotate with --annotators {','.join(missing)} to add it)")
    if summary["counts"].get("ok", 0) < 2:
        raise ValueError(f"{manifest} has {summary['counts'].get('ok', 0)} ok rows; training needs at least 2")
    row_cache.check_shards(manifest, training_columns(conditions), cache_dir, summary)
    return summary


def training_columns(conditions: Sequence[str]) -> list[str]:
    """The manifest columns training reads."""
    return ["id", "caption", "image", "orig_width", "orig_height", *[cond_column(c) for c in conditions]]


def load_rows(manifest: str, conditions: Sequence[str], holdout: int,
              cache_dir: str | None = None, keep_duplicates: bool = False) -> tuple[Sequence[dict], Sequence[dict]]:
    """(train rows, held-out rows): ok rows with only the columns training needs, split by id.

    The rows are views on a memory-mapped cache of those columns (train/row_cache.py, built on first
    use under ``cache_dir``): only their order is held in memory; a row's bytes are read when it is used.
    Rows the manifest's ``_duplicates/duplicates.parquet`` lists (exact or near copies of an earlier row) are left
    out unless ``keep_duplicates``: a copy would weigh one picture twice, and one in the held-out rows
    and another in the training rows would leak validation into training.
    """
    skip = None if keep_duplicates else duplicate_ids(manifest)
    rows = row_cache.sorted_rows(manifest, training_columns(conditions), cache_dir, skip)
    if skip is not None and len(skip):
        log.info("left out %d duplicate rows listed in %s (--keep_duplicates keeps them)", len(skip), DUPLICATES_FILE)
    holdout = min(holdout, len(rows) - 1)
    return rows[holdout:], rows[:holdout]


def row_captions(rows: Sequence[dict]) -> list[str | None]:
    """Every row's caption, without reading image bytes where the rows allow it."""
    captions = getattr(rows, "captions", None)
    return captions() if captions is not None else [row["caption"] for row in rows]


def decode_rgb(cell: dict) -> Image.Image:
    return Image.open(io.BytesIO(cell["bytes"])).convert("RGB")


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class ManifestDataset(torch.utils.data.Dataset):
    """Decoded, augmented training examples; call ``set_epoch`` before each epoch."""

    def __init__(self, rows: list[dict], conditions: Sequence[str], resolution: int, seed: int,
                 center_crop: bool = False, random_flip: bool = False, proportion_empty_prompts: float = 0.5):
        self.rows, self.conditions, self.resolution, self.seed = rows, list(conditions), resolution, seed
        self.center_crop, self.random_flip, self.p_empty = center_crop, random_flip, proportion_empty_prompts
        self.epoch = 0
        self.decode_images = True  # False when latents are cached: only conditions are decoded
        self.decode_conditions = True  # False when condition latents are cached too (SD3, Flux)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        rng = _rng(self.seed, self.epoch, index)
        first = row[cond_column(self.conditions[0])]
        # maps have the image's size, by the manifest contract; the header alone gives it
        size = Image.open(io.BytesIO(first["bytes"])).size
        box = self._crop_box(size, rng)
        flip = self.random_flip and rng.random() < 0.5
        if self.decode_images:
            pixels = self._prepare(decode_rgb(row["image"]), box, flip) * 2.0 - 1.0  # [-1, 1] for the VAE
        else:
            pixels = torch.zeros(0)
        if self.decode_conditions:  # [0, 1], channels stacked
            cond = torch.cat([self._prepare(decode_rgb(row[cond_column(c)]), box, flip) for c in self.conditions])
        else:
            cond = torch.zeros(0)
        caption = "" if rng.random() < self.p_empty else (row["caption"] or "")
        left, top, w, _ = box
        if flip:  # the crop's top-left as seen in the flipped image
            left = w - left - self.resolution
        width, height = size
        original = (row.get("orig_height") or height, row.get("orig_width") or width)  # the raw file's size
        return {"pixel_values": pixels, "conditioning_pixel_values": cond, "caption": caption, "index": index,
                "original_size": original, "crop_top_left": (top, left)}

    def image_tensor(self, index: int) -> torch.Tensor:
        """The target image of a row in [-1, 1] with the fixed crop (for ``--cache_latents``)."""
        image = decode_rgb(self.rows[index]["image"])
        return self._prepare(image, self._crop_box(image.size, _rng(self.seed, 0, index)), False) * 2.0 - 1.0

    def condition_tensor(self, index: int) -> torch.Tensor:
        """A row's conditions stacked in [0, 1] with the fixed crop (for ``--cache_latents`` of SD3/Flux)."""
        conds = [decode_rgb(self.rows[index][cond_column(c)]) for c in self.conditions]
        box = self._crop_box(conds[0].size, _rng(self.seed, 0, index))
        return torch.cat([self._prepare(c, box, False) for c in conds])

    def _crop_box(self, size: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        """A square-side crop of the resolution after scaling the short side to it."""
        width, height = size
        scale = self.resolution / min(width, height)
        w, h = round(width * scale), round(height * scale)
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            left, top = int(rng.integers(0, w - self.resolution + 1)), int(rng.integers(0, h - self.resolution + 1))
        return left, top, w, h

    def _prepare(self, im: Image.Image, box: tuple[int, int, int, int], flip: bool) -> torch.Tensor:
        left, top, w, h = box
        im = im.resize((w, h), Image.Resampling.BICUBIC) if im.size != (w, h) else im
        im = im.crop((left, top, left + self.resolution, top + self.resolution))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "conditioning_pixel_values": torch.stack([e["conditioning_pixel_values"] for e in examples]),
        "captions": [e["caption"] for e in examples],
        "indices": [e["index"] for e in examples],
        # SDXL's size conditioning: (height, width) of each raw image, (top, left) of each crop
        "original_sizes": torch.tensor([e["original_size"] for e in examples]),
        "crop_top_lefts": torch.tensor([e["crop_top_left"] for e in examples]),
    }


class RankSampler(torch.utils.data.Sampler[int]):
    """This rank's share of a seeded per-epoch permutation; every rank gets the same count."""


    def __init__(self, size: int, rank: int, world: int, seed: int, batch_size: int, accumulation: int = 1):
        self.size, self.rank, self.world, self.seed, self.batch_size = size, rank, world, seed, batch_size
        self.accumulation = accumulation
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch's order; skip batches a resumed run has already trained on."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def batches_per_epoch(self) -> int:
        """Whole accumulation cycles only: a partial one would leak gradients into the next epoch."""
        batches = (self.size // self.world) // self.batch_size
        return batches // self.accumulation * self.accumulation

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        mine = order[self.rank::self.world][: self.batches_per_epoch() * self.batch_size]
        return iter(mine[self.skip_batches * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.skip_batches) * self.batch_size
