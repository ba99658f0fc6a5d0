#!/usr/bin/env python
"""The demo's base model: a tiny text-to-image Stable Diffusion that draws captioned circles.

The ControlNet paper's "fill50k" experiment needs a base that already draws "a red circle on a
light blue background" in those colours, anywhere; the ControlNet then learns to put the circle
where the condition's outline is. This script pretrains such a base from nothing on the circle
images of ``demo/circles.py`` and saves it as a diffusers folder (``StableDiffusionPipeline``
layout, safetensors). The shipped ``models/tiny-circles`` was made by exactly:

    nice -n 15 python -m demo.tiny_base --output models/tiny-circles

(the defaults below). It took 21.5 minutes on one thread of a shared 2-core CPU: VAE 800 steps
3.4 min, UNet + text encoder 3,000 steps at batch 32 17.4 min, measuring 0.6 min. Everything is
seeded and runs on a fixed thread count, so a rerun on the same machine gives the same weights
(``tests/test_tiny_base.py`` checks this on a tiny run); other CPUs may round differently.
Measure a saved base again without training:

    python -m demo.tiny_base --output models/tiny-circles --measure_only

The recipe, one small function per step:

1. ``write_tokenizer``: a CLIP BPE tokenizer whose merges make every caption word one token
   (a vocabulary without merges splits words into characters and a 16-token limit then cuts
   the background colour off); characters stay in the vocabulary, so any text still encodes.
2. ``circle_pool``: circles drawn by ``demo.circles.circle`` at ``source_size`` and resized
   bicubic to ``resolution``, as ``train/data.py`` resizes a manifest's images.
3. ``train_vae``: an ``AutoencoderKL`` that down-samples by 2 (32x32 pixels -> 4x16x16 latents),
   trained briefly on reconstruction; its latents' spread sets ``scaling_factor``.
4. ``train_denoiser``: the UNet (attention only at 8x8 and 4x4) and the CLIP text encoder trained
   together on the VAE's latents with a cosine noise schedule (Nichol & Dhariwal's, made for
   32x32 images: the linear one destroys a small image's content too early) ending at zero SNR,
   v-prediction (finite at zero SNR, so sampling starts from pure noise as trained: no colour
   cast leaks from a residual signal), min-SNR loss weights, captions dropped 10% of the time
   (classifier-free guidance), and an EMA of the weights, which is what is saved.
5. ``save_base``: ``StableDiffusionPipeline.save_pretrained`` (no safety checker; UNet and VAE
   weights stored float16, loaded float32), plus the tokenizer's ``vocab.json``/``merges.txt``.
6. ``measure_base``: samples captions with UniPC (20 steps, guidance 7.5: what
   ``train/evaluate.py`` uses) and scores them with ``train/metrics.py``: colour accuracy (circle
   and background both the captioned palette colours) and the share with a circle of plausible
   size drawn; writes ``tiny_base.json``, ``samples.png`` (every colour pair) and ``README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run by path (python demo/tiny_base.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import json
import math
import string
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from demo.circles import circle
from train.metrics import CIRCLE_PALETTE, circle_caption

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: Characters kept as single-character tokens (with and without the end-of-word mark), so any
#: text encodes; words outside the captions just cost one token per character.
CHARACTERS = string.ascii_lowercase + string.digits + ".,!?'-"


@dataclasses.dataclass
class TinyBaseConfig:
    """Every setting of the tiny base's recipe; each field is a flag ``--<name>`` of this script."""

    output: str
    """Folder to write the diffusers pipeline (and tiny_base.json, samples.png, README.md) into."""
    seed: int = 0
    """Seed of model initialisation, batch order, noise and caption dropout."""
    data_seed: int = 1000
    """Seed of the circle images (``demo.circles.circle(data_seed, i)``); not the demo's seed 0,
    so the base never sees the demo's own images."""
    pool_size: int = 16384
    """Circle images drawn once and sampled from in batches."""
    source_size: int = 64
    """Side of the drawn circles (``python -m demo.samples circles --size``, default 64) before resizing."""
    resolution: int = 32
    """Side of the training images and of what the base generates, in pixels."""
    threads: int = 1
    """CPU threads for torch (0: torch's default). One thread is repeatable and, on a shared 2-core
    machine, faster than two, which wait on each other."""
    model_max_length: int = 16
    """Tokens per prompt, start and end marks included (the longest caption needs 10)."""
    text_hidden_size: int = 64
    """Width of the CLIP text encoder (also the UNet's cross-attention width)."""
    text_layers: int = 2
    """Transformer layers of the text encoder."""
    vae_channels: tuple[int, ...] = (16, 32)
    """VAE block widths; n blocks down-sample by 2**(n-1): two give 16x16 latents at 32 px."""
    latent_channels: int = 4
    """Channels of the VAE latent (the UNet's input and output)."""
    vae_steps: int = 800
    """Optimiser steps of VAE training."""
    vae_batch_size: int = 32
    """Images per VAE step."""
    vae_learning_rate: float = 3e-3
    """AdamW learning rate of the VAE (cosine decay after 50 warm-up steps)."""
    vae_kl_weight: float = 1e-8
    """Weight of the KL term (summed over latent elements) against the mean squared pixel error in
    [-1, 1] units; small, so the posterior stays narrow around its mean (few latents' spread)."""
    unet_channels: tuple[int, ...] = (32, 64, 64)
    """UNet block widths at 16x16, 8x8 and 4x4 latents; cross-attention in all but the first."""
    unet_layers_per_block: int = 1
    """ResNet (and attention) layers per UNet down block (up blocks get one more, as in diffusers).
    ControlNet-XS (``diffusers.UNetControlNetXSModel``) needs 2; the shipped base uses 1."""
    unet_steps: int = 3000
    """Optimiser steps of the UNet and text encoder."""
    batch_size: int = 32
    """Images per UNet step."""
    learning_rate: float = 1e-3
    """AdamW peak learning rate of the UNet and text encoder (cosine decay to 0)."""
    warmup_steps: int = 200
    """Linear learning-rate warm-up steps of the UNet and text encoder."""
    ema_decay: float = 0.999
    """Decay of the weights' exponential moving average (warmed up as (1 + step) / (10 + step))."""
    proportion_empty_prompts: float = 0.1
    """Share of captions replaced by "" so classifier-free guidance has an unconditional model."""
    snr_gamma: float = 5.0
    """Min-SNR loss weighting (Hang et al. 2023): weight min(SNR, gamma) / (SNR + 1) for v; 0: off."""
    beta_schedule: str = "squaredcos_cap_v2"
    """Noise schedule of the DDPM scheduler (squaredcos_cap_v2: the cosine schedule)."""
    prediction_type: str = "v_prediction"
    """What the UNet predicts: v_prediction or epsilon (``train/step.py`` trains ControlNets on both)."""
    storage_dtype: str = "float16"
    """dtype of the saved UNet and VAE weights (halves the folder; diffusers loads them as float32
    unless given ``torch_dtype``). The text encoder is saved float32: transformers would load it
    in the stored dtype."""
    eval_samples: int = 112
    """Captions sampled to measure the base (two per colour pair on average)."""
    eval_seed: int = 2000
    """Seed of the measured captions (``circle(eval_seed, i)``) and of their sampling noise."""
    num_inference_steps: int = 20
    """UniPC steps per measured sample (``train/evaluate.py``'s default)."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the measured samples (``train/evaluate.py``'s default)."""
    measure_only: bool = False
    """Skip training: load ``output`` and measure it (rewrites tiny_base.json's metrics and samples.png)."""


