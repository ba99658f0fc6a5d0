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
    require_detection: bool = False
    """Mark images with no face as ``filtered`` (reason ``no face``) instead of an empty map."""


class MediapipeFaceAnnotator(Annotator):
    """Face mesh, irises and outline on black, 3 channels."""

    name = "mediapipe_face"
    Params = MediapipeFaceParams
    packages = ("mediapipe", "controlnet-aux")
    uses_model = True
    params: MediapipeFaceParams

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list:
        from controlnet_aux.mediapipe_face.mediapipe_face_common import generate_annotation

        check_batch(images, ids)
        out = []
        for img in images:
            face = np.ascontiguousarray(generate_annotation(img, self.params.max_faces, self.params.min_confidence))
            out.append(empty_or_skip(face, bool(face.any()), self.params.require_detection, "no face"))
        return out
