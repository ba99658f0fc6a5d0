"""SplitAnnotators: preprocess -> forward -> postprocess, run apart, give annotate()'s maps.

A pipeline runs ``preprocess`` and ``postprocess`` in CPU tasks whose process never called
``setup()``, and ``forward`` in a model actor; what passes between them is pickled through Ray's
object store, which hands arrays back read-only. These tests run the three parts that way (two
instances, a pickle round trip, frozen arrays) on a mixed-size batch with the random-weight models
of tests/fake_weights.py, and check the result against ``annotate()`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
import pytest

from annotators import registry
from annotators.base import AnnotationSkipped, SplitAnnotator
from tests.fake_weights import draw_puppet

# Parameter variants per split annotator; any other split annotator in the registry (a plugin, a
# new one) runs with its defaults. MiDaS sees 128 px (not 384) to keep the test fast; the split
# does not depend on the resolution.
VARIANTS: dict[str, list[dict[str, Any]]] = {
    "hed": [{}, {"scribble": True}, {"safe": True}, {"safe": True, "scribble": True}],
    "depth": [{"detect_resolution": 128}, {"model": "dpt-tiny"}],
    "openpose": [{}, {"hands": True, "face": True, "require_detection": True}],
    "segmentation": [{}],
}
SPLIT_NAMES = sorted(name for name in registry.available() if registry.get(name).splits)
CASES = [(name, params) for name in SPLIT_NAMES for params in VARIANTS.get(name, [{}])]

# What crosses the object store, as pickled bytes per uint8 image byte (plus 1 KiB of pickle
# framing), for images at least 184 px tall: OpenPose's body network sees 184 px whatever the
# image, so smaller images get larger inputs. Preprocess: the image itself or smaller. Forward:
# float32 at a model's own resolution (MiDaS depth, OpenPose's 57 maps at 1/8 of 184 px) is what
# can exceed a third (a uint8 map): about 1.0x for the 201 px image here, 0.15-0.75x at 512 px.
PREPROCESS_FACTOR = 1.0
FORWARD_FACTOR = 1.5
PICKLE_SLACK = 1024


@pytest.fixture(scope="module")
def loaded(weights_dir):
    """Each case's annotator, set up once (loading is the slow part)."""
    cache: dict = {}

    def get(name: str, params: dict) -> SplitAnnotator:
        key = (name, tuple(sorted(params.items())))
        if key not in cache:
            annotator = registry.create(name, params, str(weights_dir))
            annotator.setup()
            cache[key] = annotator
        return cache[key]

    return get


@pytest.fixture(scope="module")
def batch(photos) -> tuple[list[np.ndarray], list[str]]:
    """Mixed sizes (256x256 twice, 256x385, 201x299): three with OpenPose's puppet, one without a person."""
    astronaut, chelsea, coffee = photos["astronaut"], photos["chelsea"], photos["coffee"]
    puppet = draw_puppet(astronaut, neck=(128, 100), unit=40)
    images = [
        puppet,
        draw_puppet(chelsea, neck=(250, 90), unit=36),
        np.ascontiguousarray(coffee[:201, :299]),  # odd sizes: nothing divides by 8 or 32
        np.ascontiguousarray(puppet[:, ::-1]),  # a second image of the first one's size
    ]
    return images, [f"img{i}" for i in range(len(images))]


@dataclasses.dataclass
class Run:
    """One case on the batch: the parts run by hand, and annotate()."""

    model: SplitAnnotator
    cpu_side: SplitAnnotator
    """The same annotator, never set up: what a CPU task holds."""
    inputs: list
    """cpu_side's preprocess outputs, as they reach the model actor."""
    outputs: list
    """model.forward(inputs), as they reach the CPU task."""
    maps: list
    """model.annotate on the batch."""


@pytest.fixture(scope="module")
def run(loaded, weights_dir, batch):
    """Each case run once on the batch (forward is the slow part)."""
    images, ids = batch
    cache: dict = {}

    def get(name: str, params: dict) -> Run:
        key = (name, tuple(sorted(params.items())))
        if key not in cache:
            model = loaded(name, params)
            cpu_side = registry.create(name, params, str(weights_dir))
            inputs = [through_object_store(cpu_side.preprocess(img, i)) for img, i in zip(images, ids)]
            outputs = [through_object_store(out) for out in model.forward(inputs)]
            cache[key] = Run(model, cpu_side, inputs, outputs, model.annotate(images, ids))
        return cache[key]

    return get


