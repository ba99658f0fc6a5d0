"""Annotators the tests register as plugins (entry points) or inject into the job."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams


class InvertAnnotator(Annotator):
    """255 minus the image's first channel: a trivial, checkable map."""

    name = "invert"

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        return [255 - img[:, :, 0] for img in images]


class FailsOnSomeAnnotator(Annotator):
    """Raises on images whose width is not a multiple of 16, to test failure isolation."""

    name = "flaky"

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        for img in images:
            if img.shape[1] % 16:
                raise RuntimeError(f"cannot handle width {img.shape[1]}")
        return [np.zeros(img.shape[:2], np.uint8) for img in images]


@dataclasses.dataclass
class CrashParams(AnnotatorParams):
    flag: str = ""
    """While this file exists, a magenta image kills the worker process (as a segfault would)."""


class CrashesWorkerOnMagenta(Annotator):
    """Kills its process on a pure magenta image while ``flag`` exists: a shard that fails every retry."""

    name = "crashy"
    Params = CrashParams

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        for img in images:
            if self.params.flag and os.path.exists(self.params.flag) and (img == (255, 0, 255)).all():
                os._exit(1)
        return [np.zeros(img.shape[:2], np.uint8) for img in images]
