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
    line_h, caption_lines = 12, 2
    cell_w = tile + PAD
    width = PAD + cell_w * len(columns)
    header_h = line_h + 2 * PAD
    rows_out = []  # (thumbnails, caption lines, row height): rows are as tall as their images
    for _, row in frame.iterrows():
        thumbs = [_thumbnail(row[name], tile) for name in columns]
        label = f"{row['source']}: {row['caption'] or '(no caption)'}"
        wrapped = textwrap.wrap(label, width=max(20, width // 7))[:caption_lines]
        image_h = max((t.height for t in thumbs if t is not None), default=tile)
        rows_out.append((thumbs, wrapped, image_h))
    total_h = header_h + sum(h + PAD + caption_lines * line_h + PAD for _, _, h in rows_out)
    sheet = Image.new("RGB", (width, total_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((PAD + c * cell_w, PAD), name, fill=INK, font=font)
    top = header_h
    for thumbs, wrapped, image_h in rows_out:
        for c, thumb in enumerate(thumbs):
            if thumb is not None:
                sheet.paste(thumb, (PAD + c * cell_w, top))
        for k, line in enumerate(wrapped):
            draw.text((PAD, top + image_h + PAD // 2 + k * line_h), line, fill=INK, font=font)
        top += image_h + PAD + caption_lines * line_h + PAD
    sheet.save(out)
    return out


def _thumbnail(cell: dict | None, tile: int) -> Image.Image | None:
    """The cell's image scaled to fit a tile, or None for a missing map."""
    if cell is None or not cell.get("bytes"):
        return None
    thumb = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    thumb.thumbnail((tile, tile))
    return thumb
