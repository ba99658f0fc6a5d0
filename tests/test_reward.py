"""Reward fine-tuning's pieces (train/reward.py): one-step predictions, the gradient's reach, distances, flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CIRCLES = ROOT / "models" / "tiny-circles"


def reward_config(base: Path, condition=("canny",), **fields):
    from train.config import TrainConfig

    return TrainConfig(manifest="unused", condition=tuple(condition), pretrained_model_name_or_path=str(base),
                       **{"reward_weight": 1.0, **fields})


# --- the one-step clean prediction recovers x0 exactly from a known noisy sample -----------------


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_the_one_step_prediction_recovers_x0_for_epsilon_and_v(kind):
    from diffusers import DDPMScheduler

    from train.reward import clean_prediction

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 1, 200, 640, 999])
    noisy = scheduler.add_noise(x0, noise, timesteps)
    truth = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    clean = clean_prediction(kind, noisy, truth, scheduler.alphas_cumprod[timesteps])
    # epsilon divides by sqrt(abar), which at t=999 of a cosine schedule is ~0.006: float32 error grows with it
    tight = slice(0, 4) if kind == "epsilon" else slice(None)
    torch.testing.assert_close(clean[tight], x0[tight], atol=1e-4, rtol=0)
    if kind == "v_prediction":  # the wrong parameterisation does not
        assert not torch.allclose(clean_prediction("epsilon", noisy, truth, scheduler.alphas_cumprod[timesteps])[1:],
                                  x0[1:], atol=1e-2)


def test_the_one_step_prediction_recovers_x0_for_flow_matching():
    from train.flow import noisy_latents
    from train.reward import clean_prediction

    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 16, 8, 8, generator=g), torch.randn(4, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.0, 0.05, 0.5, 1.0])
    noisy = noisy_latents(x0, noise, sigmas)
    torch.testing.assert_close(clean_prediction("flow", noisy, noise - x0, sigmas), x0, atol=1e-5, rtol=0)


def test_an_unknown_parameterisation_names_the_known_ones():
    from train.reward import clean_prediction

    with pytest.raises(ValueError, match="sample.*epsilon, v_prediction, flow"):
        clean_prediction("sample", torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.ones(1))


def test_unpack_undoes_flux_packing():
    from train.families.flow import pack, unpack

    x = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(x), x.shape), x)


# --- the gradient reaches the ControlNet, never the base or the reward model ---------------------


def base_and_controlnet(path: Path, family: str):
    from train.adapter import FamilyOptions
    from train.models import load_base, make_controlnet

    base = load_base(str(path), 32 if family == "circles" else 64)
    base.options = FamilyOptions(("canny",), False, 16 if family in ("sd3", "flux", "zimage") else None, 3.5)
    layers = {"sd3": (1, None), "flux": (1, 1)}.get(family, (None, None))
    torch.manual_seed(0)
    controlnet = make_controlnet(base, 3, None, *layers)
    perturb_zero_convolutions(controlnet)
    return base, controlnet


def perturb_zero_convolutions(controlnet: torch.nn.Module) -> None:
    """A fresh ControlNet's outputs are zero, so only they would get a gradient: give every weight one."""
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.abs().sum():
                p.add_(torch.randn(p.shape) * 1e-2)


def reward_gradients(base, controlnet, reward, resolution: int) -> None:
    g = torch.Generator().manual_seed(3)
    pixels = torch.rand(2, 3, resolution, resolution, generator=g) * 2 - 1
    with torch.no_grad():
        from train.latents import latents_from_sample

        latents = latents_from_sample(base.vae.config, base.vae.encode(pixels).latent_dist.sample(generator=g))
        hidden, added = base.family.encode_prompts(base, ["a red circle on a blue background"] * 2, "cpu")
    condition = torch.zeros(2, 3, resolution, resolution)
    c = resolution // 2
    condition[:, :, c - 6:c + 6, c - 6] = condition[:, :, c - 6:c + 6, c + 5] = 1.0
    condition[:, :, c - 6, c - 6:c + 6] = condition[:, :, c + 5, c - 6:c + 6] = 1.0
    loss = reward(base, controlnet, latents, hidden, added, condition, g)
    assert torch.isfinite(loss) and loss.requires_grad
    loss.backward()


