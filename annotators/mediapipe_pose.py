"""MediaPipe pose landmarks drawn as an 18-keypoint OpenPose skeleton (offline: models ship in the wheel)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams
from annotators.detection import empty_or_skip
from annotators.image import check_batch

# OpenPose (COCO-18) keypoint -> MediaPipe landmark; the neck (1) is the shoulders' midpoint.
OPENPOSE_FROM_MEDIAPIPE = {
    0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28,
    11: 23, 12: 25, 13: 27, 14: 5, 15: 2, 16: 8, 17: 7,
}
NECK, MP_LEFT_SHOULDER, MP_RIGHT_SHOULDER = 1, 11, 12


@dataclasses.dataclass
class MediapipePoseParams(AnnotatorParams):
    """MediaPipe Pose settings (model_complexity 1: the model the 0.10.14 wheel ships)."""

    min_detection_confidence: float = 0.5
    min_visibility: float = 0.5
    """Landmarks MediaPipe thinks are less visible than this are left out of the skeleton."""
    require_detection: bool = False
    """Mark images with no person as ``filtered`` (reason ``no person``) instead of an empty map."""

    def __post_init__(self) -> None:
        for key in ("min_detection_confidence", "min_visibility"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"mediapipe_pose.{key} must be within 0..1")


def openpose_keypoints(landmarks: Sequence, min_visibility: float) -> list:
    """18 OpenPose keypoints (normalised x, y, or None) from 33 MediaPipe landmarks."""
    from controlnet_aux.open_pose.util import Keypoint

    def point(i: int):
        lm = landmarks[i]
        return Keypoint(lm.x, lm.y) if lm.visibility >= min_visibility else None

    keypoints: list = [None] * 18
    for op_index, mp_index in OPENPOSE_FROM_MEDIAPIPE.items():
        keypoints[op_index] = point(mp_index)
    left, right = point(MP_LEFT_SHOULDER), point(MP_RIGHT_SHOULDER)
    if left is not None and right is not None:
        keypoints[NECK] = Keypoint((left.x + right.x) / 2, (left.y + right.y) / 2)
    return keypoints


class MediapipePoseAnnotator(Annotator):
    """Pose skeleton in OpenPose colours on black, 3 channels: feeds OpenPose ControlNets."""

    name = "mediapipe_pose"
    Params = MediapipePoseParams
    packages = ("mediapipe", "controlnet-aux")
    uses_model = True
    params: MediapipePoseParams

    def setup(self) -> None:
        import mediapipe as mp

        self.pose = mp.solutions.pose.Pose(
            static_image_mode=True, model_complexity=1,
            min_detection_confidence=self.params.min_detection_confidence,
        )

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list:
        from controlnet_aux.open_pose import BodyResult, PoseResult, draw_poses

        check_batch(images, ids)
        out = []
        for img in images:
            height, width = img.shape[:2]
            result = self.pose.process(img)
            poses = []
            if result.pose_landmarks is not None:
                keypoints = openpose_keypoints(result.pose_landmarks.landmark, self.params.min_visibility)
                body = BodyResult(keypoints=keypoints, total_score=1.0, total_parts=sum(k is not None for k in keypoints))
                poses.append(PoseResult(body, None, None, None))
            canvas = draw_poses(poses, height, width, draw_body=True, draw_hand=False, draw_face=False)
            out.append(empty_or_skip(canvas, bool(poses), self.params.require_detection, "no person"))
        return out