def through_object_store(value: Any) -> Any:
    """``value`` as a Ray task receives it: pickled, unpickled, arrays read-only."""
    return freeze(pickle.loads(pickle.dumps(value, protocol=5)))


def freeze(value: Any) -> Any:
    """Mark every array inside (lists, tuples, named tuples) read-only."""
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, (list, tuple)):
        for item in value:
            freeze(item)
    return value


def assert_same_maps(got: list, want: list) -> None:
    """Maps equal bit for bit (dtype and shape too); skips equal by type and message."""
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if isinstance(b, AnnotationSkipped):
            assert isinstance(a, AnnotationSkipped) and str(a) == str(b), f"image {i}"
        else:
            assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, f"image {i}"
            assert np.array_equal(a, b), f"image {i}: {(a != b).sum()} values differ"


def pickled_size(value: Any) -> int:
    return len(pickle.dumps(value, protocol=5))


def test_the_torch_annotators_split_and_the_mediapipe_ones_do_not():
    """MediaPipe runs its model and landmark post-processing as one graph call on CPU: nothing
    to move off a GPU actor, so those annotators keep the plain protocol."""
    assert SPLIT_NAMES == ["depth", "hed", "openpose", "segmentation"]
    for name in SPLIT_NAMES:
        assert issubclass(registry.get(name), SplitAnnotator)
    for name in ("canny", "mediapipe_pose", "mediapipe_face", "person_mask"):
        assert not registry.get(name).splits


@pytest.mark.parametrize(("name", "params"), CASES, ids=str)
def test_parts_run_apart_give_annotates_maps(run, batch, name, params):
    images, ids = batch
    case = run(name, params)
    maps = [case.cpu_side.postprocess(out, img, i) for out, img, i in zip(case.outputs, images, ids)]
    assert_same_maps(maps, case.maps)
    for img, cond in zip(images, maps):
        if not isinstance(cond, AnnotationSkipped):
            assert cond.dtype == np.uint8 and cond.shape[:2] == img.shape[:2]
    assert not hasattr(case.cpu_side, "device")  # the CPU side really never set up


@pytest.mark.parametrize(("name", "params"), CASES, ids=str)
def test_preprocess_needs_no_model_and_what_crosses_is_picklable_and_compact(run, batch, name, params):
    images, ids = batch
    case = run(name, params)
    for img, i, inp, out in zip(images, ids, case.inputs, case.outputs):
        assert np.array_equal(inp, case.model.preprocess(img, i))  # preprocess does not depend on setup()
        assert pickled_size(inp) <= img.nbytes * PREPROCESS_FACTOR + PICKLE_SLACK
        assert pickled_size(out) <= img.nbytes * FORWARD_FACTOR + PICKLE_SLACK
        assert b"torch" not in pickle.dumps(out)  # numpy on the CPU, never tensors


def is_final_map(output: Any, final: Any) -> bool:
    return isinstance(output, np.ndarray) and output.shape == final.shape and np.array_equal(output, final)


@pytest.mark.parametrize(("name", "params"), CASES, ids=str)
def test_forward_leaves_the_cpu_work_to_postprocess(run, name, params):
    """Only HED's soft edges (plain or ``safe``) are final out of the network; every other map is
    made in postprocess (scribbles, depth resizing and normalisation, colouring, OpenPose's part
    grouping and drawing). With hands or face, OpenPose's grouping must run before their networks
    (they crop around the body), so forward returns keypoints and postprocess only draws."""
    case = run(name, params)
    final_out_of_forward = name == "hed" and not params.get("scribble")
    for out, final in zip(case.outputs, case.maps):
        if isinstance(final, np.ndarray):
            assert is_final_map(out, final) == final_out_of_forward


@pytest.mark.parametrize(("name", "params"), CASES, ids=str)
def test_forward_stacks_same_shape_inputs_and_keeps_their_order(run, batch, monkeypatch, name, params):
    """With a larger CPU sub-batch, same-shape inputs stack into one network call; each output still
    belongs to its own image (maps equal the one-at-a-time maps up to float batching noise)."""
    images, ids = batch
    case = run(name, params)
    monkeypatch.setattr(case.model, "cpu_batch", len(images))
    for cond, single in zip(case.model.annotate(images, ids), case.maps):
        if isinstance(single, AnnotationSkipped):
            continue
        assert cond.shape == single.shape
        diff = np.abs(cond.astype(int) - single.astype(int))
        differs = diff.max(axis=2) > 0 if diff.ndim == 3 else diff > 2
        assert differs.mean() < 0.02