def assert_only_the_controlnet_has_gradients(base, controlnet, reward) -> None:
    grads = [p.grad for p in controlnet.parameters() if p.requires_grad]
    assert sum(1 for g in grads if g is not None and g.abs().sum() > 0) > len(grads) // 2
    for module in (*base.text_encoders, base.vae, base.denoiser):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    for _, model, _ in reward.terms:
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ["circles", "sd", "sd3", "flux", "zimage"])
def test_the_reward_gradient_reaches_the_controlnet_and_not_the_base(family, request):
    from train.reward import RewardLoss

    path = CIRCLES if family == "circles" else request.getfixturevalue(f"tiny_{family}")
    base, controlnet = base_and_controlnet(path, family)
    distance = "circle" if family == "circles" else "soft_f1"
    reward = RewardLoss(reward_config(path, reward_distance=(f"canny={distance}",)), torch.device("cpu"),
                        torch.float32)
    reward_gradients(base, controlnet, reward, 32 if family == "circles" else 64)
    assert_only_the_controlnet_has_gradients(base, controlnet, reward)


def test_a_model_reward_stays_frozen_in_the_bases_precision(weights_dir):
    from train.reward import RewardLoss

    config = reward_config(CIRCLES, ("hed",), reward_weights_dir=str(weights_dir))
    reward = RewardLoss(config, torch.device("cpu"), torch.bfloat16)
    (_, model, _), = reward.terms
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reward = RewardLoss(config, torch.device("cpu"), torch.float32)
    base, controlnet = base_and_controlnet(CIRCLES, "circles")
    reward_gradients(base, controlnet, reward, 32)
    assert_only_the_controlnet_has_gradients(base, controlnet, reward)
    assert any(True for _ in reward.terms[0][1].parameters())  # a real network was checked, not a parameterless one


def test_missing_reward_weights_fail_at_set_up_naming_the_file(tmp_path):
    from train.errors import SetupError
    from train.reward import RewardLoss

    with pytest.raises(SetupError, match="hed reward model does not load.*ControlNetHED.pth"):
        RewardLoss(reward_config(CIRCLES, ("hed",), reward_weights_dir=str(tmp_path)), torch.device("cpu"),
                   torch.float32)


# --- distances ---------------------------------------------------------------------------------


def circle_image(colour=(1.0, 0.0, 0.0), background=(0.0, 0.0, 1.0), size=32, radius=9, centre=(16, 16)):
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    image = np.where(inside[..., None], colour, background).astype(np.float32)
    return torch.from_numpy(image).permute(2, 0, 1)[None], inside


def outline_of(image: torch.Tensor) -> torch.Tensor:
    import cv2

    canny = cv2.Canny((image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8), 100, 200)
    return torch.from_numpy(np.repeat(canny[None] / 255.0, 3, 0)).float()[None]


def test_the_circle_distance_prefers_the_circle_the_outline_draws():
    from train.reward import SoftCanny, circle_fill

    right, _ = circle_image()
    moved, _ = circle_image(centre=(12, 20))
    flat = torch.full_like(right, 0.5)
    condition = outline_of(right)
    canny = SoftCanny()
    scores = [float(circle_fill(canny, image, condition)) for image in (right, moved, flat)]
    assert scores[0] < 0.1 < scores[1] < scores[2]
    other_colours, _ = circle_image(colour=(0.0, 1.0, 0.0), background=(1.0, 1.0, 0.0))
    assert float(circle_fill(canny, other_colours, condition)) < 0.1  # the shape is rewarded, not the colours


def test_edge_distances_score_the_right_edges_best():
    from train.reward import SoftCanny, edge_bce, edge_soft_f1

    right, _ = circle_image()
    moved, _ = circle_image(centre=(10, 22))
    condition, canny = outline_of(right), SoftCanny()
    for distance in (edge_soft_f1, edge_bce):
        assert float(distance(canny, right, condition)) < float(distance(canny, moved, condition))
    assert float(edge_soft_f1(canny, right, condition)) < 0.1


