"""Controllability metrics: does a generated image obey its condition?

As ControlNet++ (Li et al., arXiv 2404.07987) measures it: re-annotate the generated image with the
condition's own annotator and compare that map with the input condition. One small function per
metric, each scoring one image on uint8 maps; ``metrics_for`` runs the right ones for a condition:

    scores = metrics_for("canny", generated_images, condition_maps, captions)   # {"edge_f1": 0.41}

The circle task (ControlNet's fill50k: condition = a circle's outline, target = the filled circle in
the caption's colours) scores the generated RGB image directly: circle IoU and colour accuracy.
Only numpy and OpenCV (a runtime dependency) are used, so the trainer can call these every
validation step.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import cv2
import numpy as np

if TYPE_CHECKING:
    from annotators.base import Annotator

#: Task name of the fill50k-style circle metrics (its condition is a ``canny`` outline).
CIRCLE = "circle"
#: Metrics where smaller is better (reports and comparisons must know the direction).
LOWER_IS_BETTER = frozenset({"depth_rmse"})

#: Named colours of the circle task: colour accuracy names the nearest of these, and the demo's
#: circles (``demo/circles.py``) are drawn in them. Every pair is at least 100 apart in RGB and
#: differs by 100 or more in one channel, so a generated colour maps to one name and Canny
#: (thresholds 100/200) sees every edge.
CIRCLE_PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "light blue": (140, 200, 250),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
#: Reads (circle colour, background colour) back from a caption written by ``circle_caption``.
CIRCLE_CAPTION = r"\ban? (?P<colour>[a-z ]+?) circle on an? (?P<background>[a-z ]+?) background\b"

# OpenPose's 18 body keypoint colours (controlnet-aux ``draw_bodypose``): each keypoint is a filled
# circle in its own pure colour, drawn over limbs in the same colours at 60%, so a skeleton map
# encodes its keypoints losslessly (PNG) and both pose annotators draw with it.
OPENPOSE_COLOURS = np.array([
    [255, 0, 0], [255, 85, 0], [255, 170, 0], [255, 255, 0], [170, 255, 0], [85, 255, 0], [0, 255, 0],
    [0, 255, 85], [0, 255, 170], [0, 255, 255], [0, 170, 255], [0, 85, 255], [0, 0, 255], [85, 0, 255],
    [170, 0, 255], [255, 0, 255], [255, 0, 170], [255, 0, 85],
], dtype=np.int16)


# ---------------------------------------------------------------------------------------- helpers

def to_gray(m: np.ndarray) -> np.ndarray:
    """A uint8 map as float64 HxW in 0..255 (3-channel maps of grey values average to themselves)."""
    m = np.asarray(m)
    if m.ndim == 3:
        m = m[..., :3].mean(axis=2) if m.shape[2] > 1 else m[..., 0]
    return m.astype(np.float64)


def binary(m: np.ndarray, threshold: float = 127.0) -> np.ndarray:
    """A map as a boolean mask: pixels brighter than ``threshold`` (boolean masks pass through)."""
    m = np.asarray(m)
    return m if m.dtype == bool and m.ndim == 2 else to_gray(m) > threshold


def _check_same_size(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"maps differ in size: {a.shape[:2]} vs {b.shape[:2]}")


def centre_square(m: np.ndarray) -> np.ndarray:
    """The centre square of a map at its own resolution: the region a centre-cropped sample covers."""
    m = np.asarray(m)
    height, width = m.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return m[top:top + side, left:left + side]


def at_size_of(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` resized (bicubic) to ``reference``'s height and width, when they differ.

    Samples are compared with their condition at the condition's own resolution: a thin edge map
    shrunk to a small generation size fades below any threshold (a 1-pixel Canny outline at half
    size scores a perfect image's circle IoU at about 0.65), while an upscaled sample loses nothing.
    """
    from PIL import Image

    image = np.asarray(image)
    height, width = np.asarray(reference).shape[:2]
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


# --------------------------------------------------------------------- one function per condition

