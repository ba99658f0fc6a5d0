"""The reward reads the training forward itself (ControlNet++'s efficient reward fine-tuning): one ControlNet
forward per micro-batch, the reward only on the examples noised to at most --reward_max_timestep, DDP allowed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_reward import CIRCLES, base_and_controlnet, reward_config

OUTLINE = 32


def batch(base, count: int = 3, seed: int = 3):
    """(latents, hidden, added, condition) of ``count`` random 32 px images with a square outline."""
    from train.latents import latents_from_sample

    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(count, 3, OUTLINE, OUTLINE, generator=g) * 2 - 1
    with torch.no_grad():
        latents = latents_from_sample(base.vae.config, base.vae.encode(pixels).latent_dist.sample(generator=g))
        hidden, added = base.family.encode_prompts(base, ["a red circle on a blue background"] * count, "cpu")
    condition = torch.zeros(count, 3, OUTLINE, OUTLINE)
    condition[:, :, 10:22, 10] = condition[:, :, 10:22, 21] = condition[:, :, 10, 10:22] = 1.0
    condition[:, :, 21, 10:22] = 1.0
    return latents, hidden, added, condition


@pytest.fixture(scope="module")
def circles():
    return base_and_controlnet(CIRCLES, "circles")


def test_denoise_returns_exactly_the_loss_the_family_trains_with(circles):
    base, controlnet = circles
    latents, hidden, added, condition = batch(base)
    loss = base.family.loss(controlnet, base, latents, hidden, added, condition, torch.Generator().manual_seed(5))
    denoised = base.family.denoise(controlnet, base, latents, hidden, added, condition,
                                   torch.Generator().manual_seed(5))
    assert torch.equal(loss, denoised.loss)
    assert denoised.prediction.shape == denoised.noisy.shape == latents.shape
    assert denoised.timesteps.shape == denoised.level.shape == (latents.shape[0],)


def denoised_at(base, controlnet, timesteps: list[int]):
    """The circles base's training forward with the timesteps forced to ``timesteps``."""
    import train.step as step  # the DDPM forward (ddpm_denoised) draws its noise and timesteps there

    latents, hidden, added, condition = batch(base, len(timesteps))
    real = step.sample_noise

    def forced(latents, num_timesteps, generator):
        noise, _ = real(latents, num_timesteps, generator)
        return noise, torch.tensor(timesteps)

    step.sample_noise = forced
    try:
        return base.family.denoise(controlnet, base, latents, hidden, added, condition,
                                   torch.Generator().manual_seed(0)), condition
    finally:
        step.sample_noise = real


def test_only_examples_noised_up_to_the_threshold_are_rewarded(circles):
    from train.reward import RewardLoss

    base, controlnet = circles
    reward = RewardLoss(reward_config(CIRCLES, reward_distance=("canny=circle",), reward_max_timestep=200),
                        torch.device("cpu"), torch.float32)
    mixed, condition = denoised_at(base, controlnet, [10, 600, 200])
    (_, model, distance), = reward.terms
    from train.reward import clean_prediction, decode_with_gradient

    keep = torch.tensor([True, False, True])
    clean = clean_prediction("v_prediction", mixed.noisy[keep], mixed.prediction[keep], mixed.level[keep])
    expected = distance(model, decode_with_gradient(base.vae, clean), condition[keep]).mean()
    value = reward(base, mixed, condition)
    torch.testing.assert_close(value, expected)
    gradient, = torch.autograd.grad(value, mixed.prediction)
    assert gradient[1].abs().sum() == 0 and gradient[0].abs().sum() > 0 and gradient[2].abs().sum() > 0


def test_a_batch_with_no_example_under_the_threshold_adds_nothing_and_decodes_nothing(circles, monkeypatch):
    from train.reward import RewardLoss

    base, controlnet = circles
    reward = RewardLoss(reward_config(CIRCLES, reward_max_timestep=200), torch.device("cpu"), torch.float32)
    noisy, condition = denoised_at(base, controlnet, [201, 999])
    monkeypatch.setattr(base.vae, "decode", lambda *a, **k: pytest.fail("decoded a batch with nothing to reward"))
    assert float(reward(base, noisy, condition)) == 0.0


def test_a_reward_step_runs_the_controlnet_and_the_denoiser_once(circles, monkeypatch):
    from train.reward import RewardLoss

    base, controlnet = circles
    calls = {"controlnet": 0, "unet": 0}
    for name, module in (("controlnet", controlnet), ("unet", base.unet)):
        module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
    reward = RewardLoss(reward_config(CIRCLES, reward_distance=("canny=circle",), reward_max_timestep=999),
                        torch.device("cpu"), torch.float32)
    latents, hidden, added, condition = batch(base)
    loss = reward.loss(base, controlnet, latents, hidden, added, condition, torch.Generator().manual_seed(1))
    loss.backward()
    assert calls == {"controlnet": 1, "unet": 1}
    logged = reward.pop_logs()
    assert float(loss) == pytest.approx(logged["diffusion_loss"] + logged["reward_loss"])
    assert logged["reward_loss"] > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_families_give_their_velocity_and_sigma_for_the_reward(family, request):
    base, controlnet = base_and_controlnet(request.getfixturevalue(f"tiny_{family}"), family)
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 16, 8, 8, generator=g)
    hidden, added = base.family.encode_prompts(base, ["a red circle", ""], torch.device("cpu"))
    condition = torch.rand(2, 3, 64, 64, generator=g)
    loss = base.family.loss(controlnet, base, latents, hidden, added, condition, torch.Generator().manual_seed(4))
    denoised = base.family.denoise(controlnet, base, latents, hidden, added, condition,
                                   torch.Generator().manual_seed(4))
    assert torch.equal(loss, denoised.loss) and denoised.parameterisation == "flow"
    assert denoised.prediction.shape == latents.shape  # Flux's packed tokens unpacked
    n = base.scheduler.config.num_train_timesteps
    torch.testing.assert_close(denoised.timesteps, denoised.level * n)


@pytest.mark.slow
def test_reward_training_runs_under_ddp_with_ranks_in_sync(demo_manifest, tiny_sd, tmp_path):
    """Two gloo ranks (``accelerate launch --multi_gpu`` on the CPU): one forward and one backward per step, so
    DDP reduces the reward's gradient with the diffusion loss's."""
    from tests.test_reward_training import train_args
    from tests.test_train import launch

    out = tmp_path / "ddp"
    launch(train_args(demo_manifest, tiny_sd, out, "--max_train_steps", "2", "--reward_weight", "1",
                      "--reward_max_timestep", "999"), processes=2)
    figures = json.loads((Path(out) / "train_summary.json").read_text())["figures"]
    ranks = figures["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["checksum"] == ranks[1]["checksum"]
    assert figures["final_reward_loss"] > 0
