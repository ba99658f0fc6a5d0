"""A sleep annotator for ``bench/gpu_pipeline_sim.py``: a model annotator's costs, as sleeps.

``SimAnnotator`` is a ``SplitAnnotator`` with ``uses_model = True``, so the pipeline puts its
``forward`` in the model-actor pool and its ``preprocess`` / ``postprocess`` in CPU tasks, exactly
as for HED or OpenPose. Each part sleeps for the cost it stands in for; an image of the colour
``HEAVY_RGB`` costs ``heavy_factor`` times as much (a heavy shard). With ``log_dir`` set, every
call appends ``kind start end n ids`` (wall-clock seconds; for ``setup``: the process's start and
the end of ``setup()``) to a file per process, from which the benchmark computes GPU busy time and
where the GPU waited.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from annotators.base import AnnotatorParams, SplitAnnotator

#: Images of this colour are ``heavy_factor`` times as costly in every part.
HEAVY_RGB = (0, 255, 255)


@dataclasses.dataclass
class SimParams(AnnotatorParams):
    prepare_ms: float = 5.9
    """Per image, in ``preprocess``: decode+resize (4.5 ms) and JPEG encode (1.4 ms) of stage 1."""
    forward_ms: float = 4.0
    """Per image, in ``forward`` (the GPU's work)."""
    post_ms: float = 7.3
    """Per image, in ``postprocess``: post-processing + PNG encode (6 ms) and the Parquet write (1.3 ms)."""
    heavy_factor: float = 3.0
    """Cost multiplier of a ``HEAVY_RGB`` image."""
    log_dir: str = ""
    """Folder for the per-process call logs ("" logs nothing)."""


class SimAnnotator(SplitAnnotator):
    """Sleeps for each part's cost; returns an all-zero map."""

    name = "sim"
    Params = SimParams
    uses_model = True

    def setup(self) -> None:
        """Where the model would load: logs (process start, now), i.e. how long the worker took to come up."""
        import psutil

        self._log("setup", psutil.Process().create_time(), [])

    def factor(self, image: np.ndarray) -> float:
        return self.params.heavy_factor if (image == HEAVY_RGB).all() else 1.0

    def preprocess(self, image: np.ndarray, image_id: str) -> Any:
        start = time.time()
        factor = self.factor(image)
        time.sleep(self.params.prepare_ms * factor / 1000)
        self._log("prepare", start, [image_id])
        return factor, image_id

    def forward(self, inputs: list[Any]) -> list[Any]:
        start = time.time()
        time.sleep(self.params.forward_ms * sum(factor for factor, _ in inputs) / 1000)
        self._log("forward", start, [image_id for _, image_id in inputs])
        return list(inputs)

    def postprocess(self, output: Any, image: np.ndarray, image_id: str) -> np.ndarray:
        start = time.time()
        factor, _ = output
        time.sleep(self.params.post_ms * factor / 1000)
        self._log("post", start, [image_id])
        return np.zeros(image.shape[:2], np.uint8)

    def _log(self, kind: str, start: float, ids: list[str]) -> None:
        if not self.params.log_dir:
            return
        line = f"{kind} {start:.6f} {time.time():.6f} {len(ids)} {','.join(ids)}\n"
        with open(os.path.join(self.params.log_dir, f"{kind}-{os.getpid()}.log"), "a") as f:
            f.write(line)