# --- OpenPose with hands and face: their networks run in forward, on crops around the body -----


class RingHand:
    """Stands in for the hand network (whose random weights find nothing): 21 keypoints on a
    ring inside the crop, turned by the crop's mean colour so that they depend on the image."""

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        height, width = crop.shape[:2]
        angles = np.linspace(0, 2 * np.pi, 21, endpoint=False) + crop.mean() / 255.0
        return np.stack([width / 2 + width / 3 * np.cos(angles), height / 2 + height / 3 * np.sin(angles)], axis=1)


class GridFace:
    """Stands in for the face network: 'heatmaps' are the crop; 'peaks' a 7x7 grid across it."""

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        return crop

    def compute_peaks_from_heatmaps(self, heatmaps: np.ndarray) -> np.ndarray:
        height, width = heatmaps.shape[:2]
        ys, xs = np.meshgrid(np.linspace(5, height - 5, 7), np.linspace(5, width - 5, 7))
        return np.stack([xs.ravel(), ys.ravel()], axis=1)


@pytest.fixture
def openpose_with_hands_and_face(weights_dir, monkeypatch):
    """OpenPose (hands and face) whose fake body always places a left hand and a face box, with
    cheap stand-ins for the hand and face networks (the real ones take 15 s here and find nothing
    with random weights; bit-identity with them was checked by hand)."""
    from controlnet_aux.open_pose import util

    monkeypatch.setattr(util, "handDetect", lambda body, image: [(30, 150, 48, True)])
    monkeypatch.setattr(util, "faceDetect", lambda body, image: (100, 40, 56))
    annotator = registry.create("openpose", {"hands": True, "face": True}, str(weights_dir))
    annotator.setup()
    annotator.detector.hand_estimation, annotator.detector.face_estimation = RingHand(), GridFace()
    return annotator


def test_openpose_hands_and_face_come_from_forward_and_match_controlnet_aux(
    openpose_with_hands_and_face, weights_dir, batch
):
    from controlnet_aux.open_pose import draw_poses

    model = openpose_with_hands_and_face
    images, ids = batch[0][:2], batch[1][:2]  # the two puppets, 256x256 and 256x385
    cpu_side = registry.create("openpose", {"hands": True, "face": True}, str(weights_dir))
    inputs = [through_object_store(cpu_side.preprocess(img, i)) for img, i in zip(images, ids)]
    outputs = [through_object_store(o) for o in model.forward(inputs)]
    maps = [cpu_side.postprocess(o, img, i) for o, img, i in zip(outputs, images, ids)]
    # controlnet-aux's own unsplit path, as the annotator ran before the split
    reference = []
    for img in images:
        poses = model.detector.detect_poses(img, include_hand=True, include_face=True)
        reference.append(draw_poses(poses, *img.shape[:2], draw_body=True, draw_hand=True, draw_face=True))
    assert_same_maps(maps, reference)
    assert_same_maps(model.annotate(images, ids), reference)
    for i in (0, 1):  # a hand and a face drawn beside each skeleton
        body_only = cpu_side.postprocess([p._replace(left_hand=None, face=None) for p in outputs[i]], images[i], ids[i])
        assert body_only.any() and (maps[i].any(axis=2) & ~body_only.any(axis=2)).sum() > 100


def test_openpose_body_only_matches_controlnet_aux(run, batch):
    """The body-only split replays the network's outputs through controlnet-aux's own grouping."""
    from controlnet_aux.open_pose import draw_poses

    images, _ = batch
    case = run("openpose", {})
    reference = [draw_poses(case.model.detector.detect_poses(img), *img.shape[:2], draw_body=True, draw_hand=False,
                            draw_face=False) for img in images]
    assert_same_maps(case.maps, reference)
    assert case.maps[0].any() and case.maps[1].any()  # the puppets are found: the grouping really ran


def test_openpose_replay_refuses_outputs_of_another_image(run, batch):
    images, ids = batch
    case = run("openpose", {})
    with pytest.raises(ValueError, match="replayed on"):
        case.cpu_side.postprocess(case.outputs[1], images[0], ids[0])  # 256x385 outputs on a 256x256 image
