"""Person mask from MediaPipe selfie segmentation (offline), white person on black."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams
from annotators.detection import empty_or_skip
from annotators.image import check_batch


@dataclasses.dataclass
class PersonMaskParams(AnnotatorParams):
    """Selfie segmentation settings."""

    threshold: float = 0.5
    """Pixels with person probability above this are white."""
    model_selection: int = 0
    """0: general model (256x256); 1: landscape model (144x256), faster."""
    require_detection: bool = False
    """Mark images with no person pixels as ``filtered`` (reason ``no person``)."""

    def __post_init__(self) -> None:
        if self.model_selection not in (0, 1):
            raise ValueError("person_mask.model_selection must be 0 or 1")


class PersonMaskAnnotator(Annotator):
    """Binary person mask, 1 channel (0 or 255)."""

    name = "person_mask"
    Params = PersonMaskParams
    packages = ("mediapipe",)
    uses_model = True
    params: PersonMaskParams

    def setup(self) -> None:
        import mediapipe as mp

        self.segmenter = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=self.params.model_selection)

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list:
        check_batch(images, ids)
        out = []
        for img in images:
            prob = self.segmenter.process(img).segmentation_mask
            mask = np.where(prob > self.params.threshold, 255, 0).astype(np.uint8)
            out.append(empty_or_skip(mask, bool(mask.any()), self.params.require_detection, "no person"))
        return out
