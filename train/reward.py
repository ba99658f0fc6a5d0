"""Reward fine-tuning, ControlNet++-style (Li et al., arXiv 2404.07987): make the ControlNet obey more tightly.

    the training forward (noise and timesteps drawn as usual) -> for the examples noised to at most
    --reward_max_timestep: the clean latents in one step from that same prediction (epsilon, v or flow
    parameterisation) -> the VAE decodes them, with gradient -> the condition's own annotator (a frozen torch
    model, or Canny's differentiable stand-in) reads the decoded image -> a per-condition distance to the input
    condition, averaged over those examples and added to the diffusion loss with --reward_weight.

One forward and one backward per step, as plain training (so DDP works unchanged): the reward costs a VAE
decode and the reward model on the chosen examples. The reward models are a registry keyed by condition name
(``REWARDS``), each with its distances; the families return their forward's prediction
(``FamilyAdapter.denoise``) and this module does the rest.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from train.adapter import Denoised, FamilyAdapter
from train.config import TrainConfig, reward_distances
from train.errors import SetupError

log = logging.getLogger("train")

# --- the one-step clean prediction, per parameterisation ----------------------------------------


def _per_example(level: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return level.to(like.device, torch.float32).view(-1, *([1] * (like.ndim - 1)))


def clean_from_epsilon(noisy: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar), from x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = _per_example(alpha_bar, noisy)
    return (noisy.float() - (1 - a).sqrt() * prediction.float()) / a.sqrt()


def clean_from_v(noisy: torch.Tensor, prediction: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v, with v = sqrt(abar) eps - sqrt(1 - abar) x0."""
    a = _per_example(alpha_bar, noisy)
    return a.sqrt() * noisy.float() - (1 - a).sqrt() * prediction.float()