# ------------------------------------------------------------------------------------ tokenizer

def caption_words() -> list[str]:
    """Every word a circle caption can contain, in a fixed order."""
    words = " ".join([circle_caption("x", "x"), "an", *CIRCLE_PALETTE]).split()
    return list(dict.fromkeys(w for w in words if w != "x"))


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's byte-pair encoding of one lower-case word (``CLIPTokenizer.bpe``, without its cache)."""
    parts = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(parts) > 1:
        pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, math.inf))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = tuple(merged)
    return parts


def bpe_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that make each word one token. Each word's missing merges are appended after all
    earlier ones: a merge ranked last fires only when no earlier merge applies, and a finished
    word has no pairs left, so a later word's merges never re-split an earlier word."""
    merges: list[tuple[str, str]] = []
    for word in words:
        while len(parts := bpe(word, {m: r for r, m in enumerate(merges)})) > 1:
            merges.append((parts[0], parts[1]))  # join the leftmost pair, then look again
    return merges


def write_tokenizer(folder: Path, words: Sequence[str], model_max_length: int) -> Any:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` and return the CLIPTokenizer on them."""
    from transformers import CLIPTokenizer

    merges = bpe_merges(words)
    tokens = [BOS, EOS] + list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    tokens += [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)


# ------------------------------------------------------------------------------------------ data

def circle_pool(count: int, seed: int, source_size: int, resolution: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` circle images as uint8 Nx3xHxW at ``resolution`` and their captions.

    Drawn by the project's generator at ``source_size`` and resized bicubic, as ``train/data.py``
    resizes manifest images, so the base sees what a ControlNet run on a circle manifest sees.
    """
    images = np.empty((count, resolution, resolution, 3), np.uint8)
    captions = []
    for i in range(count):
        im, caption = circle(seed, i, source_size)
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        images[i] = np.asarray(im)
        captions.append(caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (what the VAE reads and writes)."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------- models

def build_vae(config: TinyBaseConfig) -> torch.nn.Module:
    """An AutoencoderKL down-sampling by 2 per block after the first, no attention."""
    from diffusers import AutoencoderKL

    blocks = len(config.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=config.latent_channels,
        block_out_channels=tuple(config.vae_channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=8, sample_size=config.resolution, mid_block_add_attention=False,
    )


def build_text_encoder(config: TinyBaseConfig, vocab_size: int) -> torch.nn.Module:
    """A small CLIP text encoder over the written vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=config.text_hidden_size, intermediate_size=2 * config.text_hidden_size,
        num_hidden_layers=config.text_layers, num_attention_heads=4, max_position_embeddings=config.model_max_length,
        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=config.text_hidden_size,
    ))


