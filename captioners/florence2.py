"""Florence-2 captions through transformers' native ``Florence2ForConditionalGeneration``.

transformers 5 has Florence-2 built in (``model_type`` ``florence2``, DaViT vision tower + BART),
so no ``trust_remote_code``: the folder must be a native one, such as the
``florence-community/Florence-2-large`` (-base, -large-ft, -base-ft) conversions. Microsoft's
original ``microsoft/Florence-2-*`` repositories hold a remote-code layout (``auto_map``, a
``davit`` vision config) that the native class cannot load, and this project never runs code from a
model folder; ``check_folder`` says so before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from captioners.base import CaptionerParams, TransformersCaptioner

# Florence-2 task tokens whose answer is plain text about the whole image: the ones that caption.
CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>", "<OCR>")


@dataclasses.dataclass
class Florence2Params(CaptionerParams):
    """Florence-2's parameters; ``prompt`` is a task token."""

    model: str = "florence-community/Florence-2-large"
    """A native Florence-2 folder under the weights folder, a path, or a hub id."""
    prompt: str = "<MORE_DETAILED_CAPTION>"
    """Task token: <CAPTION> (a short sentence), <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION> (a
    paragraph) or <OCR>; or free text. Tasks that answer with boxes or polygons (<OD>, ...) are
    refused: their output is not a caption."""
    image_size: int = 768
    """Short side ``preprocess`` shrinks larger images to (Florence-2's input is 768x768)."""
    max_new_tokens: int = 128
    """Most tokens per caption (a <MORE_DETAILED_CAPTION> paragraph runs to 60-100)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        task = self.prompt.strip()
        if task.startswith("<") and task.split(">")[0] + ">" not in CAPTION_TASKS:
            raise ValueError(f"florence2.prompt {self.prompt!r} is not a captioning task; use one of "
                             f"{', '.join(CAPTION_TASKS)} or plain text")


class Florence2Captioner(TransformersCaptioner):
    """Captions from Florence-2 (an encoder-decoder: the caption is all the decoder generates)."""

    name = "florence2"
    Params = Florence2Params
    params: Florence2Params

    def check_folder(self, folder: str) -> None:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        vision = (config.get("vision_config") or {}).get("model_type")
        if "auto_map" in config or vision == "davit":
            raise ValueError(
                f"{folder} is a remote-code Florence-2 checkpoint (as microsoft/Florence-2-*), which needs "
                f"trust_remote_code; use a native conversion such as florence-community/Florence-2-large")
        if config.get("model_type") != "florence2":
            raise ValueError(f"captioner 'florence2' loads model_type florence2; {folder} holds "
                             f"{config.get('model_type')!r}")

    def load_model(self, folder: str) -> Any:
        from transformers import Florence2ForConditionalGeneration

        return Florence2ForConditionalGeneration.from_pretrained(folder, dtype=self.torch_dtype)

    def encode(self, images: list[np.ndarray]) -> Any:
        return self.processor(images=images, text=[self.params.prompt] * len(images), return_tensors="pt",
                              padding=True)
