"""Arrays -> the bytes stored in the manifest's image columns."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_image(array: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    """The prepared RGB image as JPEG (default) or PNG bytes."""
    buf = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(array).save(buf, "JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        Image.fromarray(array).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def encode_map(array: np.ndarray) -> bytes:
    """A condition map as lossless PNG (level 1: maps are mostly flat, so it compresses well fast)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", compress_level=1)
    return buf.getvalue()
