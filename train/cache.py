"""``--cache_latents``: encode every image and distinct caption once, reuse them every step.

Valid only with fixed crops (centre crop, no flip), which the config enforces. The VAE's latent
distribution (mean and log-variance, as the family's ``latent_moments`` gives it) is cached, not one sample, so each step still draws a fresh
sample from it, as an uncached run does. Captions dropped to "" use the cached "" embedding.
Families whose ControlNet reads its condition through the VAE (SD3, Flux: ``encodes_conditions``)
get each condition's latent distribution cached the same way, so no step runs the VAE encoder.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from train.latents import CachedConditions


class EncodedCache:
    """Latent distributions by row index and prompt embeddings by caption."""

    def __init__(self, base: Any, dataset: Any, device: torch.device, dtype: torch.dtype, batch_size: int,
                 show_progress: bool = True):
        self.base, self.device = base, device
        moments = []
        with torch.no_grad():
            for start in tqdm(range(0, len(dataset), batch_size), desc="cache latents", disable=not show_progress):
                pixels = torch.stack([dataset.image_tensor(i) for i in range(start, min(len(dataset), start + batch_size))])
                moments.append(base.family.latent_moments(base, pixels.to(device, base.vae.dtype)).float().cpu())
            self.moments = torch.cat(moments)
            self.condition_moments = (self._condition_moments(base, dataset, batch_size, show_progress)
                                      if base.family.encodes_conditions else None)
            captions = sorted({"", *dataset.captions()})  # cut as examples cut them
            self.prompts: dict[str, tuple[torch.Tensor, dict]] = {}
            for start in range(0, len(captions), batch_size):
                chunk = captions[start:start + batch_size]
                hidden, added = base.family.encode_prompts(base, chunk, device)
                for k, caption in enumerate(chunk):
                    self.prompts[caption] = (hidden[k], {n: v[k] for n, v in added.items()})

    def _condition_moments(self, base: Any, dataset: Any, batch_size: int, show_progress: bool) -> torch.Tensor:
        """Each row's condition maps through the VAE one by one: [rows, conditions, 2 x latent channels, h, w]."""
        count, moments = len(dataset.conditions), []
        for start in tqdm(range(0, len(dataset), batch_size), desc="cache condition latents",
                          disable=not show_progress):
            stacked = torch.stack([dataset.condition_tensor(i)
                                   for i in range(start, min(len(dataset), start + batch_size))])
            pixels = stacked.view(-1, 3, *stacked.shape[-2:]) * 2.0 - 1.0  # one 3-channel map per condition
            # at most batch_size maps per VAE call, as a training step encodes: not batch_size x conditions
            encoded = torch.cat([base.family.latent_moments(base, chunk.to(self.device, base.vae.dtype)).float().cpu()
                                 for chunk in pixels.split(batch_size)])
            moments.append(encoded.view(stacked.shape[0], count, *encoded.shape[1:]))
        return torch.cat(moments)

    def conditions(self, indices: Sequence[int]) -> CachedConditions | None:
        """The rows' cached condition distributions (None when this family encodes no condition)."""
        if self.condition_moments is None:
            return None
        return CachedConditions(self.condition_moments[list(indices)])

    def latents(self, indices: Sequence[int], generator: torch.Generator) -> torch.Tensor:
        """A fresh sample from each row's cached latent distribution, scaled for the UNet.

        Drawn on the CPU from the step's (CPU) generator, then moved: the same numbers on any
        device, so a cached run stays deterministic and resumable on a GPU too.
        """
        sample = self.base.family.latents_from_moments(self.moments[list(indices)], generator)
        return self.base.family.scale_latents(self.base, sample).to(self.device)

    def prompts_for(self, captions: Sequence[str]) -> tuple[torch.Tensor, dict]:
        """The captions' cached embeddings as one batch. An LLM text encoder pads each batch only to its longest
        prompt (Qwen-Image), so captions cached in different batches differ in length: each is zero-padded at
        the end of its sequence to the longest, and so is its attention mask (0: padding, never attended)."""
        hidden = batched([self.prompts[c][0] for c in captions])
        keys = self.prompts[captions[0]][1].keys()
        return hidden, {k: batched([self.prompts[c][1][k] for c in captions]) for k in keys}


def batched(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch of per-caption tensors: stacked when their shapes agree (scalars and fixed-length embeddings
    alike), else zero-padded at the end of their first axis (prompts of different lengths)."""
    if all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors)
    return pad_sequence(tensors, batch_first=True)
