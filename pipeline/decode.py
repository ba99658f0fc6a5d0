"""Raw file bytes -> the prepared RGB image every condition map is computed on.

Real collections hold rotated phone photos, CMYK scans, palette GIFs with transparency, 16-bit
PNGs, animations and decompression bombs; each is handled here or rejected with a reason.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
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
    """Decode ``data`` and resize/crop it to the job's resolution (sides multiples of 8).

    Truncated data is a ``DecodeError`` (``truncated JPEG: ...``), whatever Pillow's global
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` says: with it set (by us or any dependency), Pillow would
    fill the missing part with grey or black and report nothing.
    """
    source = _Source(data)
    try:
        im = Image.open(source)
    except Exception as exc:  # Pillow raises several types for unreadable headers
        raise DecodeError(f"not a readable image ({exc})") from exc
    source.ran_out = False  # from here on, a read past the end means the image data is cut short
    width, height = im.size
    if width * height > settings.max_pixels:
        raise DecodeError(f"{width}x{height} pixels exceeds --max-pixels {settings.max_pixels}")
    if im.format == "JPEG":
        short = jpeg_shortfall(data)
        if short:
            raise DecodeError(f"truncated JPEG: {short}")
    try:
        orientation = im.getexif().get(0x0112, 1)  # a PNG loads its pixels here (EXIF may follow them)
    except Exception as exc:
        raise _decode_error(im, source, exc) from exc
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
        raise _decode_error(im, source, exc) from exc
    if source.ran_out:
        raise _decode_error(im, source, None)
    return Prepared(resize_crop(rgb, settings), upright[0], upright[1])


class _Source(io.BytesIO):
    """A file's bytes that note whether a decoder asked for more than there is.

    A decoder reads past the end only when the data stops before the image does; this holds for
    every format Pillow decodes through its own loop, and does not depend on
    ``LOAD_TRUNCATED_IMAGES`` (which only decides what Pillow does next: raise, or fill and go on).
    """

    ran_out = False

    def read(self, size: int | None = -1) -> bytes:
        chunk = super().read(size)
        if not chunk and size != 0:
            self.ran_out = True
        return chunk


def _decode_error(im: Image.Image, source: _Source, exc: BaseException | None) -> DecodeError:
    """The row's reason: ``truncated FORMAT: ...`` when the data ran out, else Pillow's message."""
    if source.ran_out:
        return DecodeError(f"truncated {im.format or 'image'}: the file ends before its image data does")
    return DecodeError(str(exc) or type(exc).__name__)


# --- JPEG: image data that ends early -----------------------------------------------------------------

#: A marker inside entropy-coded data: 0xFF followed by anything but stuffing (00), a restart (D0-D7)
#: or another fill byte (FF).
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Huffman-coded DCT frames (baseline, extended, progressive): the ones a lower bound is known for.
_SEQUENTIAL, _PROGRESSIVE = (0xC0, 0xC1), 0xC2
#: Every other start-of-frame (lossless, hierarchical, arithmetic-coded): no bound is checked.
_OTHER_FRAMES = frozenset({0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def jpeg_shortfall(data: bytes) -> str | None:
    """Why a JPEG's image data cannot hold the image its header declares, or None.

    libjpeg (and so Pillow) decodes a scan that ends early, or a header that claims more pixels
    than the data holds, as flat grey and only warns, which Pillow ignores. So each scan's
    entropy-coded bytes are checked against the least its Huffman tables can spend on the blocks
    it covers (a code is at least 1 bit; a sequential block needs a DC and an AC code, a
    progressive DC scan one DC code or refinement bit), and the data must reach an end-of-image
    marker. A lower bound: it never rejects a whole file. Malformed structure returns None (the
    decoder judges it); arithmetic-coded, lossless and hierarchical files are not checked.
    """
    frame: tuple[int, int, int, list[tuple[int, int, int]]] | None = None
    shortest: dict[tuple[int, int], int] = {}  # (class 0 DC / 1 AC, table id) -> shortest code in bits
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if pos + 4 > len(data):
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segment = data[pos + 4:pos + 2 + length]
        if marker in _OTHER_FRAMES:
            return None
        if marker in (*_SEQUENTIAL, _PROGRESSIVE):
            frame = _jpeg_frame(marker, segment)
            if frame is None:
                return None
        elif marker == 0xC4:
            if not _jpeg_tables(segment, shortest):
                return None
        elif marker == 0xDA:
            start = pos + 2 + length
            found = _ENTROPY_END.search(data, start)
            if found is None:
                return "the file ends inside its image data (no end-of-image marker)"
            need = _jpeg_scan_bits(frame, segment, shortest)
            if need is None:
                return None
            have = found.start() - start
            if need > 8 * have:
                width, height = frame[1], frame[2]
                return (f"its {width}x{height} header needs at least {math.ceil(need / 8)} bytes of image data, "
                        f"a scan holds {have}")
            pos = found.start()
            continue
        pos += 2 + length
    return "the file ends before its image data does"


def _jpeg_frame(marker: int, segment: bytes) -> tuple[int, int, int, list[tuple[int, int, int]]] | None:
    """(marker, width, height, [(component id, h, v)]) of a start-of-frame segment; None if malformed."""
    if len(segment) < 6:
        return None
    height, width, count = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big"), segment[5]
    if height == 0 or len(segment) < 6 + 3 * count:  # height 0: given later (DNL), no bound
        return None
    components = [(segment[6 + 3 * i], segment[7 + 3 * i] >> 4, segment[7 + 3 * i] & 15) for i in range(count)]
    if any(h == 0 or v == 0 for _, h, v in components):
        return None
    return marker, width, height, components


def _jpeg_tables(segment: bytes, shortest: dict[tuple[int, int], int]) -> bool:
    """Record the shortest code of each Huffman table in a DHT segment; False if malformed."""
    at = 0
    while at + 17 <= len(segment):
        kind, table = segment[at] >> 4, segment[at] & 15
        counts = segment[at + 1:at + 17]
        lengths = [i + 1 for i, n in enumerate(counts) if n]
        if not lengths:
            return False
        shortest[(kind, table)] = lengths[0]
        at += 17 + sum(counts)
    return at == len(segment)


def _jpeg_scan_bits(frame: tuple | None, segment: bytes, shortest: dict[tuple[int, int], int]) -> int | None:
    """The fewest bits a scan's entropy-coded data can have; None when unknown."""
    if frame is None or not segment:
        return None
    marker, width, height, components = frame
    count = segment[0]
    if len(segment) < 1 + 2 * count + 3:
        return None
    ss, ah = segment[1 + 2 * count], segment[3 + 2 * count] >> 4
    h_max, v_max = max(h for _, h, _ in components), max(v for _, _, v in components)
    sampling = {cid: (h, v) for cid, h, v in components}
    bits = 0
    for i in range(count):
        cid, tables = segment[1 + 2 * i], segment[2 + 2 * i]
        if cid not in sampling:
            return None
        h, v = sampling[cid]
        # Blocks of the component alone: interleaved scans pad to whole MCUs, so this is a lower bound.
        blocks = math.ceil(math.ceil(width * h / h_max) / 8) * math.ceil(math.ceil(height * v / v_max) / 8)
        if marker == _PROGRESSIVE:
            if ss != 0:  # AC scans can skip many blocks with one end-of-band run
                continue
            per_block = 1 if ah else shortest.get((0, tables >> 4))
        else:
            dc, ac = shortest.get((0, tables >> 4)), shortest.get((1, tables & 15))
            per_block = None if dc is None or ac is None else dc + ac
        if per_block is None:
            return None
        bits += blocks * per_block
    return bits


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
