"""Model annotators load through the same from_pretrained(folder) path users take, and behave.

Weights are random (see tests/fake_weights.py): the real architectures and file layouts, with a
few layers set so the maps are not degenerate (MiDaS depth varies with the image; OpenPose finds
a "puppet" of coloured discs and draws its skeleton). MediaPipe's weights are real (they ship in
its wheel). Real-weight checks run when CONTROLFORGE_WEIGHTS names a folder with the real files.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

from annotators import registry
from annotators.base import AnnotationSkipped
from annotators.depth import normalise
from annotators.weights import WEIGHTS_ENV, MissingWeightsError
from tests.fake_weights import PUPPET_LIMBS, draw_puppet, puppet_points

MODEL_CASES = [
    ("hed", {}),
    ("hed", {"scribble": True}),
    ("depth", {"detect_resolution": 128}),
    ("depth", {"model": "dpt-tiny"}),
    ("openpose", {"hands": True, "face": True}),
    ("segmentation", {}),
]

# OpenPose's colours (RGB), indexed by keypoint and by limb; limbs are drawn at 60% brightness.
OPENPOSE_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
                    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
                    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def limb_colour(limb: int) -> tuple[int, ...]:
    """The colour OpenPose draws limb number ``limb`` in."""
    return tuple(int(c * 0.6) for c in OPENPOSE_COLOURS[limb])


# ADE20K classes and their colours in the palette ControlNet's seg models were trained on.
ADE20K_COLOURS = {2: (6, 230, 230), 12: (150, 5, 61)}  # sky, person


@pytest.fixture(scope="module")
def loaded(weights_dir):
    """Each annotator case, set up once (loading is the slow part)."""
    cache = {}

    def get(name, params):
        key = (name, tuple(sorted(params.items())))
        if key not in cache:
            annotator = registry.create(name, params, str(weights_dir))
            annotator.setup()
            cache[key] = annotator
        return cache[key]

    return get


@pytest.fixture(scope="module")
def puppet_photo(photos):
    """The astronaut photo (256x256) with the fake OpenPose model's puppet drawn on it."""
    return draw_puppet(photos["astronaut"], neck=(128, 100), unit=40)


def assert_has_content(cond: np.ndarray) -> None:
    """At least 1% of the map differs from its most common value (not blank, not constant)."""
    pixels = cond.reshape(cond.shape[0] * cond.shape[1], -1)
    _, counts = np.unique(pixels, axis=0, return_counts=True)
    assert 1 - counts.max() / len(pixels) > 0.01, "the map is (almost) constant"


@pytest.mark.parametrize(("name", "params"), MODEL_CASES, ids=lambda v: str(v))
def test_maps_match_size_dtype_and_range(loaded, photos, name, params):
    annotator = loaded(name, params)
    images = [photos["astronaut"], photos["chelsea"]]  # two different sizes in one batch
    maps = annotator.annotate(images, ["a", "b"])
    for image, cond in zip(images, maps):
        assert cond.dtype == np.uint8 and cond.shape[:2] == image.shape[:2]
        assert cond.ndim == 2 or cond.shape[2] == 3
    if name == "depth":  # normalised per image: nearest at 255, farthest at 0
        assert all(m.min() == 0 and m.max() == 255 for m in maps)


@pytest.mark.parametrize(("name", "params"), MODEL_CASES, ids=lambda v: str(v))
def test_batch_of_n_equals_n_single_calls(loaded, puppet_photo, name, params):
    annotator = loaded(name, params)
    base = puppet_photo
    # three different images of one size; each keeps the puppet upright, so OpenPose finds it
    images = [base, base[:, ::-1].copy(), np.roll(base, (24, 24), axis=(0, 1))]
    batch = annotator.annotate(images, ["a", "b", "c"])
    for image, cond, i in zip(images, batch, "abc"):
        assert_has_content(cond)  # comparing blank maps would prove nothing
        single = annotator.annotate([image], [i])[0]
        diff = np.abs(cond.astype(int) - single.astype(int))
        if name == "segmentation":  # class ids: batching noise can only flip near-tied pixels
            assert (diff.max(axis=2) > 0).mean() < 0.02
        else:  # float batching noise only
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01
    assert not np.array_equal(batch[0], batch[1])  # each map comes from its own image


