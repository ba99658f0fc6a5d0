"""The one grid writer: contact sheets a person reads at a glance, samples in a few columns, each sample a
strip of tiles (condition | with ControlNet | base ...) with its caption underneath and the tile names on
top (train/evaluate.py); and, in the ``PLAIN`` style, the trainer's validation grids (one strip per input,
tiles edge to edge, nothing written).

One long strip of 32 rows is hard to view and says nothing of what was asked for; a sheet of 4
samples per row with the prompt under each is what people compare by eye.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    import torch

HEADER = 16  # one line of tile names above each column of samples
CAPTION_LINES = 2
LINE = 12  # Pillow's default bitmap font is 11 px high
GAP = 8  # white space between samples, so strips do not run into each other


@dataclass(frozen=True)
class SheetStyle:
    """What a sheet draws around its tiles."""

    header: int = HEADER
    """Pixels above the samples for the tile names; 0: no names."""
    caption_lines: int = CAPTION_LINES
    """Caption lines under each row of samples; 0: no captions."""
    gap: int = GAP
    """White pixels between samples."""


CAPTIONED = SheetStyle()
"""Evaluation sheets: tile names on top, captions under, gaps between samples."""
PLAIN = SheetStyle(header=0, caption_lines=0, gap=0)
"""Validation grids: tiles edge to edge, nothing written."""


@dataclass(frozen=True)
class SheetLayout:
    """Where each tile of a sheet lies: square cells of ``tile`` px, ``per_sample`` cells per sample,
    ``columns`` samples per row, a caption band under every row of samples (as ``style`` says)."""

    tile: int
    per_sample: int
    columns: int
    rows: int
    style: SheetStyle = CAPTIONED

    @property
    def sample_width(self) -> int:
        return self.per_sample * self.tile

    @property
    def row_height(self) -> int:
        return self.tile + self.style.caption_lines * LINE + self.style.gap

    def origin(self, sample: int, cell: int) -> tuple[int, int]:
        """(x, y) of cell ``cell`` of sample ``sample`` (samples fill rows left to right)."""
        row, column = divmod(sample, self.columns)
        x = column * (self.sample_width + self.style.gap) + cell * self.tile
        return x, self.style.header + row * self.row_height

    @property
    def size(self) -> tuple[int, int]:
        gap = self.style.gap
        return self.columns * (self.sample_width + gap) - gap, self.style.header + self.rows * self.row_height


def layout(samples: int, per_sample: int, tile: int, columns: int, style: SheetStyle = CAPTIONED) -> SheetLayout:
    """The layout of ``samples`` strips of ``per_sample`` tiles, at most ``columns`` per row."""
    columns = max(1, min(columns, samples))
    return SheetLayout(tile, per_sample, columns, -(-samples // columns), style)


def fit(array: np.ndarray, tile: int) -> Image.Image:
    """``array`` scaled (nearest, so pixels stay pixels) to fit a ``tile`` square, centred on white."""
    im = Image.fromarray(array).convert("RGB")
    scale = tile / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
    cell = Image.new("RGB", (tile, tile), "white")
    cell.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return cell


def caption_lines(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont,
                  most: int = CAPTION_LINES) -> list[str]:
    """``text`` wrapped to ``width`` px in at most ``most`` lines, the last one ending in ... if cut."""
    if most <= 0:
        return []
    chars = max(4, int(width // max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(" ".join(text.split()), chars) or [""]
    if len(lines) > most:
        lines = lines[:most]
        lines[-1] = lines[-1][:max(0, chars - 3)] + "..."
    return lines


def drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` as ``font`` can take it: Pillow's bitmap default font (what ``load_default`` gives where Pillow
    has no FreeType) encodes text as Latin-1 and raises on anything else, so other characters become "?"."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text  # characters without a glyph are drawn as boxes, never an error
    return text.encode("latin-1", "replace").decode("latin-1")


def contact_sheet(samples: Sequence[Sequence[np.ndarray]], captions: Sequence[str], labels: Sequence[str],
                  path: Path, columns: int = 4, min_tile: int = 128, style: SheetStyle = CAPTIONED) -> Path:
    """Write a PNG of ``samples`` (each a sequence of HxWx3 uint8 tiles named by ``labels``), ``columns``
    samples per row, each tile a square of at least ``min_tile`` px, the caption under each sample."""
    tile = max(min_tile, max(max(t.shape[:2]) for sample in samples for t in sample))
    per_sample = max(len(labels), max(len(sample) for sample in samples))
    sheet_layout = layout(len(samples), per_sample, tile, columns, style)
    sheet = Image.new("RGB", sheet_layout.size, "white")
    for index, sample in enumerate(samples):
        for cell, array in enumerate(sample):
            sheet.paste(fit(array, tile), sheet_layout.origin(index, cell))
    if style.header or style.caption_lines:
        write_text(sheet, sheet_layout, labels, captions[:len(samples)])
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def write_text(sheet: Image.Image, sheet_layout: SheetLayout, labels: Sequence[str], captions: Sequence[str]) -> None:
    """The tile names above each column of samples and each caption under its sample (as the style has room)."""
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    style, tile = sheet_layout.style, sheet_layout.tile
    for column in range(sheet_layout.columns if style.header else 0):
        for cell, label in enumerate(labels):
            x, _ = sheet_layout.origin(column, cell)
            draw.text((x + 4, 2), drawable(label, font), fill="black", font=font)
    for index, caption in enumerate(captions):
        x, y = sheet_layout.origin(index, 0)
        lines = caption_lines(draw, drawable(caption, font), sheet_layout.sample_width, font, style.caption_lines)
        for line_no, line in enumerate(lines):
            draw.text((x + 2, y + tile + 1 + line_no * LINE), line, fill="black", font=font)


def validation_grid(inputs: Sequence[tuple[torch.Tensor, str]], samples: Sequence[Sequence[Image.Image]],
                    path: Path) -> Path:
    """The trainer's validation PNG: one strip per input, its condition (every 3-channel map of a stacked input,
    in order) then its generated images, each tile at the condition's size, nothing written."""
    strips = []
    for (cond, _), images in zip(inputs, samples):
        c = (cond[0].permute(1, 2, 0).float().cpu().numpy() * 255).clip(0, 255).astype(np.uint8)
        maps = [np.ascontiguousarray(c[:, :, i:i + 3]) for i in range(0, c.shape[2] - 2, 3)]
        strips.append(maps + [np.asarray(im.convert("RGB").resize((c.shape[1], c.shape[0]))) for im in images])
    return contact_sheet(strips, [], [], path, columns=1, min_tile=0, style=PLAIN)
