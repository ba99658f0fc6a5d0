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


# --- truncated data: an error, whatever Pillow's global LOAD_TRUNCATED_IMAGES says -------------------

def header_claims(size: tuple[int, int]) -> bytes:
    """A complete 16x16 JPEG whose header claims ``size``: its data covers a sliver of the image."""
    data = bytearray(encode(Image.new("RGB", (16, 16), (10, 200, 30)), "JPEG"))
    frame = data.find(b"\xff\xc0")
    data[frame + 5:frame + 9] = size[1].to_bytes(2, "big") + size[0].to_bytes(2, "big")
    return bytes(data)


def photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((256, 256))


FORMATS = {  # name -> (Pillow format, save options)
    "jpeg": ("JPEG", {"quality": 90}),
    "progressive jpeg": ("JPEG", {"progressive": True}),
    "grayscale jpeg": ("JPEG", {}),
    "png": ("PNG", {}),
    "webp": ("WEBP", {}),
    "lossless webp": ("WEBP", {"lossless": True}),
    "gif": ("GIF", {}),
    "bmp": ("BMP", {}),
    "tiff": ("TIFF", {}),
}


def encode_format(name: str) -> bytes:
    fmt, options = FORMATS[name]
    im = photo()
    im = im.convert("L") if name.startswith("grayscale") else im.convert("P") if fmt == "GIF" else im
    return encode(im, fmt, **options)


@pytest.fixture(params=[False, True], ids=["pillow-strict", "LOAD_TRUNCATED_IMAGES"])
def truncated_global(request, monkeypatch):
    """Both settings of Pillow's global, which a dependency may set for the whole process."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", request.param)
    return request.param


@pytest.mark.parametrize("size", [(9000, 9000), (64, 64), (640, 16)])
def test_a_jpeg_whose_header_claims_more_than_its_data_is_truncated(size, truncated_global):
    # libjpeg decodes the missing blocks as flat grey and only warns; Pillow ignores the warning.
    with pytest.raises(DecodeError, match=r"^truncated JPEG: its \d+x\d+ header needs"):
        prepare(header_claims(size), SETTINGS)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("keep", [0.3, 0.8, 0.97])
def test_truncated_image_data_is_an_error_in_every_format(name, keep, truncated_global):
    data = encode_format(name)
    with pytest.raises(DecodeError, match="truncated|not a readable image"):
        prepare(data[:int(len(data) * keep)], SETTINGS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_complete_files_are_never_called_truncated(name, truncated_global):
    data = encode_format(name)
    out = prepare(data, SETTINGS)
    assert out.image.shape == (64, 64, 3) and out.image.std() > 20  # the photo, not a grey fill
    prepare(data + b"trailing bytes after the image", SETTINGS)  # data after the image is no truncation


def test_a_jpeg_cut_after_its_header_names_the_cause_with_the_global_set(truncated_global):
    data = encode_format("jpeg")
    with pytest.raises(DecodeError, match="^truncated JPEG"):
        prepare(data[:len(data) // 2], SETTINGS)


def jpeg_variants() -> dict[str, bytes]:
    """Valid JPEGs whose data sits close to the truncation check's lower bound: flat and smooth images
    (one short code per block), optimized Huffman tables, every chroma subsampling, progressive scans,
    restart markers inside the scan data (OpenCV/libjpeg), greyscale, CMYK."""
    import cv2

    ramp = np.linspace(0, 255, 136, dtype=np.uint8)
    pictures = {"flat": np.full((120, 136, 3), 128, np.uint8),
                "smooth": np.stack([np.tile(ramp, (120, 1))] * 3, axis=-1),
                "photo": np.asarray(photo().resize((136, 120)))}
    found = {}
    for label, rgb in pictures.items():
        im = Image.fromarray(rgb)
        for quality in (1, 75):
            for subsampling in (0, 1, 2):
                for options in ({}, {"optimize": True}, {"progressive": True, "optimize": True}):
                    found[f"{label} q{quality} s{subsampling} {options}"] = encode(
                        im, "JPEG", quality=quality, subsampling=subsampling, **options)
            found[f"{label} q{quality} grey optimized"] = encode(im.convert("L"), "JPEG", quality=quality,
                                                                  optimize=True)
            found[f"{label} q{quality} cmyk"] = encode(im.convert("CMYK"), "JPEG", quality=quality)
            for flags in ([cv2.IMWRITE_JPEG_RST_INTERVAL, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 2, cv2.IMWRITE_JPEG_OPTIMIZE, 1],
                          [cv2.IMWRITE_JPEG_RST_INTERVAL, 1, cv2.IMWRITE_JPEG_PROGRESSIVE, 1],
                          [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411]):
                ok, data = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality, *flags])
                assert ok
                found[f"{label} q{quality} opencv {flags}"] = data.tobytes()
    return found


JPEG_VARIANTS = jpeg_variants()


@pytest.mark.parametrize("name", list(JPEG_VARIANTS))
def test_valid_jpegs_near_the_truncation_bound_are_never_called_truncated(name):
    """A good image turned into an error row is lost data: the worst mistake the check can make."""
    from pipeline.decode import jpeg_shortfall

    data = JPEG_VARIANTS[name]
    assert jpeg_shortfall(data) is None
    assert prepare(data, SETTINGS).image.shape == (64, 72, 3)