def clean_from_flow(noisy: torch.Tensor, prediction: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - sigma v, from x_t = (1 - sigma) x0 + sigma noise and v = noise - x0."""
    return noisy.float() - _per_example(sigma, noisy) * prediction.float()


CLEAN_FROM = {"epsilon": clean_from_epsilon, "v_prediction": clean_from_v, "flow": clean_from_flow}
"""Parameterisation -> f(noisy, prediction, level): the clean latents; level is abar_t, or sigma for flow."""


def clean_prediction(kind: str, noisy: torch.Tensor, prediction: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The one-step clean latents for the ``kind`` parameterisation (a key of ``CLEAN_FROM``)."""
    if kind not in CLEAN_FROM:
        raise ValueError(f"no one-step prediction for prediction_type {kind!r}; known: {', '.join(CLEAN_FROM)}")
    return CLEAN_FROM[kind](noisy, prediction, level)


def decode_with_gradient(vae: torch.nn.Module, latents: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
    """Denoiser latents -> [0, 1] RGB through the frozen VAE, gradient kept for the latents; ``checkpointed``
    recomputes the decoder's activations in the backward pass (they are the largest part of the reward's memory)."""
    from train.latents import pixels_from_latents

    if checkpointed:
        from torch.utils.checkpoint import checkpoint

        images = checkpoint(pixels_from_latents, vae, latents, use_reentrant=False)
    else:
        images = pixels_from_latents(vae, latents)
    return (images.float() / 2 + 0.5).clamp(0, 1)


# --- reward models: decoded image -> the condition's map ----------------------------------------


class SoftCanny(torch.nn.Module):
    """A differentiable stand-in for ``cv2.Canny(image, low, high)`` on RGB: OpenCV's 3x3 Sobel L1 magnitude on
    0..255 per channel, the strongest channel per pixel (as OpenCV does for colour images), soft-thresholded
    halfway between the hysteresis thresholds. No non-maximum suppression, so edges are about 2 px wide;
    agreement with the real Canny map is measured in bench/reward_finetune.py (README, reward fine-tuning)."""

    def __init__(self, low: float = 100.0, high: float = 200.0):
        super().__init__()
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        self.register_buffer("kernels", torch.stack([sobel, sobel.T])[:, None])
        self.middle, self.width = (low + high) / 2, max(1.0, (high - low) / 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        grey = F.pad(images.reshape(b * c, 1, h, w) * 255.0, (1, 1, 1, 1), mode="reflect")
        gradients = F.conv2d(grey, self.kernels.to(grey.dtype))
        magnitude = gradients.abs().sum(dim=1).view(b, c, h, w).amax(dim=1, keepdim=True)
        return torch.sigmoid((magnitude - self.middle) / self.width)


class HedNet(torch.nn.Module):
    """controlnet-aux's HED network as ``annotators/hed.py`` runs it: RGB 0..255 in, sigmoid of the mean of its
    side outputs (resized to the image) out."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        sides = self.net(images * 255.0)
        stacked = torch.cat([F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in sides], 1)
        return torch.sigmoid(stacked.mean(dim=1, keepdim=True))


class DepthNet(torch.nn.Module):
    """MiDaS (controlnet-aux) or a transformers depth model: relative inverse depth at the image's size."""

    def __init__(self, model: torch.nn.Module, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.model, self.midas = model, mean is None
        self.register_buffer("mean", torch.tensor(mean or [0.5] * 3).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std or [0.5] * 3).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)  # MiDaS: x * 2 - 1
        x = F.interpolate(x, size=(-(-h // 32) * 32, -(-w // 32) * 32), mode="bilinear", align_corners=False)
        depth = self.model(x) if self.midas else self.model(pixel_values=x).predicted_depth
        return F.interpolate(depth[:, None], size=(h, w), mode="bilinear", align_corners=False)


class SegmentationNet(torch.nn.Module):
    """A transformers semantic-segmentation model (one with ``logits``): class logits at the image's size."""

    def __init__(self, model: torch.nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        logits = self.model(pixel_values=x).logits
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def load_soft_canny(weights_dir: str | None) -> torch.nn.Module:
    return SoftCanny()


def _annotator_module(name: str, weights_dir: str | None) -> Any:
    """The condition's annotator, its model loaded on the CPU as ``pipeline/annotate.py`` loads it."""
    from annotators.registry import create

    annotator = create(name, weights_dir=weights_dir)
    annotator.requested_device = "cpu"
    try:
        annotator.setup()
    except Exception as exc:  # missing weights name the file and where to get it
        raise SetupError(f"--reward_weight: the {name} reward model does not load: {' '.join(str(exc).split())}")
    return annotator


def load_hed(weights_dir: str | None) -> torch.nn.Module:
    return HedNet(_annotator_module("hed", weights_dir).net)


def load_depth(weights_dir: str | None) -> torch.nn.Module:
    annotator = _annotator_module("depth", weights_dir)
    if annotator.uses_midas:
        return DepthNet(annotator.model)
    return DepthNet(annotator.model, annotator.processor.image_mean, annotator.processor.image_std)


def load_segmentation(weights_dir: str | None) -> torch.nn.Module:
    annotator = _annotator_module("segmentation", weights_dir)
    if annotator.model_type in ("mask2former", "oneformer", "maskformer"):
        raise SetupError(f"--reward_weight: the segmentation reward needs a model with per-pixel logits (SegFormer, "
                         f"UperNet); {annotator.model_type} predicts masks: annotate with such a model or drop it")
    return SegmentationNet(annotator.model, annotator.processor.image_mean, annotator.processor.image_std)


# --- distances: (reward model, decoded images, condition [0, 1] Bx3xHxW) -> loss per example -------


def grey(condition: torch.Tensor) -> torch.Tensor:
    return condition.float().mean(dim=1, keepdim=True)


def soft_f1_loss(edges: torch.Tensor, target: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """1 - F1 of soft edges against a binary edge map, a match within ``tolerance`` pixels counting."""
    k = 2 * tolerance + 1
    near_target = F.max_pool2d(target, k, stride=1, padding=tolerance)
    near_edges = F.max_pool2d(edges, k, stride=1, padding=tolerance)
    precision = (edges * near_target).sum((1, 2, 3)) / (edges.sum((1, 2, 3)) + 1e-6)
    recall = (near_edges * target).sum((1, 2, 3)) / (target.sum((1, 2, 3)) + 1e-6)
    return 1 - 2 * precision * recall / (precision + recall + 1e-6)


def edge_soft_f1(model, images, condition) -> torch.Tensor:
    return soft_f1_loss(model(images).float(), (grey(condition) > 0.5).float())


def edge_bce(model, images, condition) -> torch.Tensor:
    edges = model(images).float().clamp(1e-4, 1 - 1e-4)
    return F.binary_cross_entropy(edges, (grey(condition) > 0.5).float(), reduction="none").mean((1, 2, 3))


def filled_outlines(condition: torch.Tensor) -> torch.Tensor:
    """The filled shapes of the condition's outlines (the fill task's target masks), Bx1xHxW in {0, 1}."""
    from train.metrics import fill_outline

    maps = (grey(condition) * 255).round().to(torch.uint8).cpu().numpy()[:, 0]
    masks = np.stack([fill_outline(m) for m in maps]).astype(np.float32)
    return torch.from_numpy(masks)[:, None].to(condition.device)


def fill_consistency(images: torch.Tensor, mask: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """How badly the mask splits the image into two flat colours: (within + e) / (within + between + e), the
    colour variance inside and outside the mask against the total (total = within + between); 0 for an image
    that is exactly one colour inside and another outside, 1 for a flat image (``floor``: e per pixel)."""
    x, n = images.float(), mask.shape[-1] * mask.shape[-2]
    inside = mask.sum((1, 2, 3)).clamp(min=1)
    outside = (1 - mask).sum((1, 2, 3)).clamp(min=1)
    mean_in = (x * mask).sum((2, 3), keepdim=True) / inside.view(-1, 1, 1, 1)
    mean_out = (x * (1 - mask)).sum((2, 3), keepdim=True) / outside.view(-1, 1, 1, 1)
    within = (mask * (x - mean_in) ** 2 + (1 - mask) * (x - mean_out) ** 2).sum((1, 2, 3))
    between = inside * outside / n * ((mean_in - mean_out) ** 2).sum((1, 2, 3))
    e = floor * n
    return (within + e) / (within + between + e)


def circle_fill(model, images, condition) -> torch.Tensor:
    """The fill task: the decoded image is one colour inside the condition's outline and another outside
    (fill consistency), with its edges on the outline (soft F1), equally weighted."""
    return (fill_consistency(images, filled_outlines(condition)) + edge_soft_f1(model, images, condition)) / 2


def ssim_loss(a: torch.Tensor, b: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """1 - SSIM (Gaussian window, as train/metrics.py's ``ssim``) of [0, 1] maps, per example."""
    radius = max(1, int(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=a.device)
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())

    def blur(t: torch.Tensor) -> torch.Tensor:
        t = F.conv2d(F.pad(t, (radius, radius, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
        return F.conv2d(F.pad(t, (0, 0, radius, radius), mode="reflect"), g.view(1, 1, -1, 1))

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ma, mb = blur(a), blur(b)
    va, vb, cov = blur(a * a) - ma ** 2, blur(b * b) - mb ** 2, blur(a * b) - ma * mb
    score = ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))
    return 1 - score.mean((1, 2, 3))


def hed_ssim(model, images, condition) -> torch.Tensor:
    return ssim_loss(model(images).float(), grey(condition))


def hed_l2(model, images, condition) -> torch.Tensor:
    return ((model(images).float() - grey(condition)) ** 2).mean((1, 2, 3))


def scale_shift_invariant(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE after the least-squares scale and shift that best map ``prediction`` onto ``target`` (MiDaS' loss:
    relative depth has no fixed scale or offset), per example."""
    p, t = prediction.flatten(1), target.flatten(1)
    pm, tm = p.mean(1, keepdim=True), t.mean(1, keepdim=True)
    scale = ((p - pm) * (t - tm)).sum(1, keepdim=True) / ((p - pm) ** 2).sum(1, keepdim=True).clamp(min=1e-8)
    return ((scale * (p - pm) + tm - t) ** 2).mean(1)


def depth_ssi(model, images, condition) -> torch.Tensor:
    return scale_shift_invariant(model(images).float(), grey(condition))


def palette_labels(condition: torch.Tensor) -> torch.Tensor:
    """ADE20K-coloured maps -> class ids (the nearest palette colour per pixel), BxHxW."""
    from controlnet_aux.util import ade_palette

    palette = torch.tensor(np.asarray(ade_palette(), np.float32), device=condition.device)
    rgb = (condition.float() * 255).permute(0, 2, 3, 1)
    return torch.cdist(rgb.reshape(-1, 3), palette).argmin(1).view(rgb.shape[:3])


def segmentation_ce(model, images, condition) -> torch.Tensor:
    return F.cross_entropy(model(images).float(), palette_labels(condition), reduction="none").mean((1, 2))


Distance = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Reward:
    """One condition's reward: its frozen model's loader and the distances it offers."""

    load: Callable[[str | None], torch.nn.Module]
    """weights folder (or None) -> the model reading a [0, 1] RGB image, on the CPU."""
    distances: dict[str, Distance]


REWARDS: dict[str, Reward] = {
    "canny": Reward(load_soft_canny, {"soft_f1": edge_soft_f1, "bce": edge_bce, "circle": circle_fill}),
    "hed": Reward(load_hed, {"ssim": hed_ssim, "l2": hed_l2}),
    "depth": Reward(load_depth, {"ssi": depth_ssi}),
    "segmentation": Reward(load_segmentation, {"ce": segmentation_ce}),
}
"""Condition name -> its reward (names and order as ``REWARD_DISTANCES`` in train/config.py)."""


# --- the loss term the loop adds --------------------------------------------------------------


class RewardLoss:
    """The reward term of a run: its models loaded once, frozen, in the base's precision; called per micro-batch
    on the family's training forward (``FamilyAdapter.denoise``); keeps both losses of the steps since the last
    log."""

    def __init__(self, config: TrainConfig, device: torch.device, dtype: torch.dtype):
        self.weight, self.max_timestep = config.reward_weight, config.reward_max_timestep
        self.checkpointed, self.dtype = config.gradient_checkpointing, dtype
        self.terms: list[tuple[int, torch.nn.Module, Distance]] = []
        for index, condition in enumerate(config.condition):  # stacked conditions: 3 channels each, in order
            reward = REWARDS[condition]
            model = reward.load(config.reward_weights_dir).to(device, dtype).eval().requires_grad_(False)
            self.terms.append((index, model, reward.distances[reward_distances(config)[condition]]))
        self.logged: dict[str, list[float]] = {"diffusion_loss": [], "reward_loss": []}

    def __call__(self, base, denoised: Denoised, condition: torch.Tensor) -> torch.Tensor:
        """The mean reward distance over the examples of ``denoised`` noised to at most ``max_timestep``
        (ControlNet++'s mask: a one-step prediction from more noise is too blurred to score); 0 with none."""
        chosen = denoised.timesteps <= self.max_timestep
        if not bool(chosen.any()):
            return torch.zeros((), device=denoised.loss.device)
        level = denoised.level.to(chosen.device)[chosen]
        clean = clean_prediction(denoised.parameterisation, denoised.noisy[chosen], denoised.prediction[chosen], level)
        images = decode_with_gradient(base.vae, clean, self.checkpointed).to(self.dtype)
        chunks = condition[chosen].split(3, dim=1)
        return sum(distance(model, images, chunks[i]).mean() for i, model, distance in self.terms)

    def loss(self, base, controlnet, latents, hidden, added, condition, generator) -> torch.Tensor:
        """One micro-batch's diffusion loss + weight x its reward, both from one forward (the family's
        ``denoise``: noise and timesteps drawn from ``generator`` as its ``loss`` draws them)."""
        denoised = base.family.denoise(controlnet, base, latents, hidden, added, condition, generator)
        reward = self(base, denoised, condition)
        self.logged["diffusion_loss"].append(denoised.loss.detach().item())
        self.logged["reward_loss"].append(reward.detach().item())
        return denoised.loss + self.weight * reward

    def pop_logs(self) -> dict[str, float]:
        """The mean of each loss since the last call (what the loop logs beside ``loss``)."""
        out = {k: sum(v) / len(v) for k, v in self.logged.items() if v}
        self.logged = {k: [] for k in self.logged}
        return out


def make_reward(config: TrainConfig, base, device: torch.device, dtype: torch.dtype):
    """The run's ``RewardLoss``, or None with ``--reward_weight 0``; refuses what it cannot do (a ``SetupError``)."""
    if config.reward_weight == 0:
        return None
    if type(base.family).denoise is FamilyAdapter.denoise:
        raise SetupError(f"--reward_weight: the {base.family.name} family offers no one-step prediction yet; "
                         "train it without --reward_weight")
    if config.cache_latents and base.family.encodes_conditions:
        raise SetupError("--reward_weight compares with the condition pixels, which --cache_latents leaves out on "
                         "SD3/Flux: drop --cache_latents")
    if config.reward_max_timestep >= base.scheduler.config.num_train_timesteps:
        raise SetupError(f"--reward_max_timestep {config.reward_max_timestep}: this base's scheduler has "
                         f"{base.scheduler.config.num_train_timesteps} timesteps; give fewer")
    reward = RewardLoss(config, device, dtype)
    log.info("reward fine-tuning: weight %g on the examples noised to timestep %d or less, %s", config.reward_weight,
             config.reward_max_timestep, ", ".join(f"{c} {d}" for c, d in reward_distances(config).items()))
    return reward
