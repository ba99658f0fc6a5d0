"""MediaPipe face mesh map (controlnet-aux's annotator for the MediaPipe-face ControlNet), offline."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams
from annotators.detection import empty_or_skip
from annotators.image import check_batch


@dataclasses.dataclass
class MediapipeFaceParams(AnnotatorParams):
    """Face mesh settings."""

    max_faces: int = 1
    min_confidence: float = 0.5
    min_face_size: int = 64
    """Faces smaller than this many pixels (shorter side of their landmark box) are not drawn."""
    require_detection: bool = False
    """Mark images with no face as ``filtered`` (reason ``no face``) instead of an empty map."""


class MediapipeFaceAnnotator(Annotator):
    """Face mesh, irises and outline on black, 3 channels."""

    name = "mediapipe_face"
    Params = MediapipeFaceParams
    packages = ("mediapipe", "controlnet-aux")
    uses_model = True
    params: MediapipeFaceParams

    def setup(self) -> None:
        import mediapipe as mp

        # One face mesh per worker: controlnet-aux's generate_annotation builds a new graph per image.
        self.mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=self.params.max_faces, refine_landmarks=True,
            min_detection_confidence=self.params.min_confidence,
        )

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list:
        check_batch(images, ids)
        out = []
        for img in images:
            face = self.draw(img)
            out.append(empty_or_skip(face, bool(face.any()), self.params.require_detection, "no face"))
        return out

    def draw(self, img: np.ndarray) -> np.ndarray:
        """The face mesh map with controlnet-aux's colours (those the MediaPipe-face ControlNet saw)."""
        from controlnet_aux.mediapipe_face import mediapipe_face_common as style

        height, width = img.shape[:2]
        canvas = np.zeros_like(img)
        for landmarks in self.mesh.process(img).multi_face_landmarks or []:
            xs = [p.x for p in landmarks.landmark]
            ys = [p.y for p in landmarks.landmark]
            if min((max(xs) - min(xs)) * width, (max(ys) - min(ys)) * height) < self.params.min_face_size:
                continue
            style.mp_drawing.draw_landmarks(
                canvas, landmarks, connections=style.face_connection_spec.keys(), landmark_drawing_spec=None,
                connection_drawing_spec=style.face_connection_spec,
            )
            style.draw_pupils(canvas, landmarks, style.iris_landmark_spec, 2)
        return np.ascontiguousarray(style.reverse_channels(canvas))  # drawn in BGR, like controlnet-aux
