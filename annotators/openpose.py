"""OpenPose body (+ optional hands and face) from controlnet-aux, drawn in OpenPose colours on black.

Split at the network boundary. Body only (the default): ``preprocess`` resizes and pads the image
as controlnet-aux's ``Body`` does (uint8), ``forward`` runs the body network on same-shape batches
and returns its raw outputs, and ``postprocess`` replays those through controlnet-aux's own
``Body`` and ``OpenposeDetector`` code (heatmap resizing, peak finding, part grouping: the
expensive CPU part, hundreds of ms per image) and draws. Replaying, rather than copying that code, keeps
the maps bit-identical to controlnet-aux's.

With hands or face, their networks run on crops placed by the grouped body, so the body's CPU part
must finish before them and ``forward`` does everything up to the keypoints; ``postprocess`` then
only draws. (Splitting further would need two trips to the model per image.)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, NamedTuple

import numpy as np

from annotators.base import AnnotationSkipped, AnnotatorParams
from annotators.detection import empty_or_skip
from annotators.torch_model import TorchAnnotator, cpu_tensor
from annotators.weights import locate_file

OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")

# How controlnet-aux's Body prepares the image (its only scale, 0.5 of a 368 px box, is 184 px
# tall); a mismatch is caught when the outputs are replayed (``_ReplayedNetwork``).
BODY_HEIGHT, BODY_STRIDE, BODY_PAD_VALUE = 0.5 * 368, 8, 128


@dataclasses.dataclass
class OpenposeParams(AnnotatorParams):
    """Which parts to detect and draw."""

    hands: bool = False
    """Detect and draw hands (ControlNet's openpose_hand)."""
    face: bool = False
    """Detect and draw face keypoints (ControlNet's openpose_face)."""
    require_detection: bool = False
    """Mark images with no person as ``filtered`` (reason ``no person``) instead of an empty map."""


class BodyMaps(NamedTuple):
    """The body network's raw outputs for one image, float32 at 1/8 of its padded input."""

    pafs: np.ndarray
    """38 x h x w part affinity fields (``Mconv7_stage6_L1``)."""
    heatmaps: np.ndarray
    """19 x h x w keypoint heatmaps (``Mconv7_stage6_L2``)."""


def body_input(image: np.ndarray) -> np.ndarray:
    """The uint8 BGR image the body network sees, as controlnet-aux's ``Body`` makes it: 184 px
    tall, padded right and down to a multiple of 8."""
    from controlnet_aux.open_pose import util

    bgr = image[:, :, ::-1].copy()  # detect_poses hands Body a BGR copy
    scale = BODY_HEIGHT / bgr.shape[0]
    padded, _ = util.padRightDownCorner(util.smart_resize_k(bgr, fx=scale, fy=scale), BODY_STRIDE, BODY_PAD_VALUE)
    return padded


class _ReplayedNetwork:
    """Stands in for the body network inside controlnet-aux's ``Body``: returns given outputs."""

    def __init__(self, maps: BodyMaps) -> None:
        self.maps = maps

    def parameters(self) -> Iterator[Any]:
        import torch

        yield torch.empty(0)  # Body asks its network's first parameter for the device: the CPU

    def __call__(self, data: Any) -> tuple[Any, Any]:
        expected = tuple(BODY_STRIDE * n for n in self.maps.pafs.shape[1:])
        if tuple(data.shape[2:]) != expected:  # outputs of another image, or Body prepares images differently
            raise ValueError(f"body network outputs for a {expected} input replayed on a {tuple(data.shape[2:])} one")
        return cpu_tensor(self.maps.pafs)[None], cpu_tensor(self.maps.heatmaps)[None]


def replayed_detector(maps: BodyMaps, hand: Any = None, face: Any = None) -> Any:
    """controlnet-aux's ``OpenposeDetector`` whose body network answers with ``maps``: its own
    post-processing then runs unchanged, with no body weights. ``hand``/``face`` are the loaded
    estimators, needed only to detect hands or faces."""
    from controlnet_aux.open_pose import Body, OpenposeDetector

    body = Body.__new__(Body)  # not __init__: that loads the weights; only the network is replaced
    body.model = _ReplayedNetwork(maps)
    return OpenposeDetector(body, hand, face)


class OpenposeAnnotator(TorchAnnotator):
    """Pose skeleton map, 3 channels; loads ``body_pose_model.pth``, ``hand_pose_model.pth``, ``facenet.pth``."""

    name = "openpose"
    Params = OpenposeParams
    params: OpenposeParams

    def weight_paths(self) -> dict[str, str]:
        return {f: locate_file(self.weights_dir, f, self.name) for f in OPENPOSE_FILES}

    def load(self) -> None:
        from controlnet_aux import OpenposeDetector

        folder = os.path.dirname(self.weight_paths()[OPENPOSE_FILES[0]])
        self.detector = OpenposeDetector.from_pretrained(folder).to(self.device)

    @property
    def crops_from_body(self) -> bool:
        """Hands or face asked for: their networks need the grouped body, so it runs in ``forward``."""
        return self.params.hands or self.params.face

    def preprocess(self, image: np.ndarray, image_id: str) -> np.ndarray:
        """The body network's input (uint8, 184 px tall); with hands or face, the image itself,
        which ``forward`` crops them from."""
        return image if self.crops_from_body else body_input(image)

    def forward(self, inputs: list[np.ndarray]) -> list[BodyMaps] | list[list]:
        """Body only: the body network's ``BodyMaps``. With hands or face: each image's poses
        (controlnet-aux ``PoseResult``s, normalised keypoints), found with every network here."""
        if not self.crops_from_body:
            return super().forward(inputs)
        import torch

        with torch.no_grad():
            maps = self.batched([body_input(img) for img in inputs], self.forward_batch)
            return [self._poses(img, m) for img, m in zip(inputs, maps)]

    def forward_batch(self, batch: np.ndarray) -> list[BodyMaps]:
        """The body network on same-shape ``body_input`` images, scaled as ``Body`` scales them."""
        import torch

        x = np.ascontiguousarray(np.transpose(np.float32(batch), (0, 3, 1, 2)) / 256 - 0.5)
        pafs, heatmaps = self.detector.body_estimation.model(torch.from_numpy(x).to(self.device))
        return [BodyMaps(p, h) for p, h in zip(pafs.cpu().numpy(), heatmaps.cpu().numpy())]

    def _poses(self, image: np.ndarray, maps: BodyMaps) -> list:
        """controlnet-aux's poses for one image, its body network's outputs given."""
        detector = replayed_detector(maps, self.detector.hand_estimation, self.detector.face_estimation)
        return detector.detect_poses(image, include_hand=self.params.hands, include_face=self.params.face)

    def postprocess(self, output: BodyMaps | list, image: np.ndarray, image_id: str) -> np.ndarray | AnnotationSkipped:
        """The skeleton drawn on black; body only, the peak finding and part grouping first.

        (Replaying makes ``Body`` resize and pad the image again, which checks the shapes: a few
        milliseconds, against hundreds for the grouping.)
        """
        from controlnet_aux.open_pose import draw_poses

        p = self.params
        poses = output if self.crops_from_body else replayed_detector(output).detect_poses(image)
        height, width = image.shape[:2]
        canvas = draw_poses(poses, height, width, draw_body=True, draw_hand=p.hands, draw_face=p.face)
        return empty_or_skip(canvas, bool(poses), p.require_detection, "no person")
