"""ControlNet training overhead on one tiny config, with the paper's A100 figures beside ours.

    python bench/train_overhead.py [--steps 10] [--batch 16] [--resolution 128]
    python bench/train_overhead.py --sd15 [--steps 2]       # SD 1.5's real UNet, 256 px, batch 1 (~20 GB RAM)

1. a base UNet fine-tuning step versus a ControlNet step (UNet locked): time and peak memory
   (each measured in its own process; memory is the peak RSS growth over the model set-up);
2. the trainer's end-to-end samples/s (accelerate, manifest decoding, augmentation) versus a bare
   loop of the same steps on in-memory tensors: what data loading costs;
3. the trainer with and without ``--cache_latents`` (fixed crops both): what caching saves.

``--sd15`` measures (1) on SD 1.5's real UNet and ControlNet, built from their configs with random
weights (no download): 860M UNet parameters against a 361M ControlNet, where the tiny UNet's
condition encoder no longer dominates, so the ratio is the one users will see.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import resource
import subprocess
import tempfile
import time

import torch

PAPER = {"time": 1.34, "memory": 1.23}  # Zhang et al. 2023: +34% time, +23% GPU memory (A100)

# runwayml/stable-diffusion-v1-5 unet/config.json, the fields that differ from diffusers' defaults
SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def one_kind(kind: str, sd: str, steps: int, batch: int, resolution: int) -> dict:
    """Time per step and peak memory growth of ``steps`` steps of ``kind`` (base or controlnet)."""
    from train.models import load_base, make_controlnet
    from train.step import sample_noise, unet_denoising_loss

    torch.manual_seed(0)
    base = load_base(sd, resolution)
    latent = resolution // 8
    latents = torch.randn(batch, 4, latent, latent)
    hidden, _ = base.family.encode_prompts(base, ["a red circle"] * batch, torch.device("cpu"))
    cond = torch.rand(batch, 3, resolution, resolution)
    generator = torch.Generator().manual_seed(0)
    if kind == "base":
        base.unet.requires_grad_(True).train()
        params = list(base.unet.parameters())
    else:
        controlnet = make_controlnet(base, 3)
        params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        noise, t = sample_noise(latents, 1000, generator)
        if kind == "base":
            noisy = base.scheduler.add_noise(latents, noise, t)
            loss = torch.nn.functional.mse_loss(base.unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        else:
            loss = unet_denoising_loss(controlnet, base.unet, base.scheduler, latents, hidden, cond, noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, steps, params)


def measure(step, steps: int, params: list) -> dict:
    """Seconds per step after a warm-up step (which allocates optimizer state), and peak RSS growth."""
    before = rss_mb()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": seconds, "memory_mb": peak - before, "params": sum(p.numel() for p in params)}


def sd15_kind(kind: str, steps: int, resolution: int) -> dict:
    """``one_kind`` on SD 1.5's real architecture (random weights), batch 1, with AdamW."""
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    from train.step import sample_noise, unet_denoising_loss

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latents = torch.randn(1, 4, resolution // 8, resolution // 8)
    hidden = torch.randn(1, 77, 768)
    cond = torch.rand(1, 3, resolution, resolution)
    generator = torch.Generator().manual_seed(0)
    if kind == "base":
        unet.requires_grad_(True).train()
        params = list(unet.parameters())
    else:
        unet.requires_grad_(False).eval()
        controlnet = ControlNetModel.from_unet(unet).train()
        params = list(controlnet.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        noise, t = sample_noise(latents, 1000, generator)
        if kind == "base":
            noisy = scheduler.add_noise(latents, noise, t)
            loss = torch.nn.functional.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        else:
            loss = unet_denoising_loss(controlnet, unet, scheduler, latents, hidden, cond, noise, t)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return measure(step, steps, params)


def print_comparison(title: str, b: dict, c: dict) -> None:
    print(title)
    print(f"{'':28}{'base fine-tune':>16}{'ControlNet':>12}{'ratio':>8}{'paper (A100)':>14}")
    print(f"{'trainable parameters':28}{b['params']:16,}{c['params']:12,}{c['params'] / b['params']:8.2f}")
    print(f"{'time per step (s)':28}{b['step_s']:16.3f}{c['step_s']:12.3f}{c['step_s'] / b['step_s']:8.2f}{PAPER['time']:14.2f}")
    print(f"{'peak memory growth (MB)':28}{b['memory_mb']:16.0f}{c['memory_mb']:12.0f}"
          f"{c['memory_mb'] / b['memory_mb']:8.2f}{PAPER['memory']:14.2f}")


def bare_loop_samples_per_s(sd: str, steps: int, batch: int, resolution: int) -> float:
    """The trainer's step (VAE encode, text encode, loss, backward, AdamW) on in-memory tensors."""
    from train.models import load_base, make_controlnet
    from train.step import sample_noise, unet_denoising_loss

    base = load_base(sd, resolution)
    controlnet = make_controlnet(base, 3)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5)
    pixels = torch.rand(batch, 3, resolution, resolution) * 2 - 1
    cond = torch.rand(batch, 3, resolution, resolution)
    captions = ["a red circle on a gradient background"] * batch
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.no_grad():
            latents = base.vae.encode(pixels).latent_dist.sample(generator=generator) * base.vae.config.scaling_factor
            hidden, _ = base.family.encode_prompts(base, captions, torch.device("cpu"))
        noise, t = sample_noise(latents, 1000, generator)
        unet_denoising_loss(controlnet, base.unet, base.scheduler, latents, hidden, cond, noise, t).backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


def trainer_samples_per_s(sd: str, manifest: str, steps: int, batch: int, resolution: int, work: Path,
                          *extra: str) -> float:
    from train.data import check_conditions
    from train.loop import train
    from train.train import parse_args

    config = parse_args(["--manifest", manifest, "--condition", "canny", "--pretrained_model_name_or_path", sd,
                         "--output_dir", str(work / "run"), "--resolution", str(resolution), "--train_batch_size",
                         str(batch), "--max_train_steps", str(steps), "--checkpointing_steps", str(10 * steps),
                         "--validation_steps", str(10 * steps), "--report_to", "none", "--seed", "0", *extra])
    return train(config, check_conditions(config.manifest, config.condition))["figures"]["samples_per_s"]


def make_manifest(work: Path, images: int) -> str:
    """A manifest of drawn scenes with Canny maps (local Ray), big enough for the trainer's steps."""
    from pipeline import ray_runtime
    from pipeline.annotate import run
    from pipeline.config import AnnotateConfig
    from demo.samples import write_scenes

    write_scenes(work / "scenes", images)
    run(AnnotateConfig(input=str(work / "scenes"), output=str(work / "manifest"), resolution=256))
    ray_runtime.shutdown()
    return str(work / "manifest")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--sd15", action="store_true", help="SD 1.5's real UNet/ControlNet (random weights), batch 1")
    p.add_argument("--one", choices=["base", "controlnet"], help=argparse.SUPPRESS)
    p.add_argument("--sd", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        result = sd15_kind(args.one, args.steps, args.resolution) if args.sd15 else \
            one_kind(args.one, args.sd, args.steps, args.batch, args.resolution)
        print(json.dumps(result))
        return
    if args.sd15:
        resolution = 256 if args.resolution == 128 else args.resolution
        kinds = {kind: json.loads(subprocess.run(
            [sys.executable, __file__, "--sd15", "--one", kind, "--steps", str(args.steps), "--resolution",
             str(resolution)], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            for kind in ("base", "controlnet")}
        print_comparison(f"SD 1.5 architecture (random weights), batch 1, {resolution} px, {args.steps} timed steps, "
                         f"{torch.get_num_threads()} threads, CPU, AdamW fp32", kinds["base"], kinds["controlnet"])
        return
    from tests.tiny_sd import write_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="bench_train"))
    sd = str(write_tiny_sd(work / "sd"))
    kinds = {}
    for kind in ("base", "controlnet"):
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--sd", sd, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--resolution", str(args.resolution)],
                             capture_output=True, text=True, check=True)
        kinds[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    print_comparison(f"tiny SD, batch {args.batch}, {args.resolution} px ({args.resolution // 8}x{args.resolution // 8} "
                     f"latents), {torch.get_num_threads()} threads, CPU", kinds["base"], kinds["controlnet"])

    manifest = make_manifest(work, max(2 * args.batch + 8, 40))
    bare = bare_loop_samples_per_s(sd, args.steps, args.batch, args.resolution)
    e2e = trainer_samples_per_s(sd, manifest, args.steps, args.batch, args.resolution, work)
    print(f"bare step loop on in-memory tensors: {bare:7.1f} samples/s")
    print(f"trainer end to end (data, accelerate): {e2e:7.1f} samples/s")
    print(f"ratio trainer / bare: {e2e / bare:.2f} (data loading costs {100 * (1 - e2e / bare):.1f}%; target < 5%)")
    fixed = ("--center_crop",)
    plain = trainer_samples_per_s(sd, manifest, args.steps, args.batch, args.resolution, work / "fixed", *fixed)
    cached = trainer_samples_per_s(sd, manifest, args.steps, args.batch, args.resolution, work / "cached", *fixed,
                                   "--cache_latents")
    print(f"fixed crops: {plain:7.1f} samples/s; with --cache_latents: {cached:7.1f} samples/s "
          f"(speed-up {cached / plain:.2f}x; the cache is built before the first step and not counted)")


if __name__ == "__main__":
    main()
