"""Canny edges (OpenCV), the condition of the original canny ControlNet."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams, image_seed
from annotators.image import check_batch


@dataclasses.dataclass
class CannyParams(AnnotatorParams):
    """Thresholds of ``cv2.Canny`` on the prepared RGB image."""

    low: int = 100
    """Lower hysteresis threshold (ControlNet's default is 100)."""
    high: int = 200
    """Upper hysteresis threshold (ControlNet's default is 200)."""
    random_thresholds: bool = False
    """Draw thresholds per image instead, as some ControlNet trainings do for robustness:
    ``low`` uniform in [low_min, low_max], ``high`` uniform in [max(low + 1, high_min), high_max]."""
    low_min: int = 50
    low_max: int = 150
    high_min: int = 150
    high_max: int = 250
    seed: int = 0
    """Seed of the per-image draws; with the row id it fixes each image's thresholds."""

    def __post_init__(self) -> None:
        for key in ("low", "high", "low_min", "low_max", "high_min", "high_max"):
            value = getattr(self, key)
            if not 0 <= value <= 255 * 4:  # Sobel magnitudes on uint8 reach about 4 * 255
                raise ValueError(f"canny.{key}={value} is outside 0..1020")
        if self.low > self.high:
            raise ValueError(f"canny.low={self.low} must not exceed canny.high={self.high}")
        if self.low_min > self.low_max or self.high_min > self.high_max:
            raise ValueError("canny: low_min <= low_max and high_min <= high_max are required")


class CannyAnnotator(Annotator):
    """Binary edge map (0 or 255), one channel, from ``cv2.Canny`` on the RGB image."""

    name = "canny"
    Params = CannyParams

    params: CannyParams

    def versions(self) -> dict[str, str | None]:
        import cv2  # several wheels provide cv2; the module's own version is the one that ran

        return {"opencv": cv2.__version__}

    def thresholds(self, image_id: str) -> tuple[int, int]:
        """The (low, high) thresholds used for the image with this row id."""
        p = self.params
        if not p.random_thresholds:
            return p.low, p.high
        rng = np.random.default_rng(image_seed(p.seed, image_id))
        low = int(rng.integers(p.low_min, p.low_max + 1))
        high = int(rng.integers(max(low + 1, p.high_min), max(low + 1, p.high_max) + 1))
        return low, high

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        import cv2

        check_batch(images, ids)
        return [cv2.Canny(img, *self.thresholds(i)) for img, i in zip(images, ids)]