def edge_f1(condition: np.ndarray, generated: np.ndarray, tolerance: int = 2) -> float:
    """F1 of generated edges against condition edges, each matched within ``tolerance`` pixels.

    Precision: share of generated edge pixels within ``tolerance`` of a condition edge; recall:
    the converse. The tolerance (a disc dilation) forgives the one- or two-pixel shifts that any
    re-detection of the same edge has. No edges in either map is a perfect 1.0.
    """
    _check_same_size(condition, generated)
    cond, gen = binary(condition), binary(generated)
    if not cond.any() and not gen.any():
        return 1.0
    if not cond.any() or not gen.any():
        return 0.0
    size = 2 * tolerance + 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
    near_cond = cv2.dilate(cond.astype(np.uint8), disc) > 0
    near_gen = cv2.dilate(gen.astype(np.uint8), disc) > 0
    precision = float((gen & near_cond).sum() / gen.sum())
    recall = float((cond & near_gen).sum() / cond.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def ssim(condition: np.ndarray, generated: np.ndarray, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004) of two grey maps, Gaussian window.

    The soft-edge (HED) metric. Same definition as scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=255)``: 11x11 window, K1=0.01, K2=0.03, a border of 5 pixels left out of the mean.
    1.0 for identical maps; an inverted map scores below zero.
    """
    _check_same_size(condition, generated)
    x, y = to_gray(condition), to_gray(generated)
    radius = int(3.5 * sigma + 0.5)  # scikit-image's truncate=3.5

    def blur(a: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(a, (2 * radius + 1, 2 * radius + 1), sigma, borderType=cv2.BORDER_REFLECT)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    if min(s.shape) > 2 * radius:  # the window overhangs the border there
        s = s[radius:-radius, radius:-radius]
    return float(s.mean())


def depth_rmse(condition: np.ndarray, generated: np.ndarray) -> float:
    """RMSE (0..255 units) of generated depth after a least-squares scale and shift onto the condition.

    Relative depth models (MiDaS) fix depth only up to scale and shift, so those are fitted away.
    The scale is kept non-negative: near must stay bright, and a negative scale would reward an
    inverted map. Lower is better; identical maps score 0.
    """
    _check_same_size(condition, generated)
    target, pred = to_gray(condition).ravel(), to_gray(generated).ravel()
    design = np.stack([pred, np.ones_like(pred)], axis=1)
    (scale, shift), *_ = np.linalg.lstsq(design, target, rcond=None)
    if scale < 0:  # the best non-negative scale is then 0: a flat map at the mean
        scale, shift = 0.0, target.mean()
    return float(np.sqrt(np.mean((scale * pred + shift - target) ** 2)))


def _labels(m: np.ndarray) -> np.ndarray:
    """HxW integer labels: class ids as given, or colours packed into one integer (palette maps)."""
    m = np.asarray(m)
    if m.ndim == 2:
        return m.astype(np.int64)
    rgb = m[..., :3].astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def miou(condition: np.ndarray, generated: np.ndarray) -> float:
    """Mean IoU over the classes present in either map (colour-coded or label maps).

    The segmentation annotator paints ADE20K's palette, so a colour is a class. A class only
    one map has scores 0, so hallucinated and missing classes both cost.
    """
    _check_same_size(condition, generated)
    a, b = _labels(condition), _labels(generated)
    classes = np.union1d(np.unique(a), np.unique(b))
    return float(np.mean([_iou(a == c, b == c) for c in classes]))


def skeleton_keypoints(skeleton: np.ndarray, colour_tolerance: int = 8) -> list[list[tuple[float, float]]]:
    """Per OpenPose body keypoint (18), the (x, y) centres of its dots in a skeleton map.

    Reads what ``openpose`` and ``mediapipe_pose`` draw: each keypoint is a dot in its own pure
    colour (limbs are 60% of those colours, far outside the tolerance). One dot per person.
    Hands, when drawn, use the left knee's blue and add candidates for it.
    """
    rgb = np.asarray(skeleton)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        return [[] for _ in OPENPOSE_COLOURS]
    rgb = rgb[..., :3].astype(np.int16)
    out = []
    for colour in OPENPOSE_COLOURS:
        mask = (np.abs(rgb - colour).max(axis=2) <= colour_tolerance).astype(np.uint8)
        count, _, _, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
        out.append([(float(x), float(y)) for x, y in centroids[1:count]])  # component 0 is the rest
    return out


def pck(condition: np.ndarray, generated: np.ndarray, alpha: float = 0.05) -> float:
    """Percentage of correct keypoints: condition keypoints with a generated keypoint of the same
    kind within ``alpha * max(H, W)`` pixels, as a share in 0..1.

    Keypoints are read from the skeleton maps (``skeleton_keypoints``), so the condition needs no
    side table and any person count works. No keypoints in either map is a perfect 1.0.
    """
    _check_same_size(condition, generated)
    reach = alpha * max(condition.shape[:2])
    cond, gen = skeleton_keypoints(condition), skeleton_keypoints(generated)
    total = sum(len(points) for points in cond)
    if total == 0:
        return 1.0 if not any(gen) else 0.0
    hits = 0
    for wanted, found in zip(cond, gen):
        for x, y in wanted:
            hits += any((x - u) ** 2 + (y - v) ** 2 <= reach ** 2 for u, v in found)
    return hits / total


def mask_iou(condition: np.ndarray, generated: np.ndarray) -> float:
    """IoU of two binary masks (bright = inside), e.g. person masks. Two empty masks score 1.0."""
    _check_same_size(condition, generated)
    return _iou(binary(condition), binary(generated))


# ------------------------------------------------------------------------------ the circle task

def fill_outline(outline: np.ndarray) -> np.ndarray:
    """The filled shape whose outline (edge map) is given, outline included, as a boolean mask.

    A closed outline is filled as drawn; one with gaps (nothing enclosed) falls back to its
    convex hull, right for the circle task's convex shapes.
    """
    edges = binary(outline).astype(np.uint8)
    contours, _ = cv2.findContours(edges, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(edges.shape, np.uint8)
    if not contours:
        return filled > 0
    cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    if not (filled & (1 - edges)).any():  # an outline with gaps encloses nothing
        cv2.fillConvexPoly(filled, cv2.convexHull(np.concatenate(contours)), 1)
    return filled > 0


def shape_outline(mask: np.ndarray) -> np.ndarray:
    """The Canny outline (0/255) of a boolean mask, as the ``canny`` annotator outlines a
    two-colour image: on a clean step edge Canny's pixels depend only on the edge's geometry."""
    return cv2.Canny(mask.astype(np.uint8) * 255, 100, 200)


def border_colour(image: np.ndarray) -> np.ndarray:
    """Median RGB of the image's outermost pixels: the background, when the shape stays inside."""
    rgb = np.asarray(image)[..., :3]
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])
    return np.median(border, axis=0)


