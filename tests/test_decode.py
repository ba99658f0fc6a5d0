"""Decoding survives real collections: orientation, colour modes, animation, bombs, bad bytes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.decode import DecodeError, PrepareSettings, TooSmall, prepare

SETTINGS = PrepareSettings(resolution=64)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored landscape; orientation 6 means "rotate 90 CW to view".
    arr = np.zeros((80, 160, 3), np.uint8)
    arr[:, :80] = (255, 0, 0)
    arr[:, 80:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = prepare(encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95), SETTINGS)
    assert (out.orig_width, out.orig_height) == (80, 160)
    assert out.image.shape[:2] == (128, 64)  # upright portrait, short side 64
    top, bottom = out.image[5, 32], out.image[-5, 32]
    assert top[0] > 200 and top[2] < 60  # red ends up on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60


def test_cmyk_jpeg_becomes_correct_rgb():
    im = Image.new("RGB", (64, 64), (200, 30, 30)).convert("CMYK")
    out = prepare(encode(im, "JPEG", quality=95), SETTINGS)
    assert out.image.dtype == np.uint8 and out.image.shape == (64, 64, 3)
    assert np.allclose(out.image.reshape(-1, 3).mean(0), (200, 30, 30), atol=12)


def test_palette_with_transparency_is_composited_on_white():
    im = Image.new("P", (64, 64), 0)
    im.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    im.paste(1, (32, 0, 64, 64))  # right half: opaque red; left half: index 0, transparent
    out = prepare(encode(im, "PNG", transparency=0), SETTINGS)
    assert tuple(out.image[32, 5]) == (255, 255, 255)
    assert tuple(out.image[32, 60]) == (255, 0, 0)


def test_alpha_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = prepare(encode(rgba, "PNG"), SETTINGS)
    assert (out.image == 255).all()


def test_16_bit_png_is_scaled_not_clipped():
    arr = np.full((64, 64), 32768, np.uint16)
    arr[:, 32:] = 65535
    out = prepare(encode(Image.fromarray(arr), "PNG"), SETTINGS)
    assert abs(int(out.image[10, 5, 0]) - 128) <= 1
    assert out.image[10, 60, 0] == 255


def test_animated_gif_takes_the_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = prepare(data, SETTINGS)
    assert out.image[32, 32, 0] > 200 and out.image[32, 32, 2] < 60


def test_pixel_cap_is_checked_from_the_header():
    data = encode(Image.new("L", (4000, 3000)), "PNG")  # 12 MP, a few kB on disk
    with pytest.raises(DecodeError, match="exceeds --max-pixels"):
        prepare(data, PrepareSettings(resolution=64, max_pixels=1_000_000))


@pytest.mark.parametrize("data", [b"", b"plain text, not an image", None])
def test_unreadable_bytes_raise_decode_error(data):
    if data is None:  # a truncated JPEG: the header reads, the body does not
        data = encode(Image.new("RGB", (256, 256), (10, 200, 30)), "JPEG")[:300]
    with pytest.raises(DecodeError):
        prepare(data, SETTINGS)


@pytest.mark.parametrize(
    ("size", "crop", "expected"),
    [
        ((1024, 768), False, (680, 512)),  # 682.7 rounded down to a multiple of 8
        ((768, 1024), False, (512, 680)),
        ((300, 200), False, (768, 512)),  # small images are enlarged
        ((1024, 768), True, (512, 512)),
        ((512, 512), False, (512, 512)),
    ],
)
def test_resize_policy(size, crop, expected):
    out = prepare(encode(Image.new("RGB", size, (9, 9, 9)), "PNG"), PrepareSettings(512, center_crop=crop))
    height, width = out.image.shape[:2]
    assert (width, height) == expected
    assert width % 8 == 0 and height % 8 == 0 and min(width, height) == 512 or crop


def test_min_side_filters_small_images():
    with pytest.raises(TooSmall, match="300x200"):
        prepare(encode(Image.new("RGB", (300, 200)), "PNG"), PrepareSettings(512, min_side=256))


def test_center_crop_keeps_the_middle():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, 100:200] = 255  # white middle third
    out = prepare(encode(Image.fromarray(arr), "PNG"), PrepareSettings(64, center_crop=True))
    assert out.image.shape == (64, 64, 3)
    assert out.image[32, 32].min() > 240
