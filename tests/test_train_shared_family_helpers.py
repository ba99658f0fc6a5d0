"""The helpers several families share (train/step.py ``ddpm_denoised``, train/families_shared.py ``pack`` and
``TransformerAdapter.condition_sample``): each does what every family using it did by its own code before."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_ddpm_denoised_noises_predicts_and_scores_as_the_scheduler_says(kind):
    """Noise then timesteps from the generator, the scheduler's noising, the prediction of what ``predict`` was
    handed (its own draws come after), the loss against the scheduler's target, alpha-bar at each timestep."""
    from diffusers import DDPMScheduler

    from train.step import ddpm_denoised, prediction_loss, sample_noise

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type=kind)
    latents = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(7)
    seen = []

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        seen.append((noisy, timesteps))
        return noisy * 0.5 + torch.rand(noisy.shape, generator=generator)

    got = ddpm_denoised(scheduler, latents, generator, predict)

    replay = torch.Generator().manual_seed(7)
    noise, timesteps = sample_noise(latents, 1000, replay)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = noisy * 0.5 + torch.rand(noisy.shape, generator=replay)
    assert torch.equal(seen[0][0], noisy) and torch.equal(seen[0][1], timesteps)
    assert torch.equal(got.noisy, noisy) and torch.equal(got.prediction, prediction)
    assert torch.equal(got.loss, prediction_loss(scheduler, prediction, latents, noise, timesteps))
    assert torch.equal(got.level, scheduler.alphas_cumprod[timesteps])
    assert torch.equal(got.timesteps, timesteps) and got.parameterisation == kind


@pytest.mark.parametrize("shape", [(1, 4, 2, 2), (2, 16, 8, 6), (3, 3, 4, 10)])
def test_pack_is_both_flux_and_qwenimage_packing_and_unpack_undoes_it(shape):
    """One ``pack`` serves Flux and Qwen-Image: their pipelines' ``_pack_latents`` give the same tokens."""
    from diffusers import FluxPipeline, QwenImagePipeline

    from train.families_shared import pack, unpack

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    tokens = pack(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, *shape))
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(x, *shape))
    assert torch.equal(unpack(tokens, x.shape), x)


@pytest.mark.parametrize("family", ["hunyuandit", "sana", "zimage", "qwenimage"])
def test_a_cached_condition_gives_the_draw_its_pixels_give(family, request):
    """``--cache_latents``: the condition's cached ``latent_moments`` give exactly the latents its pixels give
    through the family's VAE (a Gaussian draw from the same generator; DC-AE's deterministic latents; Z-Image's
    mode), on the VAE's device in its dtype."""
    from train.adapter import FamilyOptions
    from train.latents import CachedConditions
    from train.models import load_base

    base = load_base(str(request.getfixturevalue(f"tiny_{family}")), 64)
    base.options = FamilyOptions(("canny",))
    condition = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cached = CachedConditions(base.family.latent_moments(base, condition * 2 - 1)[:, None])
        from_pixels = base.family.condition_sample(base, condition, torch.Generator().manual_seed(3))
        from_cache = base.family.condition_sample(base, cached, torch.Generator().manual_seed(3))
    assert from_cache.dtype == base.vae.dtype
    assert torch.equal(from_cache, from_pixels)
    with pytest.raises(ValueError, match="pick one per example"):
        base.family.condition_sample(base, CachedConditions(cached.moments.repeat(1, 2, 1, 1, 1)), torch.Generator())