def segment_shape(image: np.ndarray, min_distance: float = 40.0) -> np.ndarray:
    """The generated shape as a boolean mask: the largest blob unlike the background, holes filled.

    Distance in RGB to the border colour, thresholded by Otsu but never below ``min_distance``
    (so a plain noisy background yields nothing, not noise); only the largest blob is kept, since
    the task draws one shape and specks elsewhere are not it.
    """
    rgb = np.asarray(image)[..., :3].astype(np.float64)
    distance = np.linalg.norm(rgb - border_colour(image), axis=2)
    scaled = np.clip(distance, 0, 255).astype(np.uint8)
    otsu, _ = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (distance > max(otsu, min_distance)).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    out = np.zeros(mask.shape, np.uint8)
    if contours:
        largest = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
        cv2.drawContours(out, [largest], -1, 1, thickness=cv2.FILLED)
    return out > 0


def circle_iou(image: np.ndarray, outline: np.ndarray) -> float:
    """IoU of the circle drawn in ``image`` (RGB) against the filled condition ``outline``.

    The generated circle is outlined by Canny and filled the same way as the condition, so both
    masks carry the same sub-pixel bias (Canny marks a step edge on one side or the other by its
    direction) and a perfect sample scores 1.0, not ~0.93 as raw masks would at 64 px.
    """
    _check_same_size(image, outline)
    return _iou(fill_outline(shape_outline(segment_shape(image))), fill_outline(outline))


def nearest_colour(rgb: Sequence[float], palette: Mapping[str, Sequence[int]] = CIRCLE_PALETTE) -> str:
    """The palette name nearest to an RGB colour (Euclidean distance)."""
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], float) - np.asarray(rgb, float), axis=1)
    return names[int(np.argmin(distances))]


def circle_caption(colour: str, background: str) -> str:
    """The caption of a circle-task image; ``caption_colours`` reads it back."""
    return f"a {colour} circle on a {background} background"


def caption_colours(caption: str) -> tuple[str, str] | None:
    """(circle colour, background colour) named by a caption such as "a red circle on a blue
    background", or None when the caption does not name both."""
    match = re.search(CIRCLE_CAPTION, caption.lower())
    return None if match is None else (match["colour"].strip(), match["background"].strip())


def image_colours(image: np.ndarray) -> tuple[str | None, str]:
    """(circle colour, background colour) drawn in ``image`` as palette names; no shape: None."""
    rgb = np.asarray(image)[..., :3]
    mask = segment_shape(image)
    circle = nearest_colour(np.median(rgb[mask], axis=0)) if mask.any() else None
    return circle, nearest_colour(border_colour(image))


def colour_match(image: np.ndarray, caption: str) -> float:
    """1.0 when both the circle and the background have the colours the caption names, else 0.0.

    Averaged over images this is the colour accuracy: the share of images with both right.
    """
    wanted = caption_colours(caption)
    return float(wanted is not None and image_colours(image) == wanted)


# ---------------------------------------------------------------------------------- dispatcher

MapMetric = Callable[[np.ndarray, np.ndarray], float]