def test_random_midas_depth_varies_with_the_image(loaded, photos):
    depth = loaded("depth", {"detect_resolution": 128})
    astronaut, coffee = photos["astronaut"], np.ascontiguousarray(photos["coffee"][:, :256])
    maps = depth.annotate([astronaut, coffee], ["a", "c"])
    for cond in maps:
        assert cond.std() > 20  # spread over the range, not one flat level
    assert np.abs(maps[0].astype(int) - maps[1]).mean() > 10  # another image, another map


# --- depth: near = bright ----------------------------------------------------------------


class GroundPlane:
    """A stand-in depth model whose relative inverse depth grows down the image (bottom nearest)."""

    def __call__(self, pixel_values=None, **_):
        import torch

        n, _, height, width = pixel_values.shape
        return torch.linspace(0.1, 2.0, height).view(1, height, 1).expand(n, height, width).clone()


def test_normalise_maps_the_largest_inverse_depth_to_white():
    out = normalise(np.array([[0.5, 1.0, 2.0]], np.float32))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 85, 255]]
    assert not normalise(np.ones((2, 2), np.float32)).any()  # no depth range: black, not noise


def ground_plane_map(annotator, size=(96, 128)) -> np.ndarray:
    """The annotator's map of a flat grey image (the stand-in model decides the depth)."""
    image = np.full((*size, 3), 128, np.uint8)
    (cond,) = annotator.annotate([image], ["g"])
    return cond


def assert_bottom_is_brightest(cond: np.ndarray) -> None:
    rows = cond.mean(axis=1)
    assert rows[-1] == 255 and rows[0] == 0
    assert np.all(np.diff(rows) >= 0)  # brighter row by row towards the near end


def test_midas_depth_is_bright_where_the_model_says_near(weights_dir):
    depth = registry.create("depth", {"detect_resolution": 64}, str(weights_dir))
    depth.device, depth.model = "cpu", GroundPlane()  # the model's output is the only thing replaced
    assert_bottom_is_brightest(ground_plane_map(depth))


def test_transformers_depth_is_bright_where_the_model_says_near(weights_dir):
    depth = registry.create("depth", {"model": "dpt-tiny"}, str(weights_dir))
    depth.setup()  # the real processor resizes to 64x64; the map must come back at 96x128
    plane = GroundPlane()
    depth.model = lambda **inputs: SimpleNamespace(predicted_depth=plane(**inputs))
    assert_bottom_is_brightest(ground_plane_map(depth))


# --- OpenPose: the puppet's skeleton ------------------------------------------------------


def test_openpose_draws_the_puppet_skeleton_where_the_puppet_is(loaded, photos):
    pose = loaded("openpose", {})
    neck, unit = (250, 90), 36
    image = draw_puppet(photos["chelsea"], neck, unit)  # 256x384: not square, so x and y cannot swap
    (skeleton,) = pose.annotate([image], ["p"])
    points = puppet_points(neck, unit)
    for part, (x, y) in points.items():  # each keypoint as a dot of its own colour
        assert tuple(skeleton[round(y), round(x)]) == OPENPOSE_COLOURS[part]
    for limb, (a, b) in PUPPET_LIMBS.items():  # each limb in its own colour, between its keypoints
        (xa, ya), (xb, yb) = points[a], points[b]
        assert tuple(skeleton[round((ya + yb) / 2), round((xa + xb) / 2)]) == limb_colour(limb)
    rows, cols = np.nonzero(skeleton.any(axis=2))
    xs, ys = [x for x, _ in points.values()], [y for _, y in points.values()]
    assert min(xs) - 6 <= cols.min() and cols.max() <= max(xs) + 6  # nothing drawn off the puppet
    assert min(ys) - 6 <= rows.min() and rows.max() <= max(ys) + 6


