"""Contact sheets a person reads at a glance: samples in a few columns, each sample a strip of tiles
(condition | with ControlNet | base ...) with its caption underneath and the tile names on top.

One long strip of 32 rows is hard to view and says nothing of what was asked for; a sheet of 4
samples per row with the prompt under each is what people compare by eye.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HEADER = 16  # one line of tile names above each column of samples
CAPTION_LINES = 2
LINE = 12  # Pillow's default bitmap font is 11 px high
GAP = 8  # white space between samples, so strips do not run into each other


@dataclass(frozen=True)
class SheetLayout:
    """Where each tile of a sheet lies: square cells of ``tile`` px, ``per_sample`` cells per sample,
    ``columns`` samples per row, a caption band under every row of samples."""

    tile: int
    per_sample: int
    columns: int
    rows: int

    @property
    def sample_width(self) -> int:
        return self.per_sample * self.tile

    @property
    def row_height(self) -> int:
        return self.tile + CAPTION_LINES * LINE + GAP

    def origin(self, sample: int, cell: int) -> tuple[int, int]:
        """(x, y) of cell ``cell`` of sample ``sample`` (samples fill rows left to right)."""
        row, column = divmod(sample, self.columns)
        return column * (self.sample_width + GAP) + cell * self.tile, HEADER + row * self.row_height

    @property
    def size(self) -> tuple[int, int]:
        return self.columns * (self.sample_width + GAP) - GAP, HEADER + self.rows * self.row_height


def layout(samples: int, per_sample: int, tile: int, columns: int) -> SheetLayout:
    """The layout of ``samples`` strips of ``per_sample`` tiles, at most ``columns`` per row."""
    columns = max(1, min(columns, samples))
    return SheetLayout(tile, per_sample, columns, -(-samples // columns))


def fit(array: np.ndarray, tile: int) -> Image.Image:
    """``array`` scaled (nearest, so pixels stay pixels) to fit a ``tile`` square, centred on white."""
    im = Image.fromarray(array).convert("RGB")
    scale = tile / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
    cell = Image.new("RGB", (tile, tile), "white")
    cell.paste(im, ((tile - im.width) // 2, (tile - im.height) // 2))
    return cell


def caption_lines(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """``text`` wrapped to ``width`` px in at most CAPTION_LINES lines, the last one ending in ... if cut."""
    chars = max(4, int(width // max(1.0, draw.textlength("n", font=font))))
    lines = textwrap.wrap(" ".join(text.split()), chars) or [""]
    if len(lines) > CAPTION_LINES:
        lines = lines[:CAPTION_LINES]
        lines[-1] = lines[-1][:max(0, chars - 3)] + "..."
    return lines


def drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` as ``font`` can take it: Pillow's bitmap default font (what ``load_default`` gives where Pillow
    has no FreeType) encodes text as Latin-1 and raises on anything else, so other characters become "?"."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text  # characters without a glyph are drawn as boxes, never an error
    return text.encode("latin-1", "replace").decode("latin-1")


def contact_sheet(samples: Sequence[Sequence[np.ndarray]], captions: Sequence[str], labels: Sequence[str],
                  path: Path, columns: int = 4, min_tile: int = 128) -> Path:
    """Write a PNG of ``samples`` (each a sequence of HxWx3 uint8 tiles named by ``labels``), ``columns``
    samples per row, each tile a square of at least ``min_tile`` px, the caption under each sample."""
    tile = max(min_tile, max(max(t.shape[:2]) for sample in samples for t in sample))
    sheet_layout = layout(len(samples), len(labels), tile, columns)
    sheet = Image.new("RGB", sheet_layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for column in range(sheet_layout.columns):
        for cell, label in enumerate(labels):
            x, _ = sheet_layout.origin(column, cell)
            draw.text((x + 4, 2), drawable(label, font), fill="black", font=font)
    for index, (sample, caption) in enumerate(zip(samples, captions)):
        for cell, array in enumerate(sample):
            sheet.paste(fit(array, tile), sheet_layout.origin(index, cell))
        x, y = sheet_layout.origin(index, 0)
        for line_no, line in enumerate(caption_lines(draw, drawable(caption, font), sheet_layout.sample_width, font)):
            draw.text((x + 2, y + tile + 1 + line_no * LINE), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
