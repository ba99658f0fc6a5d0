"""Controllability metrics on hand-made maps with known answers (train/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest

from demo.circles import circle
from train.metrics import CIRCLE_PALETTE
from train import metrics


def line_map(x: int, size: int = 32, rows: slice = slice(None)) -> np.ndarray:
    """A one-pixel vertical edge at column x (0/255, like Canny's maps)."""
    m = np.zeros((size, size), np.uint8)
    m[rows, x] = 255
    return m


def disc(size: int, centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2


def circle_image(size: int, centre: tuple[int, int], radius: int, colour: str, background: str) -> np.ndarray:
    im = np.empty((size, size, 3), np.uint8)
    im[:] = CIRCLE_PALETTE[background]
    im[disc(size, centre, radius)] = CIRCLE_PALETTE[colour]
    return im


def outline_of(mask: np.ndarray) -> np.ndarray:
    """The mask's one-pixel inner boundary as a 0/255 edge map."""
    import cv2

    inner = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
    return np.where(mask & ~inner, 255, 0).astype(np.uint8)


# ------------------------------------------------------------------------------------- edges

def test_edge_f1_known_cases():
    edge = line_map(10)
    assert metrics.edge_f1(edge, edge) == 1.0
    assert metrics.edge_f1(edge, line_map(12)) == 1.0  # within the 2 px tolerance
    assert metrics.edge_f1(edge, line_map(11), tolerance=0) == 0.0
    assert metrics.edge_f1(edge, line_map(20)) == 0.0  # shifted far: nothing matches
    assert metrics.edge_f1(np.zeros_like(edge), np.zeros_like(edge)) == 1.0
    assert metrics.edge_f1(edge, np.zeros_like(edge)) == 0.0
    assert metrics.edge_f1(np.zeros_like(edge), edge) == 0.0
    # Half the condition's edge drawn: precision 1, recall 1/2 -> F1 2/3.
    assert metrics.edge_f1(edge, line_map(10, rows=slice(0, 16)), tolerance=0) == pytest.approx(2 / 3)
    # The inverted map (edges everywhere but the line): recall 1, precision 4/31 (columns 8, 9, 11,
    # 12 are within 2 px of the line).
    precision = 4 / 31
    assert metrics.edge_f1(edge, 255 - edge) == pytest.approx(2 * precision / (1 + precision))


def test_edge_f1_reads_three_channel_maps():
    edge = line_map(10)
    assert metrics.edge_f1(np.repeat(edge[..., None], 3, axis=2), edge) == 1.0
    with pytest.raises(ValueError, match="differ in size"):
        metrics.edge_f1(edge, edge[:16])


# ---------------------------------------------------------------------------------- soft edges

def test_ssim_known_cases_and_matches_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = (rng.random((48, 40)) * 255).astype(np.uint8)
    a = np.clip(a.astype(int) // 2 + 64, 0, 255).astype(np.uint8)
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.ssim(a, 255 - a) < 0.0  # inverted structure: anti-correlated
    noisy = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    reference = structural_similarity(a, noisy, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255)
    assert metrics.ssim(a, noisy) == pytest.approx(reference, abs=1e-9)
    flat = np.full((32, 32), 7, np.uint8)
    assert metrics.ssim(flat, flat) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------- depth

def test_depth_rmse_known_cases():
    ramp = np.tile(np.linspace(0, 255, 64), (32, 1)).astype(np.uint8)
    assert metrics.depth_rmse(ramp, ramp) == pytest.approx(0.0, abs=1e-9)
    # Scale and shift are fitted away (up to uint8 rounding).
    assert metrics.depth_rmse(ramp, (ramp * 0.5 + 40).round().astype(np.uint8)) < 1.0
    # Inverted depth gets no negative scale: it scores as badly as a flat map.
    spread = float(ramp.astype(float).std())
    assert metrics.depth_rmse(ramp, 255 - ramp) == pytest.approx(spread)
    assert metrics.depth_rmse(ramp, np.zeros_like(ramp)) == pytest.approx(spread)


# ------------------------------------------------------------------------------ segmentation

def test_miou_known_cases():
    a = np.zeros((8, 8), np.int64)
    a[:, 4:] = 1  # two classes, half each
    assert metrics.miou(a, a) == 1.0
    assert metrics.miou(a, np.zeros_like(a)) == pytest.approx((0.5 + 0.0) / 2)
    assert metrics.miou(a, 1 - a) == 0.0  # classes swapped
    # Colour-coded maps: a colour is a class.
    palette = np.array([[120, 120, 120], [180, 120, 120]], np.uint8)
    assert metrics.miou(palette[a], palette[a]) == 1.0
    assert metrics.miou(palette[a], palette[np.zeros_like(a)]) == pytest.approx(0.25)
    # A hallucinated third class costs: IoU 0 for it.
    b = a.copy()
    b[:2, :4] = 2
    assert metrics.miou(a, b) == pytest.approx((12 / 16 + 1.0 + 0.0) / 3)


# -------------------------------------------------------------------------------------- pose

def skeleton(points: dict[int, tuple[float, float]], size: int = 128) -> np.ndarray:
    """A skeleton map drawn by controlnet-aux (as both pose annotators draw), points normalised."""
    from controlnet_aux.open_pose import BodyResult, PoseResult, draw_poses
    from controlnet_aux.open_pose.util import Keypoint

    keypoints = [Keypoint(*points[i]) if i in points else None for i in range(18)]
    body = BodyResult(keypoints=keypoints, total_score=1.0, total_parts=len(points))
    return draw_poses([PoseResult(body, None, None, None)], size, size, draw_body=True, draw_hand=False,
                      draw_face=False)


POSE = {0: (0.5, 0.15), 1: (0.5, 0.3), 2: (0.35, 0.3), 5: (0.65, 0.3), 3: (0.3, 0.5), 6: (0.7, 0.5),
        8: (0.4, 0.6), 11: (0.6, 0.6), 9: (0.4, 0.85), 12: (0.6, 0.85)}


def test_skeleton_keypoints_read_back_what_was_drawn():
    found = metrics.skeleton_keypoints(skeleton(POSE))
    for k in range(18):
        if k in POSE:
            assert len(found[k]) == 1
            x, y = found[k][0]
            assert abs(x - POSE[k][0] * 128) <= 1 and abs(y - POSE[k][1] * 128) <= 1
        else:
            assert found[k] == []


def test_pck_known_cases():
    cond = skeleton(POSE)
    assert metrics.pck(cond, cond) == 1.0
    shifted = skeleton({k: (x + 0.2, y) for k, (x, y) in POSE.items()})
    assert metrics.pck(cond, shifted) == 0.0
    assert metrics.pck(cond, shifted, alpha=0.25) == 1.0
    half = skeleton({k: v for k, v in POSE.items() if k in (0, 1, 2, 5, 3)})
    assert metrics.pck(cond, half) == pytest.approx(0.5)
    empty = np.zeros_like(cond)
    assert metrics.pck(cond, empty) == 0.0
    assert metrics.pck(empty, empty) == 1.0
    assert metrics.pck(empty, cond) == 0.0  # a person where none was asked for


def test_pck_through_the_mediapipe_pose_annotator(photos):
    """The real offline annotator's skeleton of a real photo: its keypoints read back, PCK 1 on
    itself, 0 for the same skeleton moved away."""
    annotator = metrics.load_annotator("mediapipe_pose")
    pose = metrics.reannotate(annotator, [photos["astronaut"]])[0]
    assert sum(len(k) for k in metrics.skeleton_keypoints(pose)) >= 8
    assert metrics.pck(pose, pose) == 1.0
    assert metrics.pck(pose, np.roll(pose, 40, axis=1)) == 0.0
    assert metrics.metrics_for("mediapipe_pose", [photos["astronaut"]], [pose], annotator=annotator) == {"pck": 1.0}


# --------------------------------------------------------------------------------- masks

def test_mask_iou_known_cases():
    a = np.zeros((10, 10), np.uint8)
    a[:, :5] = 255
    assert metrics.mask_iou(a, a) == 1.0
    assert metrics.mask_iou(a, 255 - a) == 0.0  # inverted
    b = np.zeros_like(a)
    b[:, :10] = 255
    assert metrics.mask_iou(a, b) == pytest.approx(0.5)
    assert metrics.mask_iou(np.zeros_like(a), np.zeros_like(a)) == 1.0
    assert metrics.mask_iou(a, np.zeros_like(a)) == 0.0


# ------------------------------------------------------------------------------ circle task

def test_fill_outline_fills_closed_and_broken_outlines():
    mask = disc(64, (30, 34), 15)
    outline = outline_of(mask)
    assert metrics._iou(metrics.fill_outline(outline), mask) == 1.0
    broken = outline.copy()
    broken[:, 28:33] = 0  # gaps top and bottom: nothing enclosed, the convex hull fills it
    assert metrics._iou(metrics.fill_outline(broken), mask) > 0.9
    assert not metrics.fill_outline(np.zeros((64, 64), np.uint8)).any()


def test_circle_iou_known_cases():
    image = circle_image(64, (30, 34), 15, "red", "light blue")
    outline = metrics.shape_outline(disc(64, (30, 34), 15))  # what the canny annotator draws
    assert metrics.circle_iou(image, outline) == 1.0
    assert metrics.circle_iou(image, outline_of(disc(64, (30, 34), 15))) > 0.9  # another outline convention
    far = metrics.shape_outline(disc(64, (50, 14), 10))  # a condition elsewhere: no overlap
    assert metrics.circle_iou(image, far) == 0.0
    plain = np.empty_like(image)
    plain[:] = CIRCLE_PALETTE["light blue"]
    assert metrics.circle_iou(plain, outline) == 0.0  # no circle drawn
    assert metrics.circle_iou(plain, np.zeros_like(outline)) == 1.0  # none asked for, none drawn
    half = image.copy()
    half[:, 31:] = CIRCLE_PALETTE["light blue"]
    assert metrics.circle_iou(half, outline) == pytest.approx(0.5, abs=0.05)


def test_segment_shape_survives_noise():
    rng = np.random.default_rng(1)
    image = circle_image(64, (30, 34), 15, "yellow", "blue").astype(float)
    noisy = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    assert metrics._iou(metrics.segment_shape(noisy), disc(64, (30, 34), 15)) > 0.95
    plain = np.clip(np.full((64, 64, 3), 128.0) + rng.normal(0, 8, (64, 64, 3)), 0, 255).astype(np.uint8)
    assert not metrics.segment_shape(plain).any()  # mild noise alone is no shape


def test_colours_from_captions_and_pixels():
    assert metrics.caption_colours("a light blue circle on a white background") == ("light blue", "white")
    assert metrics.caption_colours("A red circle on a black background.") == ("red", "black")
    assert metrics.caption_colours("a cat on a mat") is None
    image = circle_image(64, (30, 34), 15, "purple", "yellow")
    assert metrics.image_colours(image) == ("purple", "yellow")
    assert metrics.colour_match(image, "a purple circle on a yellow background") == 1.0
    assert metrics.colour_match(image, "a purple circle on a white background") == 0.0  # wrong background
    assert metrics.colour_match(image, "a yellow circle on a purple background") == 0.0  # swapped
    assert metrics.colour_match(image, "") == 0.0
    assert metrics.nearest_colour((150, 195, 240)) == "light blue"


# ------------------------------------------------------------------------------- dispatcher

def test_metric_names_cover_every_condition():
    assert metrics.metric_names("canny") == ["edge_f1"]
    assert metrics.metric_names("hed") == ["ssim"]
    assert metrics.metric_names("depth") == ["depth_rmse"]
    assert metrics.metric_names("segmentation") == ["miou"]
    assert metrics.metric_names("openpose") == metrics.metric_names("mediapipe_pose") == ["pck"]
    assert metrics.metric_names("person_mask") == ["mask_iou"]
    assert metrics.metric_names("circle") == ["circle_iou", "colour_accuracy"]
    assert metrics.metric_names("canny", task="circle") == ["edge_f1", "circle_iou", "colour_accuracy"]
    assert metrics.metric_names("mediapipe_face") == []
    with pytest.raises(ValueError, match="unknown task"):
        metrics.metric_names("canny", task="squares")


class Echo:
    """A stand-in annotator that returns fixed maps (and a skip), to test the plumbing alone."""

    def __init__(self, maps):
        self.maps, self.seen_ids = maps, None

    def annotate(self, images, ids):
        self.seen_ids = list(ids)
        return list(self.maps)


def test_metrics_for_reannotates_and_averages():
    from annotators.base import AnnotationSkipped

    a = np.zeros((8, 8), np.uint8)
    a[:, :4] = 255
    images = [np.zeros((8, 8, 3), np.uint8)] * 2
    echo = Echo([a, AnnotationSkipped("no person")])  # the skipped image scores as an empty mask
    assert metrics.metrics_for("person_mask", images, [a, a], annotator=echo, ids=["x", "y"]) == {"mask_iou": 0.5}
    assert echo.seen_ids == ["x", "y"]
    with pytest.raises(ValueError, match="condition maps"):
        metrics.metrics_for("person_mask", images, [a], annotator=echo)


def test_metrics_for_canny_and_circle_on_raw_circles():
    """Raw circle images are perfect samples: their own Canny maps as conditions score ~1."""
    annotator = metrics.load_annotator("canny")
    drawn = [circle(0, i, 64) for i in range(8)]
    images = [np.asarray(im) for im, _ in drawn]
    captions = [c for _, c in drawn]
    conditions = metrics.reannotate(annotator, images)
    scores = metrics.metrics_for("canny", images, conditions, captions, task="circle", annotator=annotator)
    assert scores["edge_f1"] == 1.0 and scores["colour_accuracy"] == 1.0
    assert scores["circle_iou"] == 1.0
    # Images paired with other images' conditions and captions score far lower.
    shuffled = metrics.metrics_for("canny", images[1:] + images[:1], conditions, captions, task="circle",
                                   annotator=annotator)
    assert shuffled["circle_iou"] < 0.5 and shuffled["edge_f1"] < 0.5 and shuffled["colour_accuracy"] < 0.5
    with pytest.raises(ValueError, match="caption"):
        metrics.metrics_for("circle", images, conditions)


def test_samples_made_smaller_than_their_condition_are_scored_at_its_resolution():
    """Training at 32 px on 64 px maps: a perfect sample at half size must still score ~1, where
    scoring against the shrunk map (its 1-pixel outline faded below the threshold) capped IoU near 0.65."""
    from PIL import Image

    annotator = metrics.load_annotator("canny")
    drawn = [circle(0, i, 64) for i in range(16)]
    conditions = metrics.reannotate(annotator, [np.asarray(im) for im, _ in drawn])
    small = [np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC)) for im, _ in drawn]
    scores = metrics.metrics_for("canny", small, conditions, [c for _, c in drawn], task="circle", annotator=annotator)
    assert scores["circle_iou"] > 0.9 and scores["colour_accuracy"] == 1.0
    assert scores["edge_f1"] > 0.9


def test_centre_square_is_the_region_a_centre_cropped_sample_covers():
    m = np.arange(6 * 10).reshape(6, 10)
    assert np.array_equal(metrics.centre_square(m), m[:, 2:8])
    assert np.array_equal(metrics.centre_square(m.T), m.T[2:8, :])
