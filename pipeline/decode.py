"""Raw file bytes -> the prepared RGB image every condition map is computed on.

Real collections hold rotated phone photos, CMYK scans, palette GIFs with transparency, 16-bit
PNGs, animations and decompression bombs; each is handled here or rejected with a reason.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings

import numpy as np
from PIL import Image, ImageOps

# Pixel counts are checked against the job's own cap from the header; Pillow's global bomb
# guard would otherwise raise or warn with its own limit first.
Image.MAX_IMAGE_PIXELS = None

_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


class DecodeError(Exception):
    """The file is not an image this job can use; the message says why."""


class Filtered(Exception):
    """The image is readable but unfit for the job; the row is ``filtered`` with ``code: message``."""

    code = "filtered"


class TooSmall(Filtered):
    """The image is smaller than the job's ``min_side``."""

    code = "min_side"


class TooElongated(Filtered):
    """One side is more than ``max_aspect`` times the other: prepared at the resolution it would be
    unusably long (past JPEG's 65,500 px limit for a banner) and no square crop could use it."""

    code = "max_aspect"


class TooNarrow(Filtered):
    """Upright width divided by height is below ``min_aspect`` (e.g. portraits in a landscape-only set)."""

    code = "min_aspect"


@dataclasses.dataclass
class PrepareSettings:
    """How a raw image becomes the prepared image (``AnnotateConfig`` extends these settings)."""

    resolution: int = 512
    """Shortest side of the prepared image, in pixels; a multiple of 8."""
    center_crop: bool = False
    """Crop the prepared image to a ``resolution`` x ``resolution`` square."""
    min_side: int = 0
    """Images whose shortest side is below this become ``filtered`` rows (0: keep all, upscale)."""
    max_pixels: int = 100_000_000
    """Images with more pixels (read from the header, before decoding) become ``error`` rows."""
    max_aspect: float = 4.0
    """Images whose long side exceeds this many times the short side (read from the header) become
    ``filtered`` rows: a banner would otherwise be prepared far past what JPEG can encode."""
    min_aspect: float | None = None
    """Images whose upright width / height is below this (read from the header) become ``filtered``
    rows, e.g. 1.0 keeps landscape and square images only (None: only ``max_aspect`` applies)."""

    def prepare_settings(self) -> "PrepareSettings":
        """Just these settings (what a worker needs to prepare images)."""
        return PrepareSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PrepareSettings)})


@dataclasses.dataclass
class Prepared:
    """A prepared image and the upright size of the raw file it came from."""

    image: np.ndarray
    orig_width: int
    orig_height: int


def prepare(data: bytes, settings: PrepareSettings) -> Prepared:
    """Decode ``data`` and resize/crop it to the job's resolution (sides multiples of 8)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises several types for unreadable headers
        raise DecodeError(f"not a readable image ({exc})") from exc
    width, height = im.size
    if width * height > settings.max_pixels:
        raise DecodeError(f"{width}x{height} pixels exceeds --max-pixels {settings.max_pixels}")
    orientation = im.getexif().get(0x0112, 1)
    upright = (height, width) if orientation in _ROTATING_ORIENTATIONS else (width, height)
    if min(upright) < settings.min_side:
        raise TooSmall(f"{upright[0]}x{upright[1]} is below --min-side {settings.min_side}")
    if max(width, height) > settings.max_aspect * min(width, height):
        raise TooElongated(f"{upright[0]}x{upright[1]} is longer than --max-aspect {settings.max_aspect:g} to 1")
    if settings.min_aspect is not None and upright[0] < settings.min_aspect * upright[1]:
        raise TooNarrow(f"{upright[0]}x{upright[1]} is narrower than --min-aspect {settings.min_aspect:g} "
                        "(width / height)")
    # JPEG can decode at 1/2, 1/4, 1/8 scale for nearly free; ask for no less than we keep.
    scale = settings.resolution / min(width, height)
    im.draft(None, (math.ceil(width * scale), math.ceil(height * scale)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency"
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            rgb = np.asarray(to_rgb(im))
    except Exception as exc:
        raise DecodeError(str(exc) or type(exc).__name__) from exc
    return Prepared(resize_crop(rgb, settings), upright[0], upright[1])


def to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image: alpha composited on white, 16-bit and float scaled, CMYK converted."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """Scale 16-bit, 32-bit integer or float pixels to 0..255."""
    values = array.astype(np.float64)
    if mode == "F":
        lo, hi = float(values.min()), float(values.max())
        values = (values - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(values)
    elif mode.startswith("I;16") or values.max() > 255:
        values = values / 257.0  # 65535 -> 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def target_size(width: int, height: int, settings: PrepareSettings) -> tuple[int, int]:
    """Output size: shortest side to ``resolution``; the other rounded down to a multiple of 8."""
    if settings.center_crop:
        return settings.resolution, settings.resolution
    scale = settings.resolution / min(width, height)
    return (
        max(8, int(round(width * scale)) // 8 * 8),
        max(8, int(round(height * scale)) // 8 * 8),
    )


def resize_crop(rgb: np.ndarray, settings: PrepareSettings) -> np.ndarray:
    """Center-crop the source to the output's aspect ratio, then resize it to the output size.

    Area averaging when shrinking (no aliasing, and several times faster than Pillow's Lanczos),
    bicubic when enlarging.
    """
    import cv2

    height, width = rgb.shape[:2]
    out_w, out_h = target_size(width, height, settings)
    scale = settings.resolution / min(width, height)
    box_w = min(width, max(1, round(out_w / scale)))
    box_h = min(height, max(1, round(out_h / scale)))
    left, top = (width - box_w) // 2, (height - box_h) // 2
    crop = rgb[top:top + box_h, left:left + box_w]
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(crop, (out_w, out_h), interpolation=interpolation))