def test_ssim_and_scale_shift_invariant_distances():
    from train.reward import scale_shift_invariant, ssim_loss

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, 24, 24, generator=g)
    assert float(ssim_loss(a, a).abs().max()) < 1e-5
    assert float(ssim_loss(a, torch.rand(2, 1, 24, 24, generator=g)).min()) > 0.5
    assert float(scale_shift_invariant(3 * a + 0.7, a).max()) < 1e-10  # depth's scale and offset are free
    assert float(scale_shift_invariant(a.flip(-1), a).min()) > 1e-3


def test_segmentation_labels_come_from_the_palette():
    from controlnet_aux.util import ade_palette

    from train.reward import palette_labels

    palette = np.asarray(ade_palette(), np.float32) / 255
    labels = torch.tensor([[[3, 7], [0, 149]]])
    condition = torch.from_numpy(palette[labels.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(palette_labels(condition), labels)


def soft_canny_f1(image: np.ndarray, tolerance: int = 1) -> float:
    """F1 of the thresholded soft edges against cv2.Canny's map, within ``tolerance`` pixels."""
    import cv2

    from train.metrics import edge_f1
    from train.reward import SoftCanny

    soft = SoftCanny()(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0, 0].numpy()
    return edge_f1(cv2.Canny(image, 100, 200), (soft > 0.5).astype(np.uint8) * 255, tolerance=tolerance)


def test_the_soft_canny_agrees_with_opencv_canny():
    from skimage import data

    assert soft_canny_f1(data.astronaut()) > 0.85  # 0.906 measured (README)
    circle, _ = circle_image()
    assert soft_canny_f1((circle[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)) > 0.9


# --- flags and registry ------------------------------------------------------------------------


def test_the_reward_registry_offers_what_the_flags_accept():
    from train.config import REWARD_DISTANCES
    from train.reward import REWARDS

    assert {c: tuple(r.distances) for c, r in REWARDS.items()} == REWARD_DISTANCES


@pytest.mark.parametrize("fields, message", [
    ({"reward_weight": -0.5}, "--reward_weight -0.5: give 0"),
    ({"reward_max_timestep": 1000}, "--reward_max_timestep 1000: give a timestep within 0..999"),
    ({"reward_max_timestep": -1}, "--reward_max_timestep -1"),
    ({"reward_weight": 0.0, "reward_distance": ("canny=bce",)}, "no effect with the reward off"),
    ({"reward_distance": ("depth=ssi",)}, "'depth' is not a --condition"),
    ({"reward_distance": ("canny=ssim",)}, "canny offers soft_f1, bce, circle"),
    ({"reward_distance": ("canny",)}, "canny offers"),
    ({"condition": ("openpose",)}, "no reward model for openpose"),
    ({"condition": ("canny", "hed"), "union": True}, "--union"),
])
def test_bad_reward_flags_fail_fast_saying_what_to_do(fields, message):
    condition = fields.pop("condition", ("canny",))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        reward_config(Path("no-such-base"), condition, **fields)


def test_reward_flags_parse_from_the_command_line():
    from train.config import reward_distances
    from train.train import parse_args

    config = parse_args(["--manifest", "m", "--condition", "canny,hed", "--pretrained_model_name_or_path", "b",
                         "--reward_weight", "0.5", "--reward_max_timestep", "300", "--reward_distance", "hed=l2"])
    assert (config.reward_weight, config.reward_max_timestep) == (0.5, 300)
    assert reward_distances(config) == {"canny": "soft_f1", "hed": "l2"}


def test_what_the_reward_cannot_do_is_refused_at_set_up(tiny_flux):
    from train.errors import SetupError
    from train.models import load_base
    from train.reward import make_reward

    circles = load_base(str(CIRCLES), 32)
    assert make_reward(reward_config(CIRCLES, reward_weight=0.0), circles, "cpu", torch.float32, 1) is None
    with pytest.raises(SetupError, match="one process"):
        make_reward(reward_config(CIRCLES), circles, "cpu", torch.float32, 2)
    flux = load_base(str(tiny_flux), 64)
    cached = reward_config(tiny_flux, cache_latents=True, center_crop=True, max_sequence_length=16)
    with pytest.raises(SetupError, match="drop --cache_latents"):
        make_reward(cached, flux, "cpu", torch.float32, 1)