#: condition (annotator) name -> {metric name: f(condition map, re-annotated generated map)}
CONDITION_METRICS: dict[str, dict[str, MapMetric]] = {
    "canny": {"edge_f1": edge_f1},
    "hed": {"ssim": ssim},
    "depth": {"depth_rmse": depth_rmse},
    "segmentation": {"miou": miou},
    "mediapipe_pose": {"pck": pck},
    "openpose": {"pck": pck},
    "person_mask": {"mask_iou": mask_iou},
}
#: task -> metric names; task metrics read the generated RGB image, the condition and the caption.
TASK_METRICS: dict[str, tuple[str, ...]] = {CIRCLE: ("circle_iou", "colour_accuracy")}


def metric_names(condition: str, task: str | None = None) -> list[str]:
    """Names of the metrics ``metrics_for`` returns for this condition (and task); may be empty
    for a condition no metric knows (a plugin annotator)."""
    if task is not None and task not in TASK_METRICS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASK_METRICS)}")
    names = list(CONDITION_METRICS.get(condition, {}))
    return names + list(TASK_METRICS.get(task or condition, ()))


def as_rgb(image: Any) -> np.ndarray:
    """A PIL image or array as a uint8 HxWx3 array (what annotators take)."""
    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)


def load_annotator(condition: str, params: Mapping[str, Any] | None = None,
                   weights_dir: str | None = None) -> "Annotator":
    """The condition's annotator from the registry, weights located and loaded, ready to call."""
    from annotators import registry

    annotator = registry.create(condition, params or {}, weights_dir)
    annotator.locate_weights()  # names a missing weight file before loading anything
    annotator.setup()
    return annotator


def reannotate(annotator: Any, images: Sequence[Any], ids: Sequence[str] | None = None) -> list[np.ndarray]:
    """The annotator's maps of generated images; an image it skips (no person) gets an empty map.

    Pass the rows' ids: annotators with per-image randomness (Canny's random thresholds) then
    draw exactly what they drew for the condition.
    """
    from annotators.base import AnnotationSkipped

    rgb = [as_rgb(im) for im in images]
    ids = [str(i) for i in range(len(rgb))] if ids is None else list(ids)
    maps = annotator.annotate(rgb, ids)
    return [np.zeros(im.shape[:2], np.uint8) if isinstance(m, AnnotationSkipped) else np.asarray(m)
            for m, im in zip(maps, rgb)]


def score_images(condition: str, generated: Sequence[Any], condition_maps: Sequence[np.ndarray],
                 captions: Sequence[str] | None = None, *, task: str | None = None, annotator: Any = None,
                 ids: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Per-image scores, {metric name: [score per image]}, for ``metric_names(condition, task)``.

    Condition metrics re-annotate ``generated`` with ``annotator`` (default: the registry's
    annotator for ``condition`` with default parameters); the circle task needs ``captions``.
    """
    names = metric_names(condition, task)
    if len(generated) != len(condition_maps):
        raise ValueError(f"{len(generated)} generated images but {len(condition_maps)} condition maps")
    maps = [np.asarray(m) for m in condition_maps]
    rgb = [at_size_of(as_rgb(im), m) for im, m in zip(generated, maps)]
    scores: dict[str, list[float]] = {}
    if condition in CONDITION_METRICS:
        annotated = reannotate(annotator or load_annotator(condition), rgb, ids)
        for name, metric in CONDITION_METRICS[condition].items():
            scores[name] = [metric(c, a) for c, a in zip(maps, annotated)]
    if CIRCLE in (task, condition):
        if captions is None or len(captions) != len(rgb):
            raise ValueError("the circle task needs one caption per generated image")
        scores["circle_iou"] = [circle_iou(im, c) for im, c in zip(rgb, maps)]
        scores["colour_accuracy"] = [colour_match(im, cap) for im, cap in zip(rgb, captions)]
    return {name: scores[name] for name in names}


def summarise(scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Mean of each metric over images."""
    return {name: float(np.mean(values)) if len(values) else float("nan") for name, values in scores.items()}


def metrics_for(condition: str, generated: Sequence[Any], condition_maps: Sequence[np.ndarray],
                captions: Sequence[str] | None = None, *, task: str | None = None, annotator: Any = None,
                ids: Sequence[str] | None = None) -> dict[str, float]:
    """Controllability of a batch of generated images: {metric name: mean over images}.

    ``generated``: PIL images or uint8 HxWx3 arrays; ``condition_maps``: the uint8 maps they were
    generated from, best at the maps' stored resolution (each image is resized to its map's size); ``task="circle"`` adds circle IoU and colour accuracy. Reuse one
    loaded ``annotator`` across calls (e.g. every validation step) to load its weights once.
    """
    return summarise(score_images(condition, generated, condition_maps, captions, task=task,
                                  annotator=annotator, ids=ids))
