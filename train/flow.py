"""The flow-matching (rectified flow) loss for SD3/3.5 and Flux: pure functions of their inputs.

    noisy = (1 - sigma) * x0 + sigma * noise       (sigma 0: the image, 1: pure noise)
    target = noise - x0                              (the velocity the transformer predicts)

Timesteps: sigma = shift(u), u = sigmoid(n), n ~ N(0, 1) (logit-normal, mean 0, std 1, as the SD3
paper and diffusers' SD3/Flux training examples with ``weighting_scheme=logit_normal``), then the
family's time shift ``shift * u / (1 + (shift - 1) * u)``, which moves steps towards noise for
high resolutions the way inference does: SD3 uses its scheduler's fixed ``shift`` (3.0); Flux uses
``exp(mu)`` with ``mu`` the pipeline's resolution-dependent ``calculate_shift`` (the exponential
shift of FlowMatchEulerDiscreteScheduler with dynamic shifting is exactly this with shift = e^mu).
No loss weighting: uniform MSE on the velocity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def shifted_sigmas(count: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """``count`` logit-normal sigmas in (0, 1), time-shifted by ``shift``, drawn on the CPU."""
    u = torch.sigmoid(torch.randn(count, generator=generator, dtype=torch.float32))
    return shift * u / (1 + (shift - 1) * u)


def flux_shift(image_seq_len: int, config) -> float:
    """exp(mu), mu as in FluxPipeline's ``calculate_shift`` from the scheduler's config."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return math.exp(image_seq_len * slope + base_shift - slope * base_len)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The straight path between the clean latents and the noise, at each example's sigma."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.device, torch.float32)
    return ((1 - s) * latents.float() + s * noise.float()).to(latents.dtype)


def flow_loss(prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``noise - latents`` (computed in fp32)."""
    return F.mse_loss(prediction.float(), noise.float() - latents.float())
