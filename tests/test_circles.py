"""The circle collection (fill50k, small): captions match pixels, Canny gives the outline."""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from demo import samples
from demo.circles import circle, write_circles
from tests.conftest import ROOT
from train import metrics
from train.metrics import CIRCLE_PALETTE


def read_back(folder, count):
    """(RGB array, caption) of each written file, decoded from disk."""
    out = []
    for i in range(count):
        rgb = np.asarray(Image.open(folder / f"circle_{i:05d}.png").convert("RGB"))
        out.append((rgb, (folder / f"circle_{i:05d}.txt").read_text().strip()))
    return out


def test_palette_colours_are_far_apart():
    for a, b in itertools.combinations(CIRCLE_PALETTE.values(), 2):
        d = np.abs(np.subtract(a, b))
        assert np.linalg.norm(d) >= 100 and d.max() >= 100, (a, b)


def test_cli_writes_captions_that_match_the_pixels(tmp_path):
    out = tmp_path / "circles"
    done = subprocess.run([sys.executable, "-m", "demo.samples", "circles", str(out), "--count", "40",
                           "--size", "48", "--seed", "3"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert len(list(out.glob("*.png"))) == len(list(out.glob("*.txt"))) == 40
    seen = set()
    for rgb, caption in read_back(out, 40):
        colour, background = metrics.caption_colours(caption)
        assert caption == f"a {colour} circle on a {background} background" and colour != background
        assert rgb.shape == (48, 48, 3)
        assert tuple(rgb[0, 0]) == tuple(rgb[-1, -1]) == CIRCLE_PALETTE[background]  # corners: background
        inside = np.any(rgb != CIRCLE_PALETTE[background], axis=2)
        assert (rgb[inside] == CIRCLE_PALETTE[colour]).all()  # exactly two colours, no anti-aliasing
        ys, xs = np.nonzero(inside)
        centre = rgb[round(ys.mean()), round(xs.mean())]
        assert tuple(centre) == CIRCLE_PALETTE[colour]
        assert not inside[0].any() and not inside[-1].any() and not inside[:, 0].any() and not inside[:, -1].any()
        seen.update((colour, background))
    assert seen == set(CIRCLE_PALETTE)  # 40 images use the whole palette


def test_circles_are_deterministic_by_seed(tmp_path):
    write_circles(tmp_path / "a", 5, seed=1)
    write_circles(tmp_path / "b", 8, seed=1)  # more images never change the earlier ones
    write_circles(tmp_path / "c", 5, seed=2)
    for i in range(5):
        name = f"circle_{i:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert any((tmp_path / "a" / f"circle_{i:05d}.png").read_bytes() != (tmp_path / "c" / f"circle_{i:05d}.png").read_bytes()
               for i in range(5))
    assert [circle(7, i)[1] for i in range(3)] == [circle(7, i)[1] for i in range(3)]


def test_canny_of_a_circle_is_its_outline():
    """The project's canny annotator, untouched, turns each image into the circle's outline, and
    the circle metrics score the raw image against it perfectly."""
    annotator = metrics.load_annotator("canny")
    for i in range(30):
        im, caption = circle(0, i, 64)
        rgb = np.asarray(im)
        edges = metrics.reannotate(annotator, [rgb])[0] > 0
        mask = metrics.segment_shape(rgb)
        # Every edge pixel lies on the circle's boundary (within one pixel of a colour change) ...
        boundary = _boundary(mask) > 0
        assert edges.any() and (edges & ~_near(boundary, 1)).sum() == 0
        # ... and the outline goes all the way round: its filling is the circle.
        assert metrics._iou(metrics.fill_outline(edges), mask) > 0.85
        assert metrics.circle_iou(rgb, edges.astype(np.uint8) * 255) == 1.0
        assert metrics.colour_match(rgb, caption) == 1.0


def _boundary(mask: np.ndarray) -> np.ndarray:
    """0/255 map of pixels with a 4-neighbour on the other side of the mask's edge."""
    m = mask.astype(np.int8)
    change = np.zeros(mask.shape, bool)
    change[:, 1:] |= m[:, 1:] != m[:, :-1]
    change[:, :-1] |= m[:, 1:] != m[:, :-1]
    change[1:] |= m[1:] != m[:-1]
    change[:-1] |= m[1:] != m[:-1]
    return change.astype(np.uint8) * 255


def _near(mask: np.ndarray, pixels: int) -> np.ndarray:
    import cv2

    return cv2.dilate(mask.astype(np.uint8), np.ones((2 * pixels + 1,) * 2, np.uint8)) > 0


def test_demo_collection_command_still_works(tmp_path, capsys):
    assert samples.main([str(tmp_path / "demo")]) == 0
    assert (tmp_path / "demo" / "photos" / "astronaut.jpg").is_file()
    assert (tmp_path / "demo" / "scenes" / "metadata.jsonl").is_file()


@pytest.mark.parametrize("args", [["--count", "0"], ["--count", "3", "--size", "8"], []])
def test_bad_circle_flags_exit_2(tmp_path, args):
    with pytest.raises(SystemExit) as exc:
        samples.main(["circles", str(tmp_path / "x"), *args])
    assert exc.value.code == 2
    assert not (tmp_path / "x").exists()


def test_a_prefixed_set_gets_manifest_ids_of_its_own(tmp_path):
    """A held-out set drawn with another seed but the default names would share the training set's manifest
    ids (ids come from the relative path), and evaluate would call every held-out row trained on."""
    from pipeline.reader import row_id

    train = write_circles(tmp_path / "train", 4, seed=0)
    held = write_circles(tmp_path / "held", 4, seed=9, prefix="heldout")
    assert [p.name for p in held] == [f"heldout_{i:05d}.png" for i in range(4)]
    assert all(p.with_suffix(".txt").read_text().strip() for p in held)
    assert not {row_id(p.name) for p in train} & {row_id(p.name) for p in held}
