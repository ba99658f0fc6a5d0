"""Captions from any transformers image-text-to-text model (SmolVLM, Idefics3, Qwen2-VL and
Qwen2.5-VL, LLaVA, Gemma 3, ...): ``AutoModelForImageTextToText`` + ``AutoProcessor``, the prompt
put in the model's own chat template as one user turn holding the image and the text."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from captioners.base import CaptionerParams, TransformersCaptioner


@dataclasses.dataclass
class VlmParams(CaptionerParams):
    """A chat vision-language model's parameters; ``prompt`` is the user's instruction."""

    model: str = "HuggingFaceTB/SmolVLM-256M-Instruct"
    """An instruction-tuned image-text-to-text folder (with a chat template) under the weights
    folder, a path, or a hub id."""
    prompt: str = "Describe the image in one sentence."
    """The instruction sent with the image; the caption is the model's answer."""
    image_size: int = 768
    """Short side ``preprocess`` shrinks larger images to; the processor then sizes (or tiles) the
    image as the model expects."""


class VlmCaptioner(TransformersCaptioner):
    """Captions as a chat model's answer, batched and left-padded (images of different sizes may
    take different numbers of image tokens)."""

    name = "vlm"
    Params = VlmParams
    params: VlmParams

    def setup(self) -> None:
        super().setup()
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"captioner 'vlm': {self.params.model} has no chat template; it needs an instruction-"
                             f"tuned image-text-to-text model (BLIP-style captioners: use 'blip')")
        self.text = self.chat_text()

    def messages(self) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.params.prompt}]}]

    def chat_text(self) -> str:
        """The text the model reads for every image: the prompt in the chat template, with the
        image placeholder and the assistant's turn opened (needs ``setup()``)."""
        return self.processor.apply_chat_template(self.messages(), add_generation_prompt=True, tokenize=False)

    def encode(self, images: list[np.ndarray]) -> Any:
        # one list per text: processors that tile images (Idefics3, SmolVLM) need to know which
        # images belong to which text
        return self.processor(images=[[img] for img in images], text=[self.text] * len(images), return_tensors="pt",
                              padding=True)
