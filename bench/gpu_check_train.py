"""``bench/gpu_check.py``'s training sections, through the trainer's own code (``train.loop.train`` with flags
parsed by ``train/train.py``, ``train.models.load_base``, ``train.step.unet_denoising_loss``).

Bases are diffusers folders written here: in ``--tiny`` the test suite's tiny models (``tests/tiny_sd.py``,
``tests/tiny_flow.py``); in a full run SD 1.5 and SDXL at their published sizes and Flux.1-dev at its real
width with 2 double + 2 single blocks (configs from ``bench/train_family_memory.py``), random weights, the
test suite's small tokenizers (their vocabularies change no layer the steps time but the embedding's rows).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path
from typing import Any

from bench.gpu_check import Context, peak_gib, ratio, reset_peak, synchronize
from bench.train_overhead import PAPER  # Zhang et al. 2023, SD 1.5 on an A100: 1.34x time, 1.23x memory


# --- base folders -------------------------------------------------------------------------------------


def clip_text(config: dict[str, Any], projection: bool = False):
    """A CLIP text encoder of ``config``'s size, with the test tokenizer's special token ids."""
    import transformers

    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(transformers.CLIPTextConfig(**config, vocab_size=49408, max_position_embeddings=77, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=1))


def save_folder(folder: Path, parts: dict[str, Any]) -> Path:
    """Each part (model, tokenizer, scheduler) into its subfolder, as diffusers lays a base out; models go
    to the CPU first (they are built on the device, where random initialisation is fast)."""
    for name, part in parts.items():
        if hasattr(part, "parameters"):
            part = part.to("cpu")
        part.save_pretrained(folder / name)
    return folder


def build(device: str, make):
    """``make()`` with new tensors on ``device``."""
    import torch

    with torch.device(device):
        return make()


def write_sd15(folder: Path, device: str) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from bench.train_family_memory import CLIP_L, SD15_UNET, SD_VAE
    from tests.tiny_flow import clip_tokenizer

    return save_folder(folder, {
        "unet": build(device, lambda: UNet2DConditionModel(**SD15_UNET)),
        "vae": build(device, lambda: AutoencoderKL(**SD_VAE)),
        "text_encoder": build(device, lambda: clip_text(CLIP_L)),
        "tokenizer": clip_tokenizer(folder),
        "scheduler": DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   clip_sample=False),
    })


def write_sdxl(folder: Path, device: str) -> Path:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    from bench.train_family_memory import CLIP_G, CLIP_L, SD_VAE, SDXL_UNET
    from tests.tiny_flow import clip_tokenizer

    tokenizer = clip_tokenizer(folder)
    return save_folder(folder, {
        "unet": build(device, lambda: UNet2DConditionModel(**SDXL_UNET)),
        "vae": build(device, lambda: AutoencoderKL(**SD_VAE, sample_size=1024, scaling_factor=0.13025)),
        "text_encoder": build(device, lambda: clip_text(CLIP_L)),
        "text_encoder_2": build(device, lambda: clip_text(CLIP_G, projection=True)),
        "tokenizer": tokenizer, "tokenizer_2": tokenizer,
        "scheduler": EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    })


FLUX_DEPTH = {"num_layers": 2, "num_single_layers": 2}
"""The full run's Flux: Flux.1-dev's width (3072, 24 heads), 2 of its 19 double and 2 of its 38 single blocks."""


def write_flux(folder: Path, device: str) -> Path:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from bench.train_family_memory import CLIP_L, FLOW_VAE, FLUX_DEV, T5_XXL
    from tests.tiny_flow import clip_tokenizer, t5_tokenizer

    t5 = T5Config(**{**T5_XXL, "num_layers": 1}, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return save_folder(folder, {
        "transformer": build(device, lambda: FluxTransformer2DModel(**{**FLUX_DEV, **FLUX_DEPTH})),
        "vae": build(device, lambda: AutoencoderKL(**FLOW_VAE, shift_factor=0.1159, scaling_factor=0.3611)),
        "text_encoder": build(device, lambda: clip_text(CLIP_L)),
        "text_encoder_2": build(device, lambda: T5EncoderModel(t5)),
        "tokenizer": clip_tokenizer(folder), "tokenizer_2": t5_tokenizer(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    })


def base_folder(ctx: Context, family: str) -> str:
    """The family's base folder, written once per run."""
    from tests.tiny_flow import write_tiny_flux
    from tests.tiny_sd import write_tiny_sd, write_tiny_sdxl

    writers = {"sd": (write_tiny_sd, write_sd15), "sdxl": (write_tiny_sdxl, write_sdxl),
               "flux": (write_tiny_flux, write_flux)}
    tiny, full = writers[family]
    folder = ctx.work / f"base_{family}"
    return str(ctx.once(f"base_{family}", lambda: tiny(folder) if ctx.tiny else full(folder, ctx.device)))