def test_openpose_require_detection_skips_images_without_a_person(weights_dir, photos, puppet_photo):
    pose = registry.create("openpose", {"require_detection": True}, str(weights_dir))
    pose.setup()
    empty, found = pose.annotate([photos["coffee"], puppet_photo], ["c", "p"])
    assert isinstance(empty, AnnotationSkipped) and str(empty) == "no person"
    assert isinstance(found, np.ndarray) and found.any()


# --- segmentation: the ADE20K palette ------------------------------------------------------


def test_segmentation_paints_only_ade20k_palette_colours(loaded, photos):
    from controlnet_aux.util import ade_palette

    palette = {tuple(c) for c in ade_palette()}
    for cond in loaded("segmentation", {}).annotate([photos["astronaut"], photos["chelsea"]], ["a", "c"]):
        colours = {tuple(c) for c in np.unique(cond.reshape(-1, 3), axis=0)}
        assert len(colours) > 1 and colours <= palette


@pytest.fixture(scope="module")
def one_label_segmenter(weights_dir, tmp_path_factory):
    """The tiny UperNet, its classifier set to always answer one ADE20K label, as a model folder."""
    import torch
    from transformers import AutoImageProcessor, UperNetForSemanticSegmentation

    source = weights_dir / "upernet-convnext-small"

    def make(label: int):
        folder = tmp_path_factory.mktemp(f"upernet-label-{label}")
        model = UperNetForSemanticSegmentation.from_pretrained(source)
        with torch.no_grad():
            model.decode_head.classifier.weight.zero_()
            model.decode_head.classifier.bias.fill_(-10.0)
            model.decode_head.classifier.bias[label] = 10.0
        model.save_pretrained(folder)
        AutoImageProcessor.from_pretrained(source).save_pretrained(folder)
        annotator = registry.create("segmentation", {"model": str(folder)}, str(weights_dir))
        annotator.setup()
        return annotator

    return make


@pytest.mark.parametrize("label", sorted(ADE20K_COLOURS))
def test_a_known_ade20k_label_is_painted_in_its_palette_colour(one_label_segmenter, photos, label):
    (cond,) = one_label_segmenter(label).annotate([photos["coffee"]], ["c"])
    assert cond.shape == photos["coffee"].shape
    assert (cond.reshape(-1, 3) == ADE20K_COLOURS[label]).all()


# --- weights: provenance and errors ------------------------------------------------------


def test_provenance_records_weight_hashes(weights_dir):
    annotator = registry.create("hed", {}, str(weights_dir))
    annotator.locate_weights()
    prov = annotator.provenance()
    assert set(prov["weights"]) == {"ControlNetHED.pth"} and len(prov["weights"]["ControlNetHED.pth"]) == 64
    assert prov["versions"]["controlnet-aux"] == "0.0.10"


@pytest.mark.parametrize(
    ("name", "params", "missing"),
    [
        ("hed", {}, "ControlNetHED.pth"),
        ("depth", {}, "dpt_hybrid-midas-501f0c75.pt"),
        ("openpose", {}, "body_pose_model.pth"),
        ("segmentation", {}, "upernet-convnext-small"),
    ],
)
def test_missing_weights_name_the_file_the_folder_and_the_source(tmp_path, name, params, missing):
    with pytest.raises(MissingWeightsError) as exc:
        registry.create(name, params, str(tmp_path)).locate_weights()
    message = str(exc.value)
    assert missing in message and str(tmp_path) in message and "huggingface.co" in message


def test_no_weights_folder_says_how_to_give_one(monkeypatch):
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match=f"--weights-dir DIR or set {WEIGHTS_ENV}"):
        registry.create("hed").locate_weights()


