"""Contact sheet of a manifest: one row per sample, image | each condition map, caption below.

By default it shows what training reads (ok rows, near duplicates left out). ``status=None`` (``--status
all``) adds the rows that failed, each drawn as a tile holding its status and reason, and
``duplicates="keep"`` the near duplicates, labelled with the row they copy: the edge cases a collection
holds stay visible.
"""

from __future__ import annotations

import dataclasses
import io
import textwrap

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from manifests import duplicates as dup
from manifests.readers import duplicates_option, read
from manifests.schema import STATUS_OK, cond_columns

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
#: Background of the tile that stands for a row's missing image, by status.
REASON_FILL = {"error": (250, 214, 214), "filtered": (250, 238, 200)}
PAD = 6
LINE_H = 12
#: Most label lines under a row: source, what it copies, the caption (cut to fit).
LABEL_LINES = 4
MIN_TILE = 64


@dataclasses.dataclass
class Tile:
    """One cell drawn on the sheet."""

    column: str
    kind: str
    """``image`` (a thumbnail), ``reason`` (a row without an image: its status and error, as text) or
    ``empty`` (a missing map)."""
    box: tuple[int, int, int, int]
    """(left, top, right, bottom) on the sheet."""
    text: str = ""


@dataclasses.dataclass
class SheetRow:
    """One manifest row as drawn: its tiles and the label under them."""

    id: str
    source: str
    status: str
    label: str
    tiles: list[Tile]


@dataclasses.dataclass
class Sheet:
    """What ``preview`` wrote, and where on it each row's tiles are."""

    path: str
    columns: list[str]
    rows: list[SheetRow]


def preview(path: str, out: str, rows: int = 8, tile: int = 256, status: str | None = "ok",
            duplicates: str | bool = "skip") -> Sheet:
    """Write a PNG grid of the first ``rows`` rows of the manifest to ``out``: rows with ``status``
    (None: every row, failures drawn as their reason), duplicates left out unless ``duplicates="keep"``."""
    if rows < 1 or tile < MIN_TILE:
        raise ValueError(f"--rows must be at least 1 and --tile at least {MIN_TILE} (got {rows} and {tile})")
    frame = read(path, status=status, duplicates=duplicates)
    if frame.empty:
        raise ValueError(f"{path} has no rows with status {status!r} to preview")
    copies = _copies_of(path, frame) if not duplicates_option(duplicates) else {}
    frame = frame.head(rows)
    columns = ["image", *cond_columns(frame.columns)]
    font = ImageFont.load_default()
    cell_w = tile + PAD
    width = PAD + cell_w * len(columns)
    header_h = LINE_H + 2 * PAD
    chars = _chars_in(font, width - 2 * PAD)
    planned = []  # (row, thumbnails, label lines, height): rows are as tall as their images
    for _, row in frame.iterrows():
        thumbs = [_thumbnail(row[name], tile) for name in columns]
        if row["status"] != STATUS_OK:
            thumbs[0] = None  # the reason stands in for the image
        wrapped = _label_lines(row, copies.get(row["id"]), chars)
        heights = [t.height for t in thumbs if t is not None]
        if row["status"] != STATUS_OK:
            heights.append(tile // 2)
        planned.append((row, thumbs, wrapped, max(heights, default=tile)))
    total_h = header_h + sum(h + PAD + len(lines) * LINE_H + PAD for _, _, lines, h in planned)
    sheet = Image.new("RGB", (width, total_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        draw.text((PAD + c * cell_w, PAD), name, fill=INK, font=font)
    drawn: list[SheetRow] = []
    top = header_h
    for row, thumbs, wrapped, image_h in planned:
        tiles = []
        for c, (name, thumb) in enumerate(zip(columns, thumbs)):
            left = PAD + c * cell_w
            if c == 0 and row["status"] != STATUS_OK:
                tiles.append(_draw_reason(draw, font, row, (left, top, left + tile, top + tile // 2)))
            elif thumb is not None:
                sheet.paste(thumb, (left, top))
                tiles.append(Tile(name, "image", (left, top, left + thumb.width, top + thumb.height)))
            else:
                tiles.append(Tile(name, "empty", (left, top, left, top)))
        for k, line in enumerate(wrapped):
            draw.text((PAD, top + image_h + PAD // 2 + k * LINE_H), line, fill=INK, font=font)
        drawn.append(SheetRow(row["id"], row["source"], row["status"], "\n".join(wrapped), tiles))
        top += image_h + PAD + len(wrapped) * LINE_H + PAD
    sheet.save(out)
    return Sheet(out, columns, drawn)


def _copies_of(path: str, frame: pd.DataFrame) -> dict[str, str]:
    """Duplicate id -> what it copies (``near duplicate of <source>``), from the side table."""
    table = dup.read_table(path)
    if table is None:
        return {}
    sources = dict(zip(frame["id"], frame["source"]))
    return {r["id"]: f"{'exact copy' if r['exact'] else 'near duplicate'} of {sources.get(r['duplicate_of'], r['duplicate_of'])}"
            for r in table.to_pylist()}


def _chars_in(font: ImageFont.ImageFont, pixels: int) -> int:
    """About how many characters of ``font`` fit in ``pixels``."""
    return max(8, int(pixels // max(1.0, font.getlength("x"))))


def _label_lines(row: pd.Series, copy_of: str | None, chars: int) -> list[str]:
    """The lines under a row: its source (and status when not ok), what it copies, then its caption, cut to
    ``LABEL_LINES``; a failed row's reason is on its tile."""
    head = row["source"] if row["status"] == STATUS_OK else f"{row['source']} [{row['status']}]"
    lines = textwrap.wrap(head, chars) + (textwrap.wrap(f"[{copy_of}]", chars) if copy_of else [])
    if row["status"] == STATUS_OK:
        lines += textwrap.wrap(row["caption"] or "(no caption)", chars)
    return lines[:LABEL_LINES]


def _draw_reason(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, row: pd.Series,
                 box: tuple[int, int, int, int]) -> Tile:
    """A tile standing for a row without an image: its status and error, wrapped to the tile."""
    left, top, right, bottom = box
    draw.rectangle(box, fill=REASON_FILL.get(row["status"], (230, 230, 230)), outline=INK)
    reason = row["error"] if isinstance(row["error"], str) and row["error"] else "(no reason recorded)"
    lines = [row["status"].upper(), *textwrap.wrap(reason, width=_chars_in(font, right - left - 2 * PAD))]
    fit = max(1, (bottom - top - PAD) // LINE_H)
    for k, line in enumerate(lines[:fit]):
        draw.text((left + PAD, top + PAD // 2 + k * LINE_H), line, fill=INK, font=font)
    return Tile("image", "reason", box, "\n".join(lines[:fit]))


def _thumbnail(cell: dict | None, tile: int) -> Image.Image | None:
    """The cell's image scaled to fit a tile, or None for a missing map."""
    if not isinstance(cell, dict) or not cell.get("bytes"):
        return None
    thumb = Image.open(io.BytesIO(cell["bytes"])).convert("RGB")
    thumb.thumbnail((tile, tile))
    return thumb
