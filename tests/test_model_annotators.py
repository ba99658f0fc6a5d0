"""Model annotators load through the same from_pretrained(folder) path users take, and behave.

Weights are random (see conftest.weights_dir); MediaPipe's are real (they ship in its wheel).
Real-weight checks run when CONTROLFORGE_WEIGHTS names a folder with the real files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from annotators import registry
from annotators.base import AnnotationSkipped
from annotators.weights import WEIGHTS_ENV, MissingWeightsError

MODEL_CASES = [
    ("hed", {}),
    ("hed", {"scribble": True}),
    ("depth", {"detect_resolution": 128}),
    ("depth", {"model": "dpt-tiny"}),
    ("openpose", {"hands": True, "face": True}),
    ("segmentation", {}),
]


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


@pytest.mark.parametrize(("name", "params"), MODEL_CASES, ids=lambda v: str(v))
def test_maps_match_size_dtype_and_range(loaded, photos, name, params):
    annotator = loaded(name, params)
    images = [photos["astronaut"], photos["chelsea"]]  # two different sizes in one batch
    maps = annotator.annotate(images, ["a", "b"])
    for image, cond in zip(images, maps):
        assert cond.dtype == np.uint8 and cond.shape[:2] == image.shape[:2]
        assert cond.ndim == 2 or cond.shape[2] == 3
    if name == "depth":
        # normalised per image: nearest at 255, farthest at 0 (a flat prediction stays 0)
        assert all(m.min() == 0 and m.max() in (0, 255) for m in maps)


@pytest.mark.parametrize(("name", "params"), MODEL_CASES, ids=lambda v: str(v))
def test_batch_of_n_equals_n_single_calls(loaded, photos, name, params):
    annotator = loaded(name, params)
    base = photos["astronaut"]
    images = [base, base[:, ::-1].copy(), base[::-1].copy()]
    batch = annotator.annotate(images, ["a", "b", "c"])
    for image, cond, i in zip(images, batch, "abc"):
        single = annotator.annotate([image], [i])[0]
        diff = np.abs(cond.astype(int) - single.astype(int))
        if name == "segmentation":  # class ids: batching noise can only flip near-tied pixels
            assert (diff.max(axis=2) > 0).mean() < 0.02
        else:  # float batching noise only
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01


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

REAL = os.environ.get(WEIGHTS_ENV)


@pytest.mark.skipif(not REAL, reason=f"{WEIGHTS_ENV} is not set: real-weight checks need the real files")
@pytest.mark.parametrize("name", ["hed", "depth", "openpose"])
def test_real_weights_make_plausible_maps(photos, name):
    annotator = registry.create(name, {}, REAL)
    annotator.setup()
    (cond,) = annotator.annotate([photos["astronaut"]], ["a"])
    assert cond.shape[:2] == photos["astronaut"].shape[:2] and cond.any()


def test_annotators_leave_autograd_on_for_the_rest_of_the_process(loaded, photos):
    import torch

    loaded("hed", {}).annotate([photos["astronaut"]], ["a"])
    assert torch.is_grad_enabled()
