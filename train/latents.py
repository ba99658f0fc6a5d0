"""Latents every family shares: VAE samples scaled for the denoiser and back, cached condition distributions.

A leaf module (it imports nothing of train/), so the families, the cache and the loop can all use it.
"""

from __future__ import annotations

from typing import Any

import torch


def latents_from_sample(vae_config: Any, sample: torch.Tensor) -> torch.Tensor:
    """A VAE latent sample as the denoiser reads it: shifted (SD3/Flux's 16-channel VAEs have a
    ``shift_factor``; SD's is None), then scaled."""
    shift = getattr(vae_config, "shift_factor", None)
    return (sample - shift if shift else sample) * vae_config.scaling_factor


def images_from_latents(vae: Any, image_processor: Any, latents: torch.Tensor) -> list:
    """Denoised latents -> PIL images (``latents_from_sample`` undone) through ``vae`` in its own dtype: it
    stays fp32 when its config says force_upcast, and the pipelines hand a bf16 base's latents to it as is."""
    return image_processor.postprocess(pixels_from_latents(vae, latents).float(), output_type="pil")


def pixels_from_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Denoiser latents -> [-1, 1] pixels through ``vae`` in its own dtype (``latents_from_sample`` undone);
    differentiable, so the reward (train/reward.py) decodes with it too."""
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    return vae.decode(scaled + shift if shift else scaled, return_dict=False)[0]


class CachedConditions:
    """A batch's cached condition latent distributions (``--cache_latents``), standing in for its condition
    pixels: the family samples from them where it would have run the VAE encoder (train/families/flow.py)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments
        """[batch, conditions, 2 x latent channels, h, w], on the CPU."""

    @property
    def shape(self) -> torch.Size:
        return self.moments.shape

    def pick(self, modes: torch.Tensor) -> "CachedConditions":
        """One condition per example (a union run's mode each)."""
        return CachedConditions(self.moments[torch.arange(self.moments.shape[0]), modes][:, None])

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """A fresh draw from each example's one condition distribution, drawn on the CPU like the latents."""
        return self._distribution().sample(generator=generator)

    def mode(self) -> torch.Tensor:
        """Each example's one condition distribution's mean: what a pipeline encoding its condition with
        ``sample_mode="argmax"`` reads (ZImageControlNetPipeline)."""
        return self._distribution().mode()

    def one(self) -> torch.Tensor:
        """Each example's one condition's cached ``latent_moments`` (batch first): what the family's
        ``latents_from_moments`` draws from."""
        if self.moments.shape[1] != 1:
            raise ValueError(f"{self.moments.shape[1]} conditions per example: pick one per example first")
        return self.moments[:, 0]

    def _distribution(self):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(self.one())
