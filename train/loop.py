"""The training loop: readable top to bottom.

    set up accelerate -> load the locked base and the ControlNet -> data -> optimiser, schedule
    -> resume? -> for each batch: encode, loss (train/step.py), backward, step -> checkpoint,
    validate, log -> export
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from train import checkpoints
from train.config import TrainConfig
from train.data import ManifestDataset, RankSampler, collate, load_rows
from train.export import export
from train.models import load_base, make_controlnet
from train.step import controlnet_loss, sample_noise

log = logging.getLogger("train")

WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss."""


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise RuntimeError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (CUDA only)") from exc
        return bnb.optim.AdamW8bit(params, lr=config.learning_rate)
    return torch.optim.AdamW(params, lr=config.learning_rate)


def manifest_fingerprint(summary: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(summary.get("shards", []), sort_keys=True).encode()).hexdigest()[:16]


def train(config: TrainConfig, summary: dict[str, Any]) -> dict[str, Any]:
    """Train and export; returns the final figures. ``summary`` is the manifest's _manifest.json."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(
        # Without a GPU, say so: accelerate then joins torchrun's ranks over gloo (multi-CPU).
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=config.output_dir, logging_dir=f"{config.output_dir}/logs"),
    )
    seed = config.seed if config.seed is not None else 0
    set_seed(seed)
    device, weight_dtype = accelerator.device, WEIGHT_DTYPES[config.mixed_precision]

    # The locked base runs in the mixed-precision dtype; the trained ControlNet stays fp32.
    base = load_base(config.pretrained_model_name_or_path, config.resolution)
    for module in (*base.text_encoders, base.vae, base.unet):
        module.to(device, dtype=weight_dtype)
    with accelerator.local_main_process_first():  # one process per machine builds the row cache
        train_rows, held_out = load_rows(config.manifest, config.condition, config.num_validation_rows,
                                         config.data_cache_dir)
    controlnet = make_controlnet(base, 3 * len(config.condition), config.controlnet_model_name_or_path)
    if config.gradient_checkpointing:
        controlnet.enable_gradient_checkpointing()
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(controlnet.parameters())
        ema.to(device)
        accelerator.register_for_checkpointing(ema)

    dataset = ManifestDataset(train_rows, config.condition, config.resolution, seed, config.center_crop,
                              config.random_flip, config.proportion_empty_prompts)
    sampler = RankSampler(len(dataset), accelerator.process_index, accelerator.num_processes, seed,
                          config.train_batch_size, config.gradient_accumulation_steps)
    if sampler.batches_per_epoch() == 0:
        raise ValueError(f"{len(dataset)} training rows cannot fill {config.gradient_accumulation_steps} batch(es) "
                         f"of {config.train_batch_size} on each of {accelerator.num_processes} processes; lower "
                         "--train_batch_size or --gradient_accumulation_steps")
    cache = None
    if config.cache_latents:
        from train.cache import EncodedCache

        cache = EncodedCache(base, dataset, device, weight_dtype, config.train_batch_size,
                             show_progress=accelerator.is_local_main_process)
        dataset.decode_images = False
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, sampler=sampler,
                                         collate_fn=collate, num_workers=config.dataloader_num_workers)
    steps_per_epoch = sampler.batches_per_epoch() // config.gradient_accumulation_steps
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    epochs = math.ceil(max_steps / steps_per_epoch)

    optimizer = make_optimizer(config, controlnet.parameters())
    # accelerate steps a prepared scheduler once per process per optimiser step
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    controlnet, optimizer, lr_scheduler = accelerator.prepare(controlnet, optimizer, lr_scheduler)
    if accelerator.is_main_process and config.report_to != "none":
        accelerator.init_trackers("controlnet", config={k: str(v) for k, v in config.to_dict().items()})

    global_step = 0
    if config.resume_from_checkpoint:
        path = checkpoints.resolve(config.output_dir, config.resume_from_checkpoint)
        accelerator.load_state(str(path))
        global_step = checkpoints.step_of(path)
        log.info("resumed from %s at step %d", path, global_step)

    figures = run_steps(config, accelerator, base, controlnet, optimizer, lr_scheduler, ema, loader, sampler,
                        dataset, held_out, global_step, max_steps, steps_per_epoch, epochs, seed, weight_dtype,
                        cache)

    accelerator.wait_for_everyone()
    result = {"figures": figures}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(controlnet)
        if ema is not None:
            ema.copy_to(final.parameters())
        card = {
            "base_model": config.pretrained_model_name_or_path, "manifest": config.manifest,
            "manifest_fingerprint": manifest_fingerprint(summary), "conditions": list(config.condition),
            "provenance": summary.get("annotators", []), "args": config.to_dict(), "figures": figures,
        }
        result["exported"] = export(final, config.output_dir, card)
        (Path(config.output_dir) / "train_summary.json").write_text(json.dumps(result, indent=2, default=str))
    accelerator.end_training()
    return result


def run_steps(config, accelerator, base, controlnet, optimizer, lr_scheduler, ema, loader, sampler, dataset,
              held_out, global_step, max_steps, steps_per_epoch, epochs, seed, weight_dtype,
              cache=None) -> dict[str, Any]:
    """The optimisation loop proper, from ``global_step`` to ``max_steps``."""
    device = accelerator.device
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * config.gradient_accumulation_steps
    bar = tqdm(total=max_steps, initial=global_step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    skipped_total, skipped_in_a_row, samples, micro, losses = 0, 0, 0, 0, []
    last_loss, seen_rows = None, []
    first_step, paused = global_step, 0.0
    step_finite = True
    start = time.perf_counter()
    for epoch in range(first_epoch, epochs):
        dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, skip_batches if epoch == first_epoch else 0)
        for batch in loader:
            with accelerator.accumulate(controlnet):
                # Randomness per (step, micro-batch, rank): a resumed run draws what a straight one would.
                generator = torch.Generator().manual_seed(hash((seed, global_step, micro, accelerator.process_index)) % 2**63)
                micro += 1
                with torch.no_grad():
                    if cache is not None:
                        latents = cache.latents(batch["indices"], _on(generator, device)).to(weight_dtype)
                        hidden, added = cache.prompts_for(batch["captions"])
                    else:
                        pixels = batch["pixel_values"].to(device, weight_dtype)
                        latents = base.vae.encode(pixels).latent_dist.sample(generator=_on(generator, device))
                        latents = latents * base.vae.config.scaling_factor
                        hidden, added = base.family.encode_prompts(base, batch["captions"], device)
                noise, timesteps = sample_noise(latents, base.scheduler.config.num_train_timesteps, generator)
                condition = batch["conditioning_pixel_values"].to(device)
                loss = controlnet_loss(controlnet, base.unet, base.scheduler, latents, hidden, condition, noise,
                                       timesteps, added)
                finite = bool(accelerator.gather(torch.isfinite(loss).float()[None].to(device)).min() > 0)
                step_finite = step_finite and finite
                if finite:
                    accelerator.backward(loss)
                    losses.append(loss.detach().item())
                if accelerator.sync_gradients:
                    if step_finite:
                        accelerator.clip_grad_norm_(controlnet.parameters(), config.max_grad_norm)
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=config.set_grads_to_none)
            if global_step > first_step:  # throughput after the first (warm-up) step
                samples += len(batch["captions"]) * accelerator.num_processes
            seen_rows.extend(batch["indices"])
            if not accelerator.sync_gradients:
                continue
            micro = 0
            if not step_finite:
                skipped_total += 1
                skipped_in_a_row += 1
                if skipped_in_a_row >= config.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{skipped_in_a_row} steps in a row had a non-finite loss (at step {global_step}); "
                        "lower --learning_rate, try --mixed_precision bf16 or no, or check the data")
            else:
                skipped_in_a_row = 0
            step_finite = True
            global_step += 1
            if global_step == first_step + 1:
                start = time.perf_counter()
            if ema is not None:
                ema.step(controlnet.parameters())
            logs = {"loss": sum(losses) / max(1, len(losses)), "lr": lr_scheduler.get_last_lr()[0],
                    "samples_per_s": samples / max(1e-9, time.perf_counter() - start - paused),
                    "skipped_steps": skipped_total}
            losses, last_loss = [], logs["loss"]
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
            accelerator.log(logs, step=global_step)
            pause_start = time.perf_counter()  # checkpoints and samples are not training throughput
            if global_step % config.checkpointing_steps == 0 or global_step == max_steps:
                checkpoints.save(accelerator, config.output_dir, global_step, config.checkpoints_total_limit)
            if global_step % config.validation_steps == 0 and accelerator.is_main_process:
                run_validation(config, accelerator, base, controlnet, held_out, global_step, seed)
            paused += time.perf_counter() - pause_start
            if global_step >= max_steps:
                break
        if global_step >= max_steps:
            break
    bar.close()
    elapsed = time.perf_counter() - start - paused
    return {"global_step": global_step, "final_loss": last_loss, "lr": lr_scheduler.get_last_lr()[0],
            "skipped_steps": skipped_total, "samples_per_s": round(samples / elapsed, 3) if elapsed else None,
            "ranks": rank_report(accelerator, controlnet, seen_rows)}


def rank_report(accelerator, controlnet, seen_rows: list[int]) -> list[dict[str, Any]]:
    """Per rank: rows trained on (this run) and a weight checksum, to show ranks stayed in sync."""
    from accelerate.utils import gather_object

    with torch.no_grad():
        checksum = float(sum(p.double().sum() for p in accelerator.unwrap_model(controlnet).parameters()))
    return gather_object([{"rank": accelerator.process_index, "rows": sorted(seen_rows), "checksum": checksum}])


def _on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` continuing from ``generator`` (CPU generators cannot feed CUDA)."""
    if device.type == "cpu":
        return generator
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))


def run_validation(config, accelerator, base, controlnet, held_out, global_step: int, seed: int) -> Path | None:
    """Generate from held-out conditions, write a PNG grid and send it to the tracker."""
    from train.validation import generate, grid, validation_inputs

    if base.family.name != "sd" or len(config.condition) != 1:
        log.warning("validation images are made for single-condition SD 1.x/2.x runs only; skipped")
        return None
    inputs = validation_inputs(held_out, config.condition, config.validation_image, config.validation_prompt,
                               config.resolution)
    if not inputs:
        return None
    model = accelerator.unwrap_model(controlnet)
    model.eval()
    samples = generate(base, model, inputs, config.num_validation_images, seed)
    model.train()
    path = grid(inputs, samples, Path(config.output_dir) / "validation" / f"step-{global_step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np
            from PIL import Image

            tracker.writer.add_image("validation", np.asarray(Image.open(path)), global_step, dataformats="HWC")
    return path