def build_unet(config: TinyBaseConfig) -> torch.nn.Module:
    """A UNet on the latents: plain ResNet blocks at full latent size, cross-attention below it."""
    from diffusers import UNet2DConditionModel

    levels = len(config.unet_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    return UNet2DConditionModel(
        sample_size=config.resolution // vae_factor(config), in_channels=config.latent_channels,
        out_channels=config.latent_channels, layers_per_block=config.unet_layers_per_block,
        block_out_channels=tuple(config.unet_channels),
        down_block_types=down, up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
        cross_attention_dim=config.text_hidden_size, attention_head_dim=4, norm_num_groups=16,
    )


def build_scheduler(config: TinyBaseConfig) -> Any:
    """The training noise schedule; samplers built ``from_config`` start at its last timestep."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=False, timestep_spacing="trailing")


def vae_factor(config: TinyBaseConfig) -> int:
    return 2 ** (len(config.vae_channels) - 1)


# -------------------------------------------------------------------------------------- training

Progress = Callable[[int, dict[str, float]], None]


def _cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_vae(vae: torch.nn.Module, images: torch.Tensor, config: TinyBaseConfig, generator: torch.Generator,
              progress: Progress | None = None) -> float:
    """Reconstruction (squared error) plus a small KL term; returns the last 50 steps' mean loss."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_learning_rate, weight_decay=0.0)
    schedule = _cosine(optimizer, min(50, config.vae_steps), config.vae_steps)
    recent: list[float] = []
    for step in range(config.vae_steps):
        x = to_unit(images[torch.randint(0, len(images), (config.vae_batch_size,), generator=generator)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        loss = F.mse_loss(recon, x) + config.vae_kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
        if progress:
            progress(1, {"vae_loss": loss.item()})
    vae.eval()
    vae.requires_grad_(False)
    return float(np.mean(recent)) if recent else float("nan")


@torch.no_grad()
def encode_pool(vae: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The VAE posterior of every image: Nx(2C)xhxw (mean and log-variance, as diffusers stores them)."""
    return torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.parameters
                      for i in range(0, len(images), batch)])


def sample_latents(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw from each posterior (what the ControlNet trainer's ``latent_dist.sample`` does)."""
    mean, logvar = moments.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator)


@torch.no_grad()
def reconstruction_error(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean absolute error of VAE reconstructions (posterior means), in 0..255 units."""
    moments = encode_pool(vae, images)
    recon = vae.decode(moments.chunk(2, dim=1)[0]).sample
    return float(((recon.clamp(-1, 1) + 1) * 127.5 - images.float()).abs().mean())


class EMA:
    """Exponential moving average of parameters, warmed up so early weights fade fast."""

    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.params = [p for m in modules for p in m.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, param in zip(self.shadow, self.params):
            param.copy_(shadow)


def tokenize(tokenizer: Any, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def loss_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights per example (ones when gamma is 0)."""
    if gamma <= 0:
        return torch.ones(len(timesteps))
    alpha = scheduler.alphas_cumprod[timesteps]
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def train_denoiser(unet: torch.nn.Module, text_encoder: torch.nn.Module, scheduler: Any, moments: torch.Tensor,
                   caption_ids: torch.Tensor, empty_ids: torch.Tensor, scaling_factor: float,
                   config: TinyBaseConfig, generator: torch.Generator, progress: Progress | None = None) -> float:
    """Train the UNet and text encoder together; leaves their EMA weights in them. Returns the
    last 100 steps' mean loss."""
    modules = (unet, text_encoder)
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    schedule = _cosine(optimizer, config.warmup_steps, config.unet_steps)
    ema = EMA(modules, config.ema_decay)
    recent: list[float] = []
    for step in range(config.unet_steps):
        rows = torch.randint(0, len(moments), (config.batch_size,), generator=generator)
        latents = sample_latents(moments[rows], generator) * scaling_factor
        ids = caption_ids[rows].clone()
        dropped = torch.rand(config.batch_size, generator=generator) < config.proportion_empty_prompts
        ids[dropped] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
        per_example = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_example * loss_weights(scheduler, timesteps, config.snr_gamma)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.update(step)
        recent = (recent + [loss.item()])[-100:]
        if progress:
            progress(1, {"loss": loss.item()})
    ema.copy_to_model()
    for m in modules:
        m.eval()
        m.requires_grad_(False)
    return float(np.mean(recent)) if recent else float("nan")


def save_base(folder: Path, vae: Any, text_encoder: Any, tokenizer: Any, unet: Any, scheduler: Any,
              storage_dtype: str = "float32") -> Path:
    """The diffusers folder ``StableDiffusionPipeline.from_pretrained`` and ``train/models.load_base``
    read; the UNet and VAE are cast (in place) to ``storage_dtype`` first."""
    from diffusers import StableDiffusionPipeline

    for module in (unet, vae):
        module.to(getattr(torch, storage_dtype))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ------------------------------------------------------------------------------------- measuring

def circle_drawn(image: np.ndarray) -> bool:
    """Whether the image shows one roughly round blob of plausible size: an enclosing radius of 6%
    to 45% of the side (the generator draws 10% to 37.5%) and filling at least 60% of that circle."""
    import cv2

    from train.metrics import segment_shape

    mask = segment_shape(image).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return False
    (_, _), radius = cv2.minEnclosingCircle(np.concatenate(contours))
    side = min(image.shape[:2])
    if not 0.06 * side <= radius <= 0.45 * side:
        return False
    return float(mask.sum()) >= 0.6 * math.pi * radius ** 2


def load_pipeline(folder: str | Path, threads: int = 0) -> Any:
    """The saved base as a StableDiffusionPipeline with the UniPC sampler ``train/evaluate.py`` uses."""
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    if threads:
        torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe: Any, captions: Sequence[str], seed: int, resolution: int, steps: int, guidance: float,
             batch: int = 64) -> np.ndarray:
    """uint8 NxHxWx3 images, one per caption, from noise seeded by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(captions), batch):
        images = pipe(list(captions[i:i + batch]), height=resolution, width=resolution, num_inference_steps=steps,
                      guidance_scale=guidance, generator=generator, output_type="np").images
        out.append((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(out)


def score(images: np.ndarray, captions: Sequence[str]) -> dict[str, float]:
    """Colour accuracy (both colours right, as ``train/metrics.colour_match``), each colour's own
    accuracy, and the share with a circle of plausible size drawn."""
    from train.metrics import caption_colours, image_colours

    drawn, both, fg, bg = [], [], [], []
    for image, caption in zip(images, captions):
        wanted, got = caption_colours(caption), image_colours(image)
        fg.append(got[0] == wanted[0])
        bg.append(got[1] == wanted[1])
        both.append(got == wanted)
        drawn.append(circle_drawn(image))
    return {"colour_accuracy": float(np.mean(both)), "circle_colour_accuracy": float(np.mean(fg)),
            "background_colour_accuracy": float(np.mean(bg)), "circle_drawn": float(np.mean(drawn)),
            "samples": len(captions)}


def colour_grid(pipe: Any, path: Path, seed: int, resolution: int, steps: int, guidance: float,
                scale: int = 3) -> Path:
    """PNG of every colour pair: row = circle colour, column = background colour (diagonal empty)."""
    names = list(CIRCLE_PALETTE)
    pairs = [(c, b) for c in names for b in names if c != b]
    images = generate(pipe, [circle_caption(c, b) for c, b in pairs], seed, resolution, steps, guidance)
    tile, label = resolution * scale, 64
    sheet = Image.new("RGB", (label + len(names) * (tile + 2), 14 + len(names) * (tile + 2)), (128, 128, 128))
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(names):
        draw.text((label + j * (tile + 2) + 2, 2), name[:12], fill=(0, 0, 0))
        draw.text((2, 14 + j * (tile + 2) + tile // 2 - 5), name[:10], fill=(0, 0, 0))
    for (c, b), image in zip(pairs, images):
        i, j = names.index(c), names.index(b)
        big = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(big, (label + j * (tile + 2), 14 + i * (tile + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def measure_base(folder: str | Path, config: TinyBaseConfig, grid: bool = True) -> dict[str, Any]:
    """Score ``eval_samples`` captions drawn from the generator, at several guidance scales; the
    configured one is the headline. Writes ``samples.png`` into the folder when ``grid``."""
    pipe = load_pipeline(folder)
    captions = [circle(config.eval_seed, i, 16)[1] for i in range(config.eval_samples)]
    results = {}
    for guidance in dict.fromkeys([config.guidance_scale, 1.0, 3.0]):
        images = generate(pipe, captions, config.eval_seed, config.resolution, config.num_inference_steps, guidance)
        results[f"guidance_{guidance:g}"] = score(images, captions)
    metrics = {**results[f"guidance_{config.guidance_scale:g}"], "by_guidance_scale": results,
               "sampler": f"UniPCMultistepScheduler, {config.num_inference_steps} steps",
               "guidance_scale": config.guidance_scale}
    if grid:
        colour_grid(pipe, Path(folder) / "samples.png", config.eval_seed, config.resolution,
                    config.num_inference_steps, config.guidance_scale)
    return metrics


# ------------------------------------------------------------------------------------------ recipe

def pretrain(config: TinyBaseConfig, progress: Progress | None = None) -> dict[str, Any]:
    """The whole recipe into ``config.output``; returns the training figures (sizes, losses, times)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    out = Path(config.output)
    times: dict[str, float] = {}
    t = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp), caption_words(), config.model_max_length)
    images, captions = circle_pool(config.pool_size, config.data_seed, config.source_size, config.resolution)
    times["data_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vae = build_vae(config)
    vae_loss = train_vae(vae, images, config, generator, progress)
    moments = encode_pool(vae, images)
    spread = float(sample_latents(moments[:2048], torch.Generator().manual_seed(config.seed)).std())
    vae.register_to_config(scaling_factor=1.0 / spread)
    times["vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    text_encoder = build_text_encoder(config, len(tokenizer.get_vocab()))
    unet = build_unet(config)
    scheduler = build_scheduler(config)
    caption_ids, empty_ids = tokenize(tokenizer, captions), tokenize(tokenizer, [""])[0]
    loss = train_denoiser(unet, text_encoder, scheduler, moments, caption_ids, empty_ids, 1.0 / spread,
                          config, generator, progress)
    times["unet_s"] = time.perf_counter() - t

    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    figures = {
        "parameters": {"unet": count(unet), "text_encoder": count(text_encoder), "vae": count(vae)},
        "vae_loss": vae_loss, "vae_reconstruction_mae_0_255": reconstruction_error(vae, images[:512]),
        "scaling_factor": 1.0 / spread, "denoiser_loss": loss, "seconds": times, "threads": torch.get_num_threads(),
    }
    save_base(out, vae, text_encoder, tokenizer, unet, scheduler, config.storage_dtype)
    # transformers 5 saves the tokenizer as tokenizer.json only; 4.x's slow CLIPTokenizer (the
    # pipeline's and the trainer's) reads vocab.json and merges.txt: ship both forms.
    write_tokenizer(out / "tokenizer", caption_words(), config.model_max_length)
    return figures


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def changed_flags(config: dict[str, Any]) -> str:
    """The flags (other than --output) by which a recorded config differs from the defaults: the card's command
    must rebuild this base, not the default one."""
    flags = ""
    for field in dataclasses.fields(TinyBaseConfig):
        if field.name in config and field.default is not dataclasses.MISSING and field.name != "measure_only":
            value = config[field.name]
            value = tuple(value) if isinstance(value, list) else value  # as JSON gives it back
            if value != field.default:
                shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
                flags += f" --{field.name} {shown}"
    return flags


def write_model_card(folder: Path, report: dict[str, Any]) -> None:
    """README.md of the folder: what it is, how it was made, how well it draws."""
    m, t = report["metrics"], report.get("training", {})
    output = report.get("config", {}).get("output", str(folder))
    card = [
        "# tiny-circles: the demo's text-to-image base", "",
        "A tiny Stable Diffusion (diffusers layout, safetensors) pretrained from nothing on 32x32 circle images",
        "captioned like \"a red circle on a light blue background\": it draws the captioned colours and puts the",
        "circle anywhere, for a ControlNet to learn where (the ControlNet paper's fill50k task).", "",
        f"Made by `python -m demo.tiny_base --output {output}{changed_flags(report.get('config', {}))}` "
        "(`demo/tiny_base.py`; the recipe is in its docstring,",
        "every other setting is in `tiny_base.json`, with the figures); `samples.png` shows one sample per colour",
        "pair (row: circle, column: background).",
        "", "| | |", "|---|---|",
    ]
    if t:
        card += [f"| parameters | UNet {t['parameters']['unet']:,}, text encoder {t['parameters']['text_encoder']:,}, "
                 f"VAE {t['parameters']['vae']:,} |",
                 f"| training time | {sum(t['seconds'].values()) / 60:.1f} min on {t['threads']} CPU thread(s) |"]
    card += [f"| colour accuracy | {m['colour_accuracy']:.2f} ({m['samples']} captions, {m['sampler']}, guidance "
             f"{m['guidance_scale']:g}) |", f"| circle drawn | {m['circle_drawn']:.2f} |", ""]
    (folder / "README.md").write_text("\n".join(card))


# ------------------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    from manifests.flags import field_docs, finite_float

    docs = field_docs(TinyBaseConfig)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for field in dataclasses.fields(TinyBaseConfig):
        flag, doc = f"--{field.name}", docs.get(field.name, "")
        if field.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, help=doc)
        elif isinstance(field.default, bool):
            p.add_argument(flag, action="store_true", help=doc)
        elif isinstance(field.default, tuple):
            p.add_argument(flag, type=lambda s: tuple(int(v) for v in s.split(",")), default=field.default,
                           help=doc + " (comma-separated)")
        else:
            kind = finite_float if isinstance(field.default, float) else type(field.default)
            p.add_argument(flag, type=kind, default=field.default, help=doc)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = TinyBaseConfig(**vars(args))
    out = Path(config.output)
    if config.threads:
        torch.set_num_threads(config.threads)
    report_path = out / "tiny_base.json"
    if config.measure_only:
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    else:
        from tqdm.auto import tqdm

        total = config.vae_steps + config.unet_steps
        with tqdm(total=total, desc="tiny base", unit="step", mininterval=2.0) as bar:
            def progress(n: int, figures: dict[str, float]) -> None:
                bar.update(n)
                bar.set_postfix({k: f"{v:.4f}" for k, v in figures.items()}, refresh=False)
            report = {"config": dataclasses.asdict(config), "training": pretrain(config, progress)}
    t = time.perf_counter()
    report["metrics"] = measure_base(out, config)
    report["metrics"]["seconds"] = time.perf_counter() - t
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(out, report)
    m = report["metrics"]
    print(f"{out}: colour accuracy {m['colour_accuracy']:.3f}, circle drawn {m['circle_drawn']:.3f} "
          f"({m['samples']} captions, guidance {m['guidance_scale']:g}); "
          + ", ".join(f"{k}: {v['colour_accuracy']:.3f}/{v['circle_drawn']:.3f}" for k, v in m["by_guidance_scale"].items())
          + f"; {folder_size(out) / 1e6:.2f} MB; grid {out / 'samples.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
