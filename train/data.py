"""Manifest rows -> training batches: same crop and flip for image and condition, seeded.

Every random choice (row order, crop, flip, empty prompt) is a function of (seed, epoch, row), so a
resumed run sees exactly the batches an uninterrupted one would, and ranks split rows disjointly.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
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
    """The manifest columns training reads (``source`` only to name a row that does not decode)."""
    return ["id", "source", "caption", "image", "orig_width", "orig_height", *[cond_column(c) for c in conditions]]


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


# --- captions: cut before tokenizing ------------------------------------------------------------

CHARS_PER_TOKEN = 64
"""A generous bound on the characters one token of any family's tokenizer (CLIP BPE, T5 SentencePiece) spans:
a caption cut at (tokens the tokenizer keeps) x this still holds every character the tokenizer would use,
while a caption that is really a 50 MB log file is never tokenized whole (tokenizers truncate only after
tokenizing everything)."""
PROMPT_TOKENS = 512
"""The longest prompt any family reads (Flux's T5), and the token count assumed for a tokenizer that declares
no ``model_max_length`` (transformers then reports a huge placeholder)."""


def caption_char_limit(tokenizers: Sequence[Any], max_sequence_length: int | None = None) -> int:
    """Characters of a caption worth tokenizing for these tokenizers: the most tokens any of them keeps
    (or ``max_sequence_length``, T5's prompt length) times ``CHARS_PER_TOKEN``."""
    lengths = [t.model_max_length if 0 < getattr(t, "model_max_length", 0) <= 100_000 else PROMPT_TOKENS
               for t in tokenizers]
    return max([*lengths, max_sequence_length or 0] or [PROMPT_TOKENS]) * CHARS_PER_TOKEN


SEPARATORS = re.compile(r"[ \t\n\r]+")
"""Runs of spaces, tabs and newlines: every family's tokenizer (CLIP's, T5's) reads a run as one separator and
spends no token on it, so they do not count toward the limit, and a run is kept as one space."""
WORDS = re.compile(r"[^ \t\n\r]+")


def cap_caption(caption: str | None, limit: int) -> str:
    """The caption ("" for none) as it is when it has at most ``limit`` characters; else its first ``limit``
    characters that are not separators (``SEPARATORS``), each run of separators between them one space: a caption
    padded with whitespace keeps every word the tokenizer reads, and what is tokenized stays under 2 x ``limit``."""
    text = caption or ""
    if len(text) <= limit:
        return text
    words, left = [], limit
    for match in WORDS.finditer(text):
        start, end = match.span()
        words.append(text[start:min(end, start + left)])
        left -= end - start
        if left <= 0:
            break
    return " ".join(words)


# --- rows that do not decode ------------------------------------------------------------------

HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
"""Pillow modes of more than 8 bits a channel: converting them to RGB clips their values, so a map stored
that way (e.g. 16-bit depth) would train as a wrong picture."""
MAX_SUBSTITUTES = 16
"""Rows after an unreadable one tried in its place before its example is given up (and training stops)."""
LOGGED_SKIPS = 10
"""Unreadable rows logged one by one; the rest are counted (every one is in train_summary.json)."""


class UnreadableRow(ValueError):
    """A row whose image or a condition map cannot be used; ``record`` is {id, source, column, reason}."""

    def __init__(self, record: dict[str, str]):
        super().__init__(f"row {record['id']} ({record['source']}): {record['column']} {record['reason']}")
        self.record = record


class TooManyUnreadableRows(RuntimeError):
    """More rows failed to decode than ``--max_bad_rows_fraction`` allows (the message is one line)."""


def decode_rgb(cell: dict) -> Image.Image:
    """An image cell as RGB; ValueError for a mode of more than 8 bits (see ``HIGH_BIT_MODES``)."""
    im = Image.open(io.BytesIO(cell["bytes"]))
    if im.mode in HIGH_BIT_MODES:
        raise ValueError(f"is a {im.mode} image ({'float' if im.mode == 'F' else '16/32-bit'}); "
                         "training needs 8-bit maps and images")
    return im.convert("RGB")


def _reason(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"does not decode ({type(exc).__name__}: {first})" if first else f"does not decode ({type(exc).__name__})"


def _unreadable(row: dict, column: str, reason: str) -> UnreadableRow:
    return UnreadableRow({"id": str(row.get("id")), "source": str(row.get("source")), "column": column,
                          "reason": reason})


def _cell_bytes(row: dict, column: str) -> bytes:
    cell = row.get(column)
    if not cell or not cell.get("bytes"):
        raise _unreadable(row, column, "has no bytes")
    return cell["bytes"]


def decode_cell(row: dict, column: str, size: tuple[int, int] | None = None) -> Image.Image:
    """``row[column]`` decoded to RGB (``decode_rgb``), of ``size`` when given; UnreadableRow naming the row,
    the column and what is wrong otherwise (missing, truncated or garbage bytes, another size, a wrong mode)."""
    _cell_bytes(row, column)
    try:
        im = decode_rgb(row[column])
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError...
        high_bit = isinstance(exc, ValueError) and "training needs 8-bit" in str(exc)
        raise _unreadable(row, column, str(exc) if high_bit else _reason(exc)) from exc
    if size is not None and im.size != size:
        raise _unreadable(row, column, f"is {im.width}x{im.height} where the row's maps are {size[0]}x{size[1]} "
                                       "(every map must have its image's size)")
    return im


def header_size(row: dict, column: str) -> tuple[int, int]:
    """The size ``row[column]``'s header declares (no pixels decoded); UnreadableRow when it has none."""
    data = _cell_bytes(row, column)
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception as exc:
        raise _unreadable(row, column, _reason(exc)) from exc


def drop_unreadable(rows: Sequence[dict], conditions: Sequence[str]) -> tuple[list[dict], list[dict[str, str]]]:
    """(rows whose image and maps all decode, a record for each other one): for the few held-out rows, checked
    whole once so validation never meets a broken one."""
    good, bad = [], []
    for row in rows:
        try:
            size = header_size(row, "image")
            for column in ("image", *map(cond_column, conditions)):
                decode_cell(row, column, size)
        except UnreadableRow as exc:
            bad.append(exc.record)
            continue
        good.append(row)
    return good, bad


@dataclasses.dataclass
class SkippedRows:
    """The training process's tally of rows that did not decode (reported by dataset examples, from any
    DataLoader worker): each logged once, all recorded in train_summary.json; more than ``max_fraction`` of
    ``total`` rows, or an example no nearby row could stand in for, stops the run in one line."""

    manifest: str
    total: int
    max_fraction: float
    records: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)

    def add(self, records: Sequence[dict[str, str]], unusable: bool = False, held_out: bool = False) -> None:
        """Count ``records`` (training rows a nearby row stood in for, or ``held_out`` rows validation leaves out);
        TooManyUnreadableRows past the allowed share, or when an example is ``unusable``."""
        instead = "validation goes on without it" if held_out else "a nearby row is used in its place"
        for record in records:
            if record["id"] in self.records:
                continue
            self.records[record["id"]] = record
            if len(self.records) <= LOGGED_SKIPS:
                log.warning("skipping row %s (%s): %s %s; %s (python -m manifests validate %s lists every such "
                            "row)", record["id"], record["source"], record["column"], record["reason"], instead,
                            self.manifest)
        if unusable or len(self.records) > self.max_fraction * self.total:
            raise TooManyUnreadableRows(self.message(unusable))

    def message(self, unusable: bool) -> str:
        first = next(iter(self.records.values()))
        why = (f"{MAX_SUBSTITUTES + 1} rows in a row do not decode" if unusable else
               f"{len(self.records)} of {self.total} rows do not decode, more than --max_bad_rows_fraction "
               f"{self.max_fraction:g} allows")
        return (f"{why} (first: row {first['id']} ({first['source']}): {first['column']} {first['reason']}): run "
                f"`python -m manifests validate {self.manifest}` to list them, then re-annotate those files or fix "
                "the manifest, or raise --max_bad_rows_fraction to train without them")

    def summary(self) -> list[dict[str, str]]:
        return list(self.records.values())


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class ManifestDataset(torch.utils.data.Dataset):
    """Decoded, augmented training examples; call ``set_epoch`` before each epoch.

    A row whose image or a condition map does not decode is never a crash: the next rows (in id order) are
    tried in its place, and the example lists the skipped rows under ``skipped_rows`` so the training process
    counts them (``SkippedRows``), whichever DataLoader worker met them. An example no row near it could
    stand in for is marked ``unusable``."""

    def __init__(self, rows: list[dict], conditions: Sequence[str], resolution: int, seed: int,
                 center_crop: bool = False, random_flip: bool = False, proportion_empty_prompts: float = 0.5,
                 max_caption_chars: int = PROMPT_TOKENS * CHARS_PER_TOKEN):
        self.rows, self.conditions, self.resolution, self.seed = rows, list(conditions), resolution, seed
        self.center_crop, self.random_flip, self.p_empty = center_crop, random_flip, proportion_empty_prompts
        self.max_caption_chars = max_caption_chars
        """Captions are cut to this many characters (``caption_char_limit`` of the base's tokenizers)."""
        self.epoch = 0
        self.decode_images = True  # False when latents are cached: only conditions are decoded
        self.decode_conditions = True  # False when condition latents are cached too (SD3, Flux)
        self.known_bad: dict[int, dict[str, str]] = {}
        """Row positions found unreadable (by the ``--cache_latents`` pass before workers start, or earlier in
        this process): skipped without decoding them again."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> list[str]:
        """Every row's caption as examples give it (cut to ``max_caption_chars``), without reading image bytes."""
        return [cap_caption(c, self.max_caption_chars) for c in row_captions(self.rows)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped: list[dict[str, str]] = []
        for position in self._candidates(index):
            if position in self.known_bad:
                skipped.append(self.known_bad[position])
                continue
            try:
                example = self._example(position, index)
            except UnreadableRow as exc:
                self.known_bad[position] = exc.record
                skipped.append(exc.record)
                continue
            return {**example, "skipped_rows": skipped, "unusable": False}
        return self._placeholder(index, skipped)

    def _candidates(self, index: int) -> list[int]:
        """Row positions tried for example ``index``: its own row, then the next ones (wrapping)."""
        return [(index + k) % len(self.rows) for k in range(min(len(self.rows), MAX_SUBSTITUTES + 1))]

    def _example(self, position: int, index: int) -> dict[str, Any]:
        """Example ``index`` made from the row at ``position`` (its own, or one standing in), with the random
        choices of ``index``; UnreadableRow when that row's image or a map does not decode."""
        row = self.rows[position]
        rng = _rng(self.seed, self.epoch, index)
        # maps have the image's size, by the manifest contract; the image's header alone gives it
        size = header_size(row, "image")
        box = self._crop_box(size, rng)
        flip = self.random_flip and rng.random() < 0.5
        if self.decode_images:
            pixels = self._prepare(decode_cell(row, "image", size), box, flip) * 2.0 - 1.0  # [-1, 1] for the VAE
        else:
            pixels = torch.zeros(0)
        if self.decode_conditions:  # [0, 1], channels stacked
            cond = torch.cat([self._prepare(decode_cell(row, cond_column(c), size), box, flip) for c in self.conditions])
        else:
            cond = torch.zeros(0)
        caption = "" if rng.random() < self.p_empty else cap_caption(row["caption"], self.max_caption_chars)
        left, top, w, _ = box
        if flip:  # the crop's top-left as seen in the flipped image
            left = w - left - self.resolution
        width, height = size
        original = (row.get("orig_height") or height, row.get("orig_width") or width)  # the raw file's size
        return {"pixel_values": pixels, "conditioning_pixel_values": cond, "caption": caption, "index": index,
                "original_size": original, "crop_top_left": (top, left)}

    def _placeholder(self, index: int, skipped: list[dict[str, str]]) -> dict[str, Any]:
        """A blank example of the right shapes, marked unusable: the training process stops on it."""
        side = self.resolution
        pixels = torch.zeros(3, side, side) if self.decode_images else torch.zeros(0)
        cond = torch.zeros(3 * len(self.conditions), side, side) if self.decode_conditions else torch.zeros(0)
        return {"pixel_values": pixels, "conditioning_pixel_values": cond, "caption": "", "index": index,
                "original_size": (side, side), "crop_top_left": (0, 0), "skipped_rows": skipped, "unusable": True}

    def readable_position(self, index: int) -> int:
        """The position of the row example ``index`` is made from: its own, or the first readable one after
        it (every image and map decoded, for ``--cache_latents``, which caches it under ``index``);
        TooManyUnreadableRows when none near it is."""
        for position in self._candidates(index):
            if position in self.known_bad:
                continue
            row = self.rows[position]
            try:
                size = header_size(row, "image")
                for column in ("image", *map(cond_column, self.conditions)):
                    decode_cell(row, column, size)
            except UnreadableRow as exc:
                self.known_bad[position] = exc.record
                continue
            return position
        raise TooManyUnreadableRows(f"no readable row among the {MAX_SUBSTITUTES + 1} from row "
                                    f"{self.rows[index].get('id')}: run `python -m manifests validate` on the "
                                    "manifest and re-annotate")

    def image_tensor(self, index: int) -> torch.Tensor:
        """The target image of a row in [-1, 1] with the fixed crop (for ``--cache_latents``)."""
        image = decode_rgb(self.rows[self.readable_position(index)]["image"])
        return self._prepare(image, self._crop_box(image.size, _rng(self.seed, 0, index)), False) * 2.0 - 1.0

    def condition_tensor(self, index: int) -> torch.Tensor:
        """A row's conditions stacked in [0, 1] with the fixed crop (for ``--cache_latents`` of SD3/Flux)."""
        row = self.rows[self.readable_position(index)]
        conds = [decode_rgb(row[cond_column(c)]) for c in self.conditions]
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
        # rows that did not decode (and were stood in for), for the training process's count
        "skipped_rows": [r for e in examples for r in e.get("skipped_rows", ())],
        "unusable": any(e.get("unusable", False) for e in examples),
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
