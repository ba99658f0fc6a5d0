"""The ControlNet training loss for one batch: a pure function of its inputs.

    noise a clean latent at a random timestep; the ControlNet reads the condition and adds its
    residuals into the locked UNet; the loss is the UNet's error in predicting the noise (or v).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from train.adapter import Denoised


def unet_denoising_loss(
    controlnet: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    condition: torch.Tensor | list[torch.Tensor],
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    controlnet_kwargs: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Mean squared error of the ControlNet-steered UNet's prediction (epsilon or v target).

    ``controlnet_kwargs``: more arguments for the ControlNet only (a union ControlNet's control-type
    mask and slot indices, with ``condition`` the list of its slots' images)."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = steered_prediction(controlnet, unet, noisy, timesteps, encoder_hidden_states, condition,
                                    added_cond_kwargs, controlnet_kwargs)
    return prediction_loss(scheduler, prediction, latents, noise, timesteps)


def prediction_loss(scheduler: Any, prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """MSE of a denoiser's prediction against the scheduler's target (epsilon: the noise; v: its velocity),
    in fp32; shared by the UNets and the DDPM transformers (HunyuanDiT)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}")
    return F.mse_loss(prediction.float(), target.float())


def steered_prediction(controlnet: torch.nn.Module, unet: torch.nn.Module, noisy: torch.Tensor,
                       timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor,
                       condition: torch.Tensor | list[torch.Tensor], added_cond_kwargs: dict | None = None,
                       controlnet_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """The locked UNet's prediction (epsilon or v) on ``noisy`` with the ControlNet's residuals added."""
    extra = {"added_cond_kwargs": added_cond_kwargs} if added_cond_kwargs else {}
    down, mid = controlnet(
        noisy, timesteps, encoder_hidden_states=encoder_hidden_states, controlnet_cond=condition,
        return_dict=False, **extra, **(controlnet_kwargs or {}),
    )
    dtype = unet.dtype  # residuals come from the fp32 ControlNet; the locked UNet may be fp16
    return unet(
        noisy.to(dtype), timesteps, encoder_hidden_states=encoder_hidden_states.to(dtype),
        down_block_additional_residuals=[r.to(dtype) for r in down],
        mid_block_additional_residual=mid.to(dtype), return_dict=False, **extra,
    )[0]


def sample_noise(latents: torch.Tensor, num_timesteps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, timesteps) for a batch, from ``generator`` (seeded per step: resumable)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, timesteps


def ddpm_denoised(scheduler: Any, latents: torch.Tensor, generator: torch.Generator,
                  predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Denoised:
    """A DDPM training forward (the UNets, HunyuanDiT): noise and uniform timesteps from ``generator``
    (``sample_noise``), the latents noised by ``scheduler``, ``predict(noisy, timesteps)`` (the steered
    denoiser's epsilon or v; it may draw more from ``generator``), its loss (``prediction_loss``) and the
    alpha-bar the reward's one-step clean prediction reads."""
    noise, timesteps = sample_noise(latents, scheduler.config.num_train_timesteps, generator)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = predict(noisy, timesteps)
    loss = prediction_loss(scheduler, prediction, latents, noise, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps.cpu()].to(latents.device)
    return Denoised(loss, noisy, prediction, scheduler.config.prediction_type, alpha_bar, timesteps)
