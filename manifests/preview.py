"""Contact sheet of a manifest: one row per sample, image | each condition map, caption below."""

from __future__ import annotations

import io
import textwrap

from PIL import Image, ImageDraw, ImageFont

from manifests.io import read
from manifests.schema import cond_columns

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
PAD = 6


def preview(path: str, out: str, rows: int = 8, tile: int = 256, status: str | None = "ok") -> str:
    """Write a PNG grid of the first ``rows`` rows (with ``status``) of the manifest to ``out``."""
    frame = read(path, status=status)
    if frame.empty:
        raise ValueError(f"{path} has no rows with status {status!r} to preview")
    frame = frame.head(rows)
    columns = ["image", *cond_columns(frame.columns)]
    font = ImageFont.load_default()
    line_h = 12
    caption_lines = 2
    cell_w = tile + PAD
    row_h = tile + PAD + caption_lines * line_h + PAD
    header_h = line_h + 2 * PAD
    sheet = Image.new("RGB", (PAD + cell_w * len(columns), header_h + row_h * len(frame)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((PAD + c * cell_w, PAD), name, fill=INK, font=font)
    for r, (_, row) in enumerate(frame.iterrows()):
        top = header_h + r * row_h
        for c, name in enumerate(columns):
            cell = row[name]
            if cell is None or not cell.get("bytes"):
                continue
            thumb = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
            thumb.thumbnail((tile, tile))
            sheet.paste(thumb, (PAD + c * cell_w, top))
        label = f"{row['source']}: {row['caption'] or '(no caption)'}"
        wrapped = textwrap.wrap(label, width=max(20, (cell_w * len(columns)) // 7))[:caption_lines]
        for k, line in enumerate(wrapped):
            draw.text((PAD, top + tile + PAD // 2 + k * line_h), line, fill=INK, font=font)
    sheet.save(out)
    return out
