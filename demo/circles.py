"""The fill task's raw images: one filled circle on a plain background, captioned with its colours.

ControlNet's fill50k, small. The colours and the caption format are the circle task's own
(``train/metrics.py``: ``CIRCLE_PALETTE``, ``circle_caption``), so what is drawn here is what the
circle metrics score. ``python -m demo.samples circles OUT --count N`` writes a collection.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from train.metrics import CIRCLE_PALETTE, circle_caption


def circle(seed: int, index: int, size: int = 64) -> tuple[Image.Image, str]:
    """One filled circle on a plain background, and its caption (fill50k's raw image, small).

    Drawn without anti-aliasing so every pixel is exactly one of two palette colours; the circle
    stays inside the image (a margin of one pixel) so its Canny outline is a closed curve. The
    draws depend on (seed, index) only: more images never change the earlier ones.
    """
    rng = np.random.default_rng([seed, index])
    names = list(CIRCLE_PALETTE)
    colour, background = (names[int(i)] for i in rng.choice(len(names), size=2, replace=False))
    radius = int(rng.integers(max(2, size // 10), max(3, size * 3 // 8) + 1))
    cx, cy = (int(rng.integers(radius + 1, size - radius - 1)) for _ in range(2))
    im = Image.new("RGB", (size, size), CIRCLE_PALETTE[background])
    ImageDraw.Draw(im).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=CIRCLE_PALETTE[colour])
    return im, circle_caption(colour, background)


def write_circles(folder: Path, count: int, size: int = 64, seed: int = 0, prefix: str = "circle") -> list[Path]:
    """``count`` circle PNGs (``{prefix}_00000.png`` ...) with ``.txt`` caption sidecars.

    A manifest's ids come from the file names, so a held-out set drawn with another seed needs another
    ``prefix`` too: with the same names its rows would share ids with the training rows.
    """
    if count < 1 or size < 16:
        raise ValueError(f"circles need count >= 1 and size >= 16, got count={count} size={size}")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        im, caption = circle(seed, i, size)
        path = folder / f"{prefix}_{i:05d}.png"
        im.save(path)
        path.with_suffix(".txt").write_text(caption + "\n")
        paths.append(path)
    return paths