def drop_base(ctx: Context, family: str) -> None:
    """Delete a base folder no later section uses (SDXL's is 13 GB at full size; the device has 64 GB of disk)."""
    folder = ctx.cache.pop(f"base_{family}", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def manifest(ctx: Context, resolution: int) -> str:
    """Drawn scenes with captions and Canny maps at ``resolution`` (local Ray), made once per resolution."""
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig
    from demo.samples import write_scenes

    def make() -> str:
        folder = ctx.work / f"scenes_{resolution}"
        write_scenes(folder / "images", ctx.sizes.train_rows)
        run(AnnotateConfig(input=str(folder / "images"), output=str(folder / "manifest"), resolution=resolution))
        return str(folder / "manifest")

    return ctx.once(f"manifest_{resolution}", make)


# --- measuring ------------------------------------------------------------------------------------------


def time_steps(step, steps: int, device: str) -> float:
    """Seconds per step after a warm-up step (which allocates the optimiser's state)."""
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def bare_step(ctx: Context, kind: str) -> dict[str, Any]:
    """A bf16 SD step on the device: ``base`` fine-tunes the whole UNet (fp32 weights, autocast, AdamW),
    ``controlnet`` trains ``make_controlnet``'s copy against the UNet locked in bf16 (as the trainer does).
    Peak memory from before the models load."""
    import torch

    from train.models import load_base, make_controlnet
    from train.step import sample_noise, unet_denoising_loss

    s, device = ctx.sizes, torch.device(ctx.device)
    folder = base_folder(ctx, "sd")
    start = reset_peak(ctx.device)
    torch.manual_seed(0)
    base = load_base(folder, s.sd_resolution)
    unet, latent = base.unet, s.sd_resolution // 8
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(s.sd_batch, 4, latent, latent, generator=generator).to(device)
    hidden = torch.randn(s.sd_batch, 77, unet.config.cross_attention_dim, generator=generator).to(device)
    cond = torch.rand(s.sd_batch, 3, s.sd_resolution, s.sd_resolution, generator=generator).to(device)
    if kind == "base":
        trained = unet.to(device).requires_grad_(True).train()
    else:
        trained = make_controlnet(base, 3).to(device)  # copies the UNet's fp32 weights, then the UNet goes bf16
        unet.requires_grad_(False).to(device, torch.bfloat16)
        latents, hidden = latents.to(torch.bfloat16), hidden.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5)

    def step() -> None:
        noise, t = sample_noise(latents, 1000, generator)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if kind == "base":
                noisy = base.scheduler.add_noise(latents, noise, t)
                prediction = unet(noisy, t, encoder_hidden_states=hidden).sample
                loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
            else:
                loss = unet_denoising_loss(trained, unet, base.scheduler, latents, hidden, cond, noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(step, s.train_steps, ctx.device)
    return {"s_per_step": seconds, "peak_gib": peak_gib(ctx.device, start),
            "trained_params": sum(p.numel() for p in trained.parameters())}


def trainer_args(ctx: Context, family: str, resolution: int, batch: int, output: Path, steps: int) -> list[str]:
    """``train/train.py``'s flags for ``steps`` steps on the family's base; validation once, on the export
    (flags given after these override them)."""
    return ["--manifest", manifest(ctx, resolution), "--condition", "canny",
            "--pretrained_model_name_or_path", base_folder(ctx, family), "--output_dir", str(output),
            "--resolution", str(resolution), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
            "--checkpointing_steps", str(10 * steps), "--validation_steps", str(10 * steps),
            "--num_validation_rows", "1", "--num_validation_images", "1", "--learning_rate", "1e-5",
            "--lr_warmup_steps", "0", "--report_to", "none", "--seed", "0", "--keep_duplicates"]


def train_in_process(args: list[str]) -> dict[str, Any]:
    """Flags -> ``train.loop.train``, as ``train/train.py`` runs it; the trainer's result."""
    from accelerate.state import AcceleratorState

    from train.data import check_conditions
    from train.loop import train
    from train.train import parse_args

    config = parse_args(args)
    try:
        return train(config, check_conditions(config.manifest, config.condition))
    finally:
        AcceleratorState._reset_state(True)  # the next run may use another precision


def trainer_run(ctx: Context, family: str, resolution: int, batch: int, out: str, *extra: str) -> dict[str, Any]:
    """A training run: step time, peak memory, validation images and the figures the trainer reports."""
    steps = ctx.sizes.train_steps + 1  # the trainer's own timing starts after its first step
    output = ctx.work / out
    shutil.rmtree(output, ignore_errors=True)
    args = trainer_args(ctx, family, resolution, batch, output, steps) + list(extra)
    start, wall = reset_peak(ctx.device), time.perf_counter()
    figures = train_in_process(args)["figures"]
    per_s = figures.get("samples_per_s")
    validation = sorted(p.name for p in (output / "validation").glob("*.png"))
    shutil.rmtree(output, ignore_errors=True)  # exports and checkpoints: gigabytes each at full size
    return {"s_per_step": batch / per_s if per_s else None, "samples_per_s": per_s,
            "peak_gib": peak_gib(ctx.device, start), "final_loss": figures.get("final_loss"),
            "steps": figures.get("global_step"), "validation_images": len(validation),
            "seconds": time.perf_counter() - wall, "mixed_precision": figures.get("mixed_precision")}


# --- sections --------------------------------------------------------------------------------------------


def sd15_overhead(ctx: Context) -> dict[str, Any]:
    """ControlNet step vs base fine-tune, bf16, time and peak memory, with the paper's ratios beside."""
    estimate = 5.0 if ctx.tiny else 15.0
    base = ctx.part("base_finetune", estimate, lambda: bare_step(ctx, "base"))
    controlnet = ctx.part("controlnet", estimate, lambda: bare_step(ctx, "controlnet"))
    return {"resolution": ctx.sizes.sd_resolution, "batch": ctx.sizes.sd_batch, "base_finetune": base,
            "controlnet": controlnet,
            "time_ratio": ratio(controlnet.get("s_per_step"), base.get("s_per_step")),
            "memory_ratio": ratio(controlnet.get("peak_gib"), base.get("peak_gib")),
            "paper_time_ratio": PAPER["time"], "paper_memory_ratio": PAPER["memory"]}


def cache_latents(ctx: Context) -> dict[str, Any]:
    """The trainer with fixed crops, without and with ``--cache_latents`` (the cache is built before the first
    step, outside the timing)."""
    s = ctx.sizes
    common = ("--center_crop", "--mixed_precision", "bf16", "--validation_steps", "0")
    estimate = 5.0 if ctx.tiny else 20.0
    plain = ctx.part("plain", estimate, lambda: trainer_run(ctx, "sd", s.sd_resolution, s.sd_batch, "cache_off",
                                                            *common))
    cached = ctx.part("cached", estimate, lambda: trainer_run(ctx, "sd", s.sd_resolution, s.sd_batch, "cache_on",
                                                              *common, "--cache_latents"))
    return {"plain": plain, "cached": cached,
            "speedup": ratio(cached.get("samples_per_s"), plain.get("samples_per_s"))}


def resume_exact(ctx: Context) -> dict[str, Any]:
    """A bf16 run of 3 steps against the same run resumed from its step-2 checkpoint: every exported
    ControlNet weight equal? (And did step 3 change any, so that equality says something?)"""
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    s = ctx.sizes
    straight, resumed = ctx.work / "straight", ctx.work / "resumed"

    def args(output: Path) -> list[str]:
        return trainer_args(ctx, "sd", s.sd_resolution, s.sd_batch, output, 3) + [
            "--checkpointing_steps", "2", "--mixed_precision", "bf16", "--validation_steps", "0",
            "--learning_rate", "1e-4", "--lr_scheduler", "linear"]

    ctx.need(5 if ctx.tiny else 30, "resume_exact: the straight run")
    train_in_process(args(straight))
    ctx.need(2 if ctx.tiny else 15, "resume_exact: the resumed run")
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    train_in_process(args(resumed) + ["--resume_from_checkpoint", "latest"])
    a = ControlNetModel.from_pretrained(straight / "controlnet").state_dict()
    b = ControlNetModel.from_pretrained(resumed / "controlnet").state_dict()
    saved = straight / "checkpoint-2" / "model.safetensors"
    at_2 = load_file(saved) if saved.is_file() else {}
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    for folder in (straight, resumed):
        shutil.rmtree(folder, ignore_errors=True)
    return {"steps": 3, "resumed_from": 2, "same_keys": set(a) == set(b),
            "exact": set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "max_abs_diff": diff,
            "step_3_changed_weights": any(not torch.equal(a[k], v) for k, v in at_2.items() if k in a)
            if at_2 else None}


def sdxl(ctx: Context) -> dict[str, Any]:
    """SDXL, batch 1, bf16, gradient checkpointing and 8-bit Adam (bitsandbytes, CUDA only), with validation."""
    extra = ["--mixed_precision", "bf16", "--gradient_checkpointing"]
    eight_bit = ctx.cuda and importlib.util.find_spec("bitsandbytes") is not None
    note = "8-bit AdamW (bitsandbytes)" if eight_bit else (
        "AdamW: bitsandbytes is not installed (pip install bitsandbytes)" if ctx.cuda else
        "AdamW: 8-bit Adam needs a CUDA GPU")
    if eight_bit:
        extra.append("--use_8bit_adam")
    estimate = 10.0 if ctx.tiny else 60.0
    run = ctx.part("run", estimate, lambda: trainer_run(ctx, "sdxl", ctx.sizes.sdxl_resolution, 1, "sdxl", *extra))
    drop_base(ctx, "sdxl")
    return {"resolution": ctx.sizes.sdxl_resolution, "batch": 1, "optimizer": note, **run}


def flux(ctx: Context) -> dict[str, Any]:
    """Flux at real width (reduced depth), ControlNet 1 double + 1 single block, base in bf16 vs ``--fp8_base``,
    each with validation."""
    import torch

    common = ["--mixed_precision", "bf16", "--controlnet_num_layers", "1", "--controlnet_num_single_layers", "1"]
    estimate = 10.0 if ctx.tiny else 35.0
    resolution = ctx.sizes.flux_resolution
    bf16 = ctx.part("bf16", estimate, lambda: trainer_run(ctx, "flux", resolution, 1, "flux_bf16", *common))
    if not hasattr(torch, "float8_e4m3fn"):
        fp8: dict[str, Any] = {"skipped": f"torch {torch.__version__} has no float8"}
    else:
        fp8 = ctx.part("fp8", estimate, lambda: trainer_run(ctx, "flux", resolution, 1, "flux_fp8", *common,
                                                            "--fp8_base"))
    drop_base(ctx, "flux")
    return {"resolution": resolution, "batch": 1, "depth": "tiny" if ctx.tiny else FLUX_DEPTH,
            "bf16": bf16, "fp8": fp8,
            "fp8_time_ratio": ratio(fp8.get("s_per_step"), bf16.get("s_per_step")),
            "fp8_memory_ratio": ratio(fp8.get("peak_gib"), bf16.get("peak_gib"))}
