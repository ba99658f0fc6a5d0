"""The contact sheet of evaluations: samples in a few columns, each with its caption underneath."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train import grids


def strips(count: int, size: int = 32) -> list[list[np.ndarray]]:
    """``count`` samples of three flat tiles whose colours encode (sample, tile)."""
    return [[np.full((size, size, 3), (10 * s + 1, 40 * t + 1, 200), np.uint8) for t in range(3)]
            for s in range(count)]


def ink(region: np.ndarray) -> int:
    """Dark pixels: drawn text (the sheet is white elsewhere outside tiles)."""
    return int((region.min(axis=2) < 128).sum())


def test_samples_fill_rows_of_columns_and_each_tile_is_where_the_layout_says(tmp_path: Path):
    samples = strips(6)
    path = grids.contact_sheet(samples, ["a red circle"] * 6, ["condition", "with ControlNet", "base alone"],
                               tmp_path / "g.png", columns=4, min_tile=64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(6, 3, 64, columns=4)
    assert (where.columns, where.rows) == (4, 2)  # 6 samples: a row of 4, then 2 (not one 6-row strip)
    assert sheet.shape[:2] == (where.size[1], where.size[0])
    assert sheet.shape[1] > sheet.shape[0]  # wider than tall, unlike the strip it replaces
    for s, sample in enumerate(samples):
        for t, tile in enumerate(sample):
            x, y = where.origin(s, t)
            cell = sheet[y:y + 64, x:x + 64]
            assert (cell == tile[0, 0]).all(), (s, t)  # scaled up, nothing of a neighbour in it


def test_each_caption_is_written_under_its_own_sample_and_cut_to_fit(tmp_path: Path):
    captions = ["a blue circle on a light yellow background", "", "word " * 200]
    path = grids.contact_sheet(strips(3), captions, ["c", "a", "b"], tmp_path / "g.png", columns=2, min_tile=64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(3, 3, 64, columns=2)

    def band(sample: int) -> np.ndarray:
        x, y = where.origin(sample, 0)
        return sheet[y + 64:y + where.row_height - grids.GAP, x:x + where.sample_width]

    assert ink(band(0)) > 0 and ink(band(2)) > 0
    assert ink(band(1)) == 0  # no caption, no text
    assert ink(sheet[:grids.HEADER]) > 0  # the tile names
    # The long caption stays inside its own band: nothing drawn right of the last sample or below the sheet's rows.
    x, y = where.origin(2, 0)
    assert ink(sheet[y + 64:, x + where.sample_width:]) == 0


def test_tiles_of_other_shapes_are_fitted_into_square_cells(tmp_path: Path):
    wide = [[np.zeros((16, 48, 3), np.uint8), np.zeros((48, 16, 3), np.uint8)]]
    path = grids.contact_sheet(wide, ["x"], ["a", "b"], tmp_path / "g.png", min_tile=48)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(1, 2, 48, columns=4)
    (x0, y0), (x1, y1) = where.origin(0, 0), where.origin(0, 1)
    assert ink(sheet[y0:y0 + 48, x0:x0 + 48]) == 48 * 16  # letterboxed, not stretched
    assert ink(sheet[y1:y1 + 48, x1:x1 + 48]) == 16 * 48


@pytest.mark.parametrize("font", ["default", "bitmap"])
def test_any_caption_or_label_is_drawn_whatever_font_pillow_has(tmp_path: Path, monkeypatch, font):
    """Pillow without FreeType gives a bitmap default font that takes Latin-1 only: captions in other scripts,
    emoji or a lone surrogate must not stop the evaluation that draws them."""
    from PIL import ImageFont

    if font == "bitmap":
        monkeypatch.setattr(grids.ImageFont, "load_default", lambda *a, **k: ImageFont.load_default_imagefont())
    captions = ["猫がいる赤い円 " * 500, "emoji 🐱🚀 café", "a \ud800 lone surrogate", "\x00\t\n"]
    path = grids.contact_sheet(strips(4), captions, ["条件", "with ControlNet", "base"], tmp_path / "g.png",
                               columns=2, min_tile=64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(4, 3, 64, columns=2)
    assert sheet.shape[:2] == (where.size[1], where.size[0])
    x, y = where.origin(1, 0)
    assert ink(sheet[y + 64:y + where.row_height - grids.GAP, x:x + where.sample_width]) > 0  # "emoji ... café"


def test_a_long_caption_takes_at_most_its_lines_and_leaves_the_gap_between_rows_white(tmp_path: Path):
    path = grids.contact_sheet(strips(2), ["Wgjpqy| " * 300] * 2, ["c", "a", "b"], tmp_path / "g.png", columns=1,
                               min_tile=64)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    where = grids.layout(2, 3, 64, columns=1)
    x, y = where.origin(0, 0)
    band = sheet[y + 64:y + where.row_height, x:x + where.sample_width]
    lines = grids.CAPTION_LINES * grids.LINE
    assert ink(band[:lines]) > 0 and ink(band[lines + 1:]) == 0  # cut to its lines (ending in ...), then the gap