# --- MediaPipe: real models, real photos -------------------------------------------------


@pytest.fixture(scope="module")
def person_mask(photos):
    annotator = registry.create("person_mask")
    annotator.setup()
    return annotator.annotate([photos["astronaut"]], ["a"])[0]


def test_pose_skeleton_lies_over_the_person(photos, person_mask):
    import cv2

    pose = registry.create("mediapipe_pose")
    pose.setup()
    skeleton = pose.annotate([photos["astronaut"]], ["a"])[0]
    drawn = skeleton.any(axis=2)
    assert skeleton.shape == photos["astronaut"].shape and drawn.mean() > 0.005
    near_person = cv2.dilate(person_mask, np.ones((25, 25), np.uint8)) > 0
    assert (drawn & near_person).sum() / drawn.sum() > 0.9
    colours = {tuple(c) for c in skeleton[drawn].reshape(-1, 3)[::50]}
    assert len(colours) > 5  # OpenPose draws each limb in its own colour


def test_person_mask_covers_the_person(person_mask):
    height, width = person_mask.shape
    assert set(np.unique(person_mask)) <= {0, 255}
    assert 0.1 < (person_mask > 0).mean() < 0.8
    assert person_mask[height // 2, width // 3] == 255  # the astronaut's torso, left of centre


def test_face_mesh_is_drawn_on_a_face():
    from skimage import data

    astronaut = np.ascontiguousarray(data.astronaut())  # 512 px: at 256 the face is too small to mesh
    face = registry.create("mediapipe_face")
    face.setup()
    (mesh,) = face.annotate([astronaut], ["a"])
    assert mesh.shape == astronaut.shape and mesh.any()
    rows, cols = np.nonzero(mesh.any(axis=2))
    assert 50 < rows.mean() < 250 and 150 < cols.mean() < 300  # where the astronaut's face is
    from controlnet_aux.mediapipe_face.mediapipe_face_common import generate_annotation

    assert np.array_equal(mesh, generate_annotation(astronaut, 1, 0.5))  # the map the face ControlNet saw


def test_no_person_gives_an_empty_map_or_a_skip(photos):
    optional = registry.create("mediapipe_pose")
    optional.setup()
    assert not optional.annotate([photos["coffee"]], ["c"])[0].any()
    required = registry.create("mediapipe_pose", {"require_detection": True})
    required.setup()
    (result,) = required.annotate([photos["coffee"]], ["c"])
    assert isinstance(result, AnnotationSkipped) and str(result) == "no person"


# --- real weights, when the user has them ------------------------------------------------
# These check what the maps mean, on real photos, against MediaPipe's person mask (real weights,
# offline) or image gradients; random weights fail them.

REAL = os.environ.get(WEIGHTS_ENV)
real_weights = pytest.mark.skipif(not REAL, reason=f"{WEIGHTS_ENV} is not set: real-weight checks need the real files")


def real(name: str, params: dict | None = None):
    annotator = registry.create(name, params or {}, REAL)
    annotator.setup()
    return annotator


@pytest.fixture(scope="module")
def astronaut512() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


@pytest.fixture(scope="module")
def astronaut_mask(astronaut512) -> np.ndarray:
    """Where the astronaut is (MediaPipe selfie segmentation), as booleans."""
    return real("person_mask").annotate([astronaut512], ["a"])[0] > 0


def ground_plane_photo(height: int = 384, width: int = 512, horizon: int = 128) -> np.ndarray:
    """A checkered floor up to the horizon under a pale sky: each floor row is nearer than the one
    above it (distance = camera height x focal length / rows below the horizon)."""
    from PIL import Image

    scale = 4  # drawn 4x larger, then shrunk, so that the far checks blur instead of aliasing
    y = (np.arange(height * scale)[:, None] + 0.5) / scale - horizon
    x = (np.arange(width * scale)[None, :] + 0.5) / scale - width / 2
    distance = 1.5 * 400 / np.maximum(y, 1e-3)  # metres, camera 1.5 m high, focal 400 px
    across = x * distance / 400
    checks = (np.floor(across / 0.5) + np.floor(distance / 0.5)) % 2
    floor = np.where(checks[..., None] > 0, [200, 170, 120], [90, 60, 40])
    big = np.where((y > 0)[..., None], floor, [170, 200, 235]).astype(np.uint8)
    return np.asarray(Image.fromarray(big).resize((width, height), Image.BOX))


@real_weights
@pytest.mark.parametrize("name", ["hed", "depth", "openpose"])
def test_real_weights_make_plausible_maps(photos, name):
    (cond,) = real(name).annotate([photos["astronaut"]], ["a"])
    assert cond.shape[:2] == photos["astronaut"].shape[:2] and cond.any()


@real_weights
def test_real_depth_puts_the_astronaut_in_front_of_the_background(astronaut512, astronaut_mask):
    (depth,) = real("depth").annotate([astronaut512], ["a"])
    assert depth[astronaut_mask].mean() > depth[~astronaut_mask].mean() + 20  # near = bright


@real_weights
def test_real_depth_of_a_floor_brightens_towards_the_camera():
    image = ground_plane_photo()
    (depth,) = real("depth").annotate([image], ["g"])
    floor_rows = depth[128 + 16:].mean(axis=1)  # below the horizon, where the distance is known
    order = np.corrcoef(np.arange(len(floor_rows)), floor_rows)[0, 1]
    assert order > 0.8 and floor_rows[-32:].mean() > floor_rows[:32].mean() + 30
    assert depth[:96].mean() < floor_rows[-32:].mean()  # the sky is far


@real_weights
def test_real_openpose_skeleton_lies_over_the_astronaut(astronaut512, astronaut_mask):
    import cv2

    (skeleton,) = real("openpose").annotate([astronaut512], ["a"])
    drawn = skeleton.any(axis=2)
    assert drawn.mean() > 0.003
    near_person = cv2.dilate(astronaut_mask.astype(np.uint8), np.ones((25, 25), np.uint8)) > 0
    assert (drawn & near_person).sum() / drawn.sum() > 0.9
    assert len({tuple(c) for c in skeleton[drawn]}) > 5  # several limbs, each in its own colour


@real_weights
def test_real_hed_edges_follow_image_gradients(astronaut512):
    import cv2

    (edges,) = real("hed").annotate([astronaut512], ["a"])
    grey = cv2.cvtColor(astronaut512, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gradient = np.hypot(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    smooth = lambda a: cv2.GaussianBlur(a.astype(np.float32), (0, 0), 2).ravel()  # tolerate 1-2 px offsets
    aligned = np.corrcoef(smooth(edges), smooth(gradient))[0, 1]
    mirrored = np.corrcoef(smooth(edges[:, ::-1]), smooth(gradient))[0, 1]
    assert aligned > 0.3 and aligned > mirrored + 0.15


@real_weights
def test_real_segmentation_paints_the_astronaut_in_the_person_colour(astronaut512, astronaut_mask):
    from annotators.weights import locate_model_dir

    try:
        locate_model_dir(REAL, "upernet-convnext-small", "segmentation")
    except MissingWeightsError as exc:
        pytest.skip(f"no segmentation model under {REAL}: {exc}")
    (seg,) = real("segmentation").annotate([astronaut512], ["a"])
    person = (seg == ADE20K_COLOURS[12]).all(axis=2)
    assert (person & astronaut_mask).sum() / astronaut_mask.sum() > 0.5
    assert (person & astronaut_mask).sum() / max(person.sum(), 1) > 0.7


def test_annotators_leave_autograd_on_for_the_rest_of_the_process(loaded, photos):
    import torch

    loaded("hed", {}).annotate([photos["astronaut"]], ["a"])
    assert torch.is_grad_enabled()
