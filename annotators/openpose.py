"""OpenPose body (+ optional hands and face) from controlnet-aux, drawn in OpenPose colours on black."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from annotators.base import AnnotatorParams
from annotators.detection import empty_or_skip
from annotators.image import check_batch
from annotators.torch_model import TorchAnnotator
from annotators.weights import locate_file

OPENPOSE_FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")


@dataclasses.dataclass
class OpenposeParams(AnnotatorParams):
    """Which parts to detect and draw."""

    hands: bool = False
    """Detect and draw hands (ControlNet's openpose_hand)."""
    face: bool = False
    """Detect and draw face keypoints (ControlNet's openpose_face)."""
    require_detection: bool = False
    """Mark images with no person as ``filtered`` (reason ``no person``) instead of an empty map."""


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

    def _annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list:
        """Per image: OpenPose's multi-scale search and part grouping do not batch."""
        from controlnet_aux.open_pose import draw_poses

        check_batch(images, ids)
        p = self.params
        out = []
        for img in images:
            height, width = img.shape[:2]
            poses = self.detector.detect_poses(img, include_hand=p.hands, include_face=p.face)
            canvas = draw_poses(poses, height, width, draw_body=True, draw_hand=p.hands, draw_face=p.face)
            out.append(empty_or_skip(canvas, bool(poses), p.require_detection, "no person"))
        return out
