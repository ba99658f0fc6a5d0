"""Depth maps as ControlNet's depth models expect them: 8-bit, near = bright.

``model=dpt_hybrid`` (default) loads MiDaS DPT-hybrid through controlnet-aux
(``dpt_hybrid-midas-501f0c75.pt``); any other value is a transformers depth-estimation model
folder (DPT, Depth Anything) under the weights folder, a path, or a hub id.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from annotators.base import AnnotatorParams
from annotators.torch_model import TorchAnnotator, cpu_tensor, to_tensor
from annotators.weights import locate_file, locate_model_dir, weight_files

MIDAS_FILES = {"dpt_hybrid": "dpt_hybrid-midas-501f0c75.pt", "dpt_large": "dpt_large-midas-2f21e586.pt"}


@dataclasses.dataclass
class DepthParams(AnnotatorParams):
    """Which depth model, and the resolution it sees."""

    model: str = "dpt_hybrid"
    """``dpt_hybrid``/``dpt_large`` (MiDaS via controlnet-aux) or a transformers model folder/hub id."""
    detect_resolution: int = 384
    """Short side the MiDaS model sees (sides rounded to multiples of 32); maps are resized back."""

    def __post_init__(self) -> None:
        if self.detect_resolution < 32 or self.detect_resolution % 32:
            raise ValueError("depth.detect_resolution must be a multiple of 32")


def normalise(depth: np.ndarray) -> np.ndarray:
    """Relative inverse depth (larger = nearer) -> uint8 with the nearest point at 255."""
    lo, hi = float(depth.min()), float(depth.max())
    scaled = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    return (scaled * 255.0).clip(0, 255).astype(np.uint8)


class DepthAnnotator(TorchAnnotator):
    """Depth map, 1 channel; batched over same-size images.

    Split: ``forward`` is the model (with MiDaS's scaling to its resolution, on the device);
    ``postprocess`` resizes the depth back to the image and normalises it to uint8.
    """

    name = "depth"
    Params = DepthParams
    packages = ("torch", "controlnet-aux", "transformers", "timm")
    params: DepthParams

    @property
    def uses_midas(self) -> bool:
        return self.params.model in MIDAS_FILES

    def _model_folder(self) -> str:
        return locate_model_dir(self.weights_dir, self.params.model, self.name)

    def weight_paths(self) -> dict[str, str]:
        if self.uses_midas:
            filename = MIDAS_FILES[self.params.model]
            return {filename: locate_file(self.weights_dir, filename, self.name)}
        folder = self._model_folder()
        return {os.path.relpath(f, folder): f for f in weight_files(folder)}

    def load(self) -> None:
        if self.uses_midas:
            from controlnet_aux import MidasDetector

            path = self.weight_paths()[MIDAS_FILES[self.params.model]]
            detector = MidasDetector.from_pretrained(
                os.path.dirname(path), model_type=self.params.model, filename=os.path.basename(path)
            )
            self.model = detector.model.to(self.device).eval()
        else:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            folder = self._model_folder()
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.model = AutoModelForDepthEstimation.from_pretrained(folder).to(self.device).eval()

    def forward_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Relative inverse depth at the model's resolution, float32 h x w per image.

        float32, not float16: the per-image min-max normalisation in ``postprocess`` must see
        the values the model gave for the maps to stay bit-identical; at the model's resolution
        (384 px short side by default) that is about 0.75x a 512 px uint8 image's bytes.
        """
        import torch.nn.functional as F

        height, width = batch.shape[1:3]
        if self.uses_midas:
            x = to_tensor(batch, self.device, lambda t: t / 127.5 - 1.0)
            x = F.interpolate(x, size=self._detect_size(height, width), mode="bilinear", antialias=True)
            depth = self.model(x)  # N x h x w, relative inverse depth
        else:
            # The image processor (resize, normalise: CPU) stays here: its float32 pixels are
            # several times the uint8 image's bytes, and only it knows each model's recipe.
            inputs = self.processor(images=list(batch), return_tensors="pt").to(self.device)
            depth = self.model(**inputs).predicted_depth
        return list(depth.float().cpu().numpy())

    def postprocess(self, output: np.ndarray, image: np.ndarray, image_id: str) -> np.ndarray:
        """The depth resized back to the image (bilinear, as torch does it) and normalised to uint8."""
        import torch.nn.functional as F

        height, width = image.shape[:2]
        depth = cpu_tensor(np.ascontiguousarray(output))[None, None]
        depth = F.interpolate(depth, size=(height, width), mode="bilinear", align_corners=False)
        return normalise(depth[0, 0].numpy())

    def _detect_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.params.detect_resolution / min(height, width)
        return max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32)
