"""Semantic segmentation coloured with the ADE20K palette ControlNet's seg models were trained on.

The model is a transformers folder (UperNet, SegFormer, Mask2Former, OneFormer) under the weights
folder, a path, or a hub id; its labels must be ADE20K's 150 classes for the colours to mean what
the seg ControlNets expect.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from annotators.base import AnnotatorParams
from annotators.torch_model import TorchAnnotator
from annotators.weights import locate_model_dir, weight_files


@dataclasses.dataclass
class SegmentationParams(AnnotatorParams):
    """Which segmentation model."""

    model: str = "upernet-convnext-small"
    """Model folder name under the weights folder, a path, or a hub id (e.g.
    ``openmmlab/upernet-convnext-small``)."""


def colourise(labels: np.ndarray) -> np.ndarray:
    """HxW class ids -> HxWx3 ADE20K colours."""
    from controlnet_aux.util import ade_palette

    palette = np.asarray(ade_palette(), dtype=np.uint8)
    return palette[labels % len(palette)]


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Class ids in the smallest dtype that holds them exactly (uint8 for ADE20K's 150)."""
    fits = labels.size == 0 or (labels.min() >= 0 and labels.max() < 256)
    return labels.astype(np.uint8 if fits else np.int32)


class SegmentationAnnotator(TorchAnnotator):
    """ADE20K-coloured segmentation map, 3 channels; batched over same-size images.

    Split: ``forward`` is the image processor, the model and the logits' upsampling and argmax
    (class ids out); ``postprocess`` paints them in the ADE20K palette.
    """

    name = "segmentation"
    Params = SegmentationParams
    packages = ("torch", "transformers", "controlnet-aux")
    params: SegmentationParams

    def _folder(self) -> str:
        return locate_model_dir(self.weights_dir, self.params.model, self.name)

    def weight_paths(self) -> dict[str, str]:
        folder = self._folder()
        return {os.path.relpath(f, folder): f for f in weight_files(folder)}

    def load(self) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

        folder = self._folder()
        self.processor = AutoImageProcessor.from_pretrained(folder)
        config = AutoConfig.from_pretrained(folder)
        self.model_type = config.model_type
        try:
            model = AutoModelForSemanticSegmentation.from_pretrained(folder)
        except ValueError:  # Mask2Former / OneFormer are "universal" segmentation models
            from transformers import AutoModelForUniversalSegmentation

            model = AutoModelForUniversalSegmentation.from_pretrained(folder)
        self.model = model.to(self.device).eval()

    def forward_batch(self, batch: np.ndarray) -> list[np.ndarray]:
        """Class ids at the image's size, uint8 HxW (int32 for models with over 256 labels).

        The upsampling of the logits and the argmax stay here: they run on all the classes'
        full-size logits, work for the device, and what leaves is one small integer per pixel.
        """
        height, width = batch.shape[1:3]
        # The image processor stays here (CPU work in the actor): its float32 pixels are several
        # times the uint8 image's bytes, too many to ship from a preprocess task.
        extra = {"task_inputs": ["semantic"] * len(batch)} if self.model_type == "oneformer" else {}
        inputs = self.processor(images=list(batch), return_tensors="pt", **extra).to(self.device)
        outputs = self.model(**inputs)
        labels = self.processor.post_process_semantic_segmentation(outputs, target_sizes=[(height, width)] * len(batch))
        return [compact_labels(lab.cpu().numpy()) for lab in labels]

    def postprocess(self, output: np.ndarray, image: np.ndarray, image_id: str) -> np.ndarray:
        """The class ids painted in the ADE20K palette (the CPU part)."""
        return colourise(output.astype(np.int64))
