"""BLIP and BLIP-2 captions (the ControlNet paper captioned its training sets with BLIP).

The model folder's ``config.json`` says which: ``model_type`` ``blip`` loads
``BlipForConditionalGeneration``, ``blip-2`` loads ``Blip2ForConditionalGeneration`` (OPT or
Flan-T5 language model).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from captioners.base import CaptionerParams, TransformersCaptioner

MODEL_CLASSES = {"blip": "BlipForConditionalGeneration", "blip-2": "Blip2ForConditionalGeneration"}


@dataclasses.dataclass
class BlipParams(CaptionerParams):
    """BLIP's parameters; ``prompt`` is a caption prefix ("" for unconditional captions)."""

    model: str = "Salesforce/blip-image-captioning-large"
    """BLIP (``Salesforce/blip-image-captioning-large``, ``-base``) or BLIP-2
    (``Salesforce/blip2-opt-2.7b``, ...) folder under the weights folder, a path, or a hub id."""
    prompt: str = ""
    """BLIP: the start of the caption, which the model completes and which stays in the caption
    (e.g. "a photography of"); "" for an unconditional caption. BLIP-2: text before the answer
    (e.g. "Question: what is in the picture? Answer:"), not part of the caption."""
    image_size: int = 384
    """Short side ``preprocess`` shrinks larger images to (BLIP's input is 384x384, BLIP-2's 224)."""


def model_type(folder: str) -> str:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("model_type", "")


class BlipCaptioner(TransformersCaptioner):
    """Captions from BLIP or BLIP-2, batched generate (greedy unless ``num_beams`` > 1)."""

    name = "blip"
    Params = BlipParams
    params: BlipParams

    def check_folder(self, folder: str) -> None:
        found = model_type(folder)
        if found not in MODEL_CLASSES:
            raise ValueError(f"captioner 'blip' loads BLIP or BLIP-2 model folders (model_type blip or blip-2); "
                             f"{folder} holds model_type {found!r}: use the 'vlm' captioner for other "
                             f"image-text-to-text models")

    def load_model(self, folder: str) -> Any:
        import transformers

        self.model_type = model_type(folder)
        cls = getattr(transformers, MODEL_CLASSES[self.model_type])
        return cls.from_pretrained(folder, dtype=self.torch_dtype)

    def encode(self, images: list[np.ndarray]) -> Any:
        text = {"text": [self.params.prompt] * len(images)} if self.params.prompt else {}
        return self.processor(images=images, return_tensors="pt", padding=True, **text)

    def decode(self, output: Any, batch: Any) -> list[str]:
        """BLIP returns its start token, the prefix and the continuation: all of it but the
        special tokens is the caption. BLIP-2 returns the prompt (with its image placeholders)
        then the answer, and only the answer is the caption."""
        if self.model_type == "blip":
            return [t.strip() for t in self.processor.batch_decode(output, skip_special_tokens=True)]
        return super().decode(output, batch)
