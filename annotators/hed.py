"""HED soft edges (controlnet-aux's Apache-2 HED, ``ControlNetHED.pth``), optional scribble."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from annotators.base import AnnotatorParams
from annotators.torch_model import TorchAnnotator, to_tensor
from annotators.weights import locate_file

HED_FILE = "ControlNetHED.pth"


@dataclasses.dataclass
class HedParams(AnnotatorParams):
    """Post-processing of the HED edge probability."""

    scribble: bool = False
    """Thin (non-maximum suppression), blur and threshold the edges into scribbles, as ControlNet's
    scribble models were trained on."""
    safe: bool = False
    """Quantise the soft edges into a few levels (controlnet-aux's ``safe``), hiding fine texture."""


class HedAnnotator(TorchAnnotator):
    """Soft edge map, one channel; batched over same-size images.

    Split: ``forward`` is the network and its sigmoid (and ``safe``), uint8 out; ``postprocess``
    makes the scribbles when asked for (plain soft edges come out of ``forward`` final).
    """

    name = "hed"
    Params = HedParams
    params: HedParams

    def weight_paths(self) -> dict[str, str]:
        return {HED_FILE: locate_file(self.weights_dir, HED_FILE, self.name)}

    def load(self) -> None:
        from controlnet_aux import HEDdetector

        path = self.weight_paths()[HED_FILE]
        detector = HEDdetector.from_pretrained(os.path.dirname(path), filename=os.path.basename(path))
        import torch

        self.net = detector.netNetwork.to(self.device, memory_format=torch.channels_last).eval()

    def forward_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Edge probability as uint8 HxW maps (a third of the image's bytes).

        ``safe`` quantises the float probability into levels before the uint8 cast, so it runs
        here: from the uint8 map the level boundaries (1/3, 2/3 of the float) are not exact,
        and shipping float32 instead would cost 4x the bytes for one elementwise step.
        """
        import torch
        import torch.nn.functional as F

        height, width = batch.shape[1:3]
        projections = self.net(to_tensor(batch, self.device, channels_last=True))  # the net subtracts its own mean
        stacked = torch.cat(
            [F.interpolate(p, size=(height, width), mode="bilinear", align_corners=False) for p in projections], dim=1
        )
        edge = torch.sigmoid(stacked.mean(dim=1)).cpu().numpy()
        if self.params.safe:
            from controlnet_aux.util import safe_step

            edge = safe_step(edge)
        return list((edge * 255.0).clip(0, 255).astype(np.uint8))

    def postprocess(self, output: np.ndarray, image: np.ndarray, image_id: str) -> np.ndarray:
        """The soft edges, or with ``scribble`` their thinned, blurred, thresholded strokes (the CPU part)."""
        return self._scribble(output) if self.params.scribble else output

    @staticmethod
    def _scribble(edge: np.ndarray) -> np.ndarray:
        import cv2
        from controlnet_aux.util import nms

        thin = nms(edge, 127, 3.0)
        thin = cv2.GaussianBlur(thin, (0, 0), 3.0)
        return np.where(thin > 4, 255, 0).astype(np.uint8)
