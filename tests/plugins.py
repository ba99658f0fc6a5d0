"""Annotators the tests register as plugins (entry points) or inject into the job."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from annotators.base import Annotator, AnnotatorParams, SplitAnnotator


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


@dataclasses.dataclass
class ActorProbeParams(AnnotatorParams):
    flag: str = ""
    """While this file exists, a magenta image kills the actor's process."""
    log_dir: str = ""
    """Each image's id is written here as a file holding the process id that annotated it."""
    slow_s: float = 0.0
    """Seconds a cyan image takes (a heavy shard)."""


class ActorProbe(Annotator):
    """A "model" annotator (so it runs in the actor pool) that records which actor did what."""

    name = "actor_probe"
    Params = ActorProbeParams
    uses_model = True

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        import time

        for img, image_id in zip(images, ids):
            if self.params.flag and os.path.exists(self.params.flag) and (img == (255, 0, 255)).all():
                os._exit(1)
            if (img == (0, 255, 255)).all():
                time.sleep(self.params.slow_s)
            if self.params.log_dir:
                with open(os.path.join(self.params.log_dir, image_id), "w") as f:
                    f.write(str(os.getpid()))
        return [np.zeros(img.shape[:2], np.uint8) for img in images]


@dataclasses.dataclass
class StageProbeParams(AnnotatorParams):
    log_dir: str = ""
    """Each stage writes ``<id>.<stage>`` here, holding the process id that ran it."""
    fail_forward_on: str = ""
    """While this file exists, ``forward`` raises (a model error on the whole batch)."""


class StageProbe(SplitAnnotator):
    """A split "model" annotator: 255 minus the first channel, computed across the three stages,
    each recording the process that ran it."""

    name = "stage_probe"
    Params = StageProbeParams
    uses_model = True

    def _log(self, image_id: str, stage: str) -> None:
        if self.params.log_dir:
            with open(os.path.join(self.params.log_dir, f"{image_id}.{stage}"), "w") as f:
                f.write(str(os.getpid()))

    def preprocess(self, image: np.ndarray, image_id: str) -> tuple[str, np.ndarray]:
        self._log(image_id, "preprocess")
        return image_id, np.ascontiguousarray(image[:, :, 0])

    def forward(self, inputs: list) -> list:
        if self.params.fail_forward_on and os.path.exists(self.params.fail_forward_on):
            raise RuntimeError("model failed on the batch")
        for image_id, _ in inputs:
            self._log(image_id, "forward")
        return [255 - channel for _, channel in inputs]

    def postprocess(self, output: np.ndarray, image: np.ndarray, image_id: str) -> np.ndarray:
        self._log(image_id, "postprocess")
        return output


from captioners.base import Captioner, CaptionerParams  # noqa: E402


@dataclasses.dataclass
class ColourCaptionerParams(CaptionerParams):
    model: str = "no-weights"


class ColourCaptioner(Captioner):
    """Captions an image by its mean colour; raises on a pure magenta image (a per-image failure)."""

    name = "colour"
    Params = ColourCaptionerParams
    packages = ()

    def setup(self) -> None:
        self.ready = True

    def preprocess(self, image: np.ndarray, image_id: str) -> np.ndarray:
        return image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)

    def forward(self, inputs: list) -> list[str]:
        assert self.ready, "forward needs setup()"
        if any((m == (255, 0, 255)).all() for m in inputs):
            raise RuntimeError("cannot caption magenta")
        return [f"a picture of colour {m[0]} {m[1]} {m[2]}" for m in inputs]


class OffProtocolCaptioner(ColourCaptioner):
    """Breaks the protocol on some images: None for a red one, a number for a blue one, bytes for a
    green one; a plain caption otherwise."""

    name = "off_protocol"

    def forward(self, inputs: list) -> list:
        odd = {(200, 30, 30): None, (30, 30, 200): 42, (30, 200, 30): b"bytes"}
        return [odd.get(tuple(int(v) for v in m), "a fine caption") for m in inputs]


@dataclasses.dataclass
class SetupFailsParams(AnnotatorParams):
    flag: str = ""
    """While this file exists, ``setup`` raises (a worker that cannot load its model)."""


class SetupFails(Annotator):
    """Cannot set up while ``flag`` exists: every shard's task fails with a real exception."""

    name = "setup_fails"
    Params = SetupFailsParams

    def setup(self) -> None:
        if self.params.flag and os.path.exists(self.params.flag):
            raise RuntimeError("cannot load the model: \x1b[31mcuda out of memory\x1b[0m")

    def annotate(self, images: Sequence[np.ndarray], ids: Sequence[str]) -> list[np.ndarray]:
        return [np.zeros(img.shape[:2], np.uint8) for img in images]
